"""Reference paged attention in plain torch: the CPU path, and the yardstick for the kernels.

The cache write is one indexed copy over the flattened cache; attention runs one
`scaled_dot_product_attention` call per request over that request's context, gathered from
the cache through its block table. A loop over requests (not tokens) keeps it simple and exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omni.stages.llm.attention.metadata import AttentionMetadata


def write_kv_cache_torch(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's K/V at its flat slot; slots of -1 (padding) are skipped."""
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    # A view, not a copy: [2, num_slots, num_kv_heads, head_dim] aliases the cache storage.
    flat_cache = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat_cache[0].index_copy_(0, slots, key[valid].to(kv_cache.dtype))
    flat_cache[1].index_copy_(0, slots, value[valid].to(kv_cache.dtype))


def _gather_context(
    cache: torch.Tensor, block_ids: torch.Tensor, context_len: int
) -> torch.Tensor:
    """One request's first `context_len` cached positions, [context_len, kv_heads, head_dim]."""
    blocks = cache.index_select(0, block_ids)  # [n_blocks, block_size, kv_heads, head_dim]
    return blocks.flatten(0, 1)[:context_len]


def paged_attention_torch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its whole cached context.

    The new tokens are the last `query_len` positions of the context, so the causal mask is
    aligned to the bottom-right corner: query row i sees keys 0 .. context_len - query_len + i.
    The new tokens' K/V must already be in the cache.
    """
    num_heads = query.shape[1]
    block_size = kv_cache.shape[2]
    output = torch.zeros_like(query)
    # One host read of the small index tensors; the per-request loop needs Python ints.
    starts = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    for req, context_len in enumerate(seq_lens):
        q_start, q_end = starts[req], starts[req + 1]
        query_len = q_end - q_start
        if query_len == 0:
            continue
        if query_len > context_len:
            raise ValueError(
                f"request {req} has {query_len} new tokens but seq_len {context_len}; "
                "seq_len must count the new tokens too"
            )
        num_ctx_blocks = -(-context_len // block_size)
        block_ids = meta.block_tables[req, :num_ctx_blocks].to(torch.long)
        keys = _gather_context(kv_cache[0], block_ids, context_len)
        values = _gather_context(kv_cache[1], block_ids, context_len)
        # SDPA wants [batch, heads, seq, dim]; enable_gqa maps query head h to kv head
        # h // (num_heads // num_kv_heads), the grouping the contract specifies.
        q = query[q_start:q_end].transpose(0, 1).unsqueeze(0)
        k = keys.transpose(0, 1).unsqueeze(0).to(query.dtype)
        v = values.transpose(0, 1).unsqueeze(0).to(query.dtype)
        mask = None
        if query_len > 1:
            first_query_pos = context_len - query_len
            query_pos = torch.arange(query_len, device=query.device) + first_query_pos
            key_pos = torch.arange(context_len, device=query.device)
            mask = key_pos[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != num_heads
        )
        output[q_start:q_end] = out.squeeze(0).transpose(0, 1)
    return output
