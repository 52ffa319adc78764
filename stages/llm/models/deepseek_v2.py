"""DeepSeek-V2 (`DeepseekV2ForCausalLM`: DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-V2.5).

Multi-head latent attention (MLA, see `attention/mla.py`) whose compressed latent is what the
paged cache holds, a dense MLP in the first `first_k_dense_replace` layers and a mixture of
experts after them: `n_routed_experts` routed experts chosen by float32 softmax scores
(greedy, or group-limited greedy: only the `topk_group` best of `n_group` expert groups),
scaled by `routed_scaling_factor`, plus `n_shared_experts` shared experts fused into one MLP
that every token passes through.

Numerics follow transformers 5's modeling_deepseek_v2: the rope part of q and k rotates as
interleaved pairs (x[2i], x[2i+1]) in float32, the latent and q-compression norms use eps 1e-6,
and with YaRN the softmax scale takes mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omni.stages.llm.attention import AttentionMetadata
from omni.stages.llm.attention.mla import (
    attend_mla_absorbed,
    attend_mla_expanded,
    write_latent_cache,
)
from omni.stages.llm.models.base import DecoderArch, KVCacheSpec
from omni.stages.llm.models.layers import Linear, RMSNorm, RotaryAngles, rope_parameters_of
from omni.stages.llm.models.moe import MoECausalLM, Routing, SparseMoeBlock
from omni.stages.llm.models.parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    scaled,
)
from omni.stages.llm.parallel.group import current_group
from torch import nn

# DeepseekV2RMSNorm's default: the latent norms do not take config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(config: Any) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (transformers'
    `yarn_apply_mscale`)."""
    head_dim = int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim)
    scale = head_dim**-0.5
    params = rope_parameters_of(config)
    mscale_all_dim = params.get("mscale_all_dim", 0) if params["rope_type"] != "default" else 0
    factor = float(params.get("factor", 1.0))
    if mscale_all_dim and factor > 1:
        mscale = 0.1 * float(mscale_all_dim) * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def rotate_interleaved(
    q_pe: torch.Tensor, k_pe: torch.Tensor, rotary: RotaryAngles
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q_pe [T, H, rope] and k_pe [T, 1, rope] by pairs (x[2i], x[2i+1]), in float32,
    and cast back: transformers' complex multiply written out."""
    freqs = rotary.positions.to(torch.float32)[:, None] * rotary.inv_freq[None, :]
    cos = (torch.cos(freqs) * rotary.scaling)[:, None, :]  # [T, 1, rope / 2]
    sin = (torch.sin(freqs) * rotary.scaling)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    return rotate(q_pe), rotate(k_pe)


class MLAttention(nn.Module):
    """DeepSeek-V2's attention; parameter names are the checkpoint's."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = int(config.hidden_size)
        bias = bool(getattr(config, "attention_bias", False))
        # Tensor parallelism splits the heads: q (or q_b), kv_b column-parallel and o
        # row-parallel by head. The compressions (q_a, kv_a) and so the cached latent, which
        # every head reads, are whole on every rank.
        heads = current_group().split(int(config.num_attention_heads), "num_attention_heads")
        self.num_heads = heads.size
        self.nope_dim = int(config.qk_nope_head_dim)
        self.rope_dim = int(config.qk_rope_head_dim)
        self.v_dim = int(config.v_head_dim)
        self.kv_lora_rank = int(config.kv_lora_rank)
        q_heads = [scaled(heads, self.nope_dim + self.rope_dim)]
        q_lora_rank = getattr(config, "q_lora_rank", None)
        if q_lora_rank is None:  # V2-Lite: q straight from the hidden state
            self.q_proj: ColumnParallelLinear | None = ColumnParallelLinear(
                hidden, q_heads, False, dtype
            )
        else:  # V2: q through its own low-rank compression
            self.q_proj = None
            self.q_a_proj = Linear(hidden, int(q_lora_rank), bias, dtype)
            self.q_a_layernorm = RMSNorm(int(q_lora_rank), LATENT_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(int(q_lora_rank), q_heads, False, dtype)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, bias, dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, [scaled(heads, self.nope_dim + self.v_dim)], False, dtype
        )
        self.o_proj = RowParallelLinear(scaled(heads, self.v_dim), hidden, bias, dtype)
        self.scale = softmax_scale(config)

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: RotaryAngles,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: str,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_pe = q.view(num_tokens, self.num_heads, -1).split(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = rotate_interleaved(q_pe, k_pe[:, None, :], rotary)
        write_latent_cache(latent, k_pe[:, 0], kv_cache, meta.slot_mapping)
        weight = self.kv_b_proj.weight
        if backend == "torch":
            out = attend_mla_expanded(q_nope, q_pe, kv_cache, meta, weight, self.scale)
        elif backend == "triton":
            from omni.stages.llm.attention.triton_backend import paged_attention_mla_triton

            out = attend_mla_absorbed(
                q_nope, q_pe, kv_cache, meta, weight, self.scale, paged_attention_mla_triton
            )
        else:
            raise ValueError(f"unknown attention backend {backend!r} for MLA")
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_dim))


def _routing(config: Any) -> Routing:
    method = str(getattr(config, "topk_method", "greedy"))
    if method == "greedy":
        groups = 1, 1
    elif method == "group_limited_greedy":
        groups = int(config.n_group), int(config.topk_group)
    else:
        raise ValueError(
            f"topk_method {method!r} is not supported; supported: greedy, group_limited_greedy"
        )
    return Routing(
        top_k=int(config.num_experts_per_tok),
        renormalize=bool(getattr(config, "norm_topk_prob", False)),
        scaling=float(getattr(config, "routed_scaling_factor", 1.0)),
        num_groups=groups[0],
        topk_groups=groups[1],
        float32_logits=True,
    )


class DeepseekV2ForCausalLM(MoECausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        # Only mlp_bias is read (the dense MLPs); the attention is MLAttention's own.
        return DecoderArch(
            qkv_bias=False,
            o_bias=False,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=False,
        )

    def make_attention(self, layer_idx: int) -> nn.Module:
        return MLAttention(self.config, self.dtype)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        config = self.config
        if layer_idx < int(getattr(config, "first_k_dense_replace", 0)):
            return super().make_mlp(layer_idx)
        moe_intermediate = int(config.moe_intermediate_size)
        return SparseMoeBlock(
            self.geometry.hidden_size,
            int(config.n_routed_experts),
            moe_intermediate,
            _routing(config),
            self.dtype,
            shared_intermediate_size=moe_intermediate * int(config.n_shared_experts or 0),
            shared_name="shared_experts",
        )

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """One latent plane per layer: kv_lora_rank + qk_rope_head_dim values a token."""
        config = self.config
        latent_dim = int(config.kv_lora_rank) + int(config.qk_rope_head_dim)
        return KVCacheSpec(self.geometry.num_layers, num_kv_heads=1, head_dim=latent_dim, planes=1)
