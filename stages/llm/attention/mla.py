"""Multi-head latent attention (DeepSeek-V2's MLA) over a paged cache of compressed latents.

MLA caches, per token and layer, one vector instead of per-head keys and values: the
normalised KV latent c (kv_lora_rank wide) followed by the rotated, head-shared rope key k_pe
(qk_rope_head_dim wide). The cache of a layer is one plane:

    [1, num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]

(576 values a token for DeepSeek-V2-Lite, against 2 x 16 heads x 192 for the expanded keys and
values: 10.7x smaller). Blocks, block tables and slot mappings are the same as for every other
model, so the scheduler, the prefix cache and preemption are unchanged.

Per head h the expanded key is [W_UK[h] c, k_pe] and the value W_UV[h] c, where kv_b_proj
stacks W_UK and W_UV. Two equivalent ways to attend:

- expanded (`attend_mla_expanded`, the CPU path): up-project each request's cached latents
  through kv_b_proj and run ordinary attention. It is transformers' own computation, so greedy
  tokens match it.
- absorbed (`attend_mla_absorbed`, the GPU path): fold W_UK into the query,
  q' = [q_nope W_UK[h], q_pe], so q' . [c, k_pe] = q . k; attend with one shared kv head whose
  key and value are both the cached vector (multi-query attention over 576 dims, no
  up-projection of the context), keep the first kv_lora_rank output dims and apply W_UV after.
  The same paged attention kernels serve it: the one cache plane is passed as both the key and
  the value plane.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from omni.stages.llm.attention.metadata import AttentionMetadata

PagedAttentionFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


def check_latent_cache(cache: torch.Tensor, latent_dim: int) -> None:
    if cache.dim() != 5 or cache.shape[0] != 1 or cache.shape[3] != 1:
        raise ValueError(
            "an MLA cache must be [1, num_blocks, block_size, 1, kv_lora_rank + rope_dim], "
            f"got {tuple(cache.shape)}"
        )
    if cache.shape[4] != latent_dim:
        raise ValueError(
            f"the MLA cache holds {cache.shape[4]} values a token; expected {latent_dim}"
        )


def write_latent_cache(
    latent: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store [latent, k_pe] ([T, r] and [T, rope]) at each token's slot; -1 = padding."""
    check_latent_cache(cache, latent.shape[-1] + k_pe.shape[-1])
    flat = cache.view(-1, cache.shape[-1])
    # Padding tokens write into slot 0 of the null block, which no request reads: selecting
    # the valid rows instead would size a tensor from device values, a sync on the GPU.
    slots = torch.where(slot_mapping >= 0, slot_mapping, 0)
    flat.index_copy_(0, slots, torch.cat([latent, k_pe], dim=-1).to(cache.dtype))


def attend_mla_expanded(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    kv_b_weight: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached latents, up-projected.

    q_nope [T, H, nope], q_pe [T, H, rope]; kv_b_weight [H * (nope + v), r]. Returns
    [T, H, v]; tokens past the last request are zeros. The new tokens' latents must already be
    in the cache.
    """
    num_tokens, num_heads, nope = q_nope.shape
    rope = q_pe.shape[-1]
    latent_dim = cache.shape[-1]
    rank = latent_dim - rope
    v_dim = kv_b_weight.shape[0] // num_heads - nope
    block_size = cache.shape[2]
    plane = cache[0, :, :, 0]  # [num_blocks, block_size, latent_dim]
    out = q_nope.new_zeros(num_tokens, num_heads, v_dim)
    starts = meta.query_start_loc.tolist()
    for req, context_len in enumerate(meta.seq_lens.tolist()):
        q_start, q_end = starts[req], starts[req + 1]
        query_len = q_end - q_start
        if query_len == 0:
            continue
        num_blocks = -(-context_len // block_size)
        block_ids = meta.block_tables[req, :num_blocks].to(torch.long)
        context = plane.index_select(0, block_ids).flatten(0, 1)[:context_len]
        kv = F.linear(context[:, :rank], kv_b_weight).view(context_len, num_heads, nope + v_dim)
        k_nope, value = kv.split([nope, v_dim], dim=-1)
        k_pe = context[:, None, rank:].expand(context_len, num_heads, rope)
        key = torch.cat([k_nope, k_pe], dim=-1)
        query = torch.cat([q_nope[q_start:q_end], q_pe[q_start:q_end]], dim=-1)
        mask = None
        if query_len > 1:
            query_pos = torch.arange(query_len, device=query.device) + context_len - query_len
            key_pos = torch.arange(context_len, device=query.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        attended = F.scaled_dot_product_attention(
            query.transpose(0, 1)[None],
            key.transpose(0, 1)[None],
            value.transpose(0, 1)[None],
            attn_mask=mask,
            scale=scale,
        )
        out[q_start:q_end] = attended[0].transpose(0, 1)
    return out


def attend_mla_absorbed(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    kv_b_weight: torch.Tensor,
    scale: float,
    paged_attention: PagedAttentionFn,
) -> torch.Tensor:
    """The same result as `attend_mla_expanded`, attending in the latent space: W_UK folded
    into the query, one shared kv head whose key and value are the cached [c, k_pe], W_UV
    applied to the output. `paged_attention(query, kv_cache, meta, scale)` is a backend's
    attention over an already written [2, ...] cache."""
    num_heads, nope = q_nope.shape[1:]
    latent_dim = cache.shape[-1]
    rank = latent_dim - q_pe.shape[-1]
    v_dim = kv_b_weight.shape[0] // num_heads - nope
    per_head = kv_b_weight.view(num_heads, nope + v_dim, rank)
    w_uk, w_uv = per_head[:, :nope], per_head[:, nope:]  # [H, nope, r], [H, v, r]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, T, r]
    query = torch.cat([q_latent.transpose(0, 1), q_pe], dim=-1)  # [T, H, r + rope]
    # The one plane as both the key and the value plane: a view, nothing is copied.
    kv_planes = cache.expand(2, *cache.shape[1:])
    attended = paged_attention(query, kv_planes, meta, scale)  # [T, H, r + rope]
    latent_out = attended[..., :rank].transpose(0, 1)  # [H, T, r]
    return torch.bmm(latent_out, w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v]
