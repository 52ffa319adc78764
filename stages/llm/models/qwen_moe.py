"""Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B) and Qwen2-MoE
(`Qwen2MoeForCausalLM`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

Each is its dense family's attention with the MLP of sparse layers replaced by a routed
mixture of experts (`moe.SparseMoeBlock`); layers listed in `mlp_only_layers`, or off the
`decoder_sparse_step` rhythm, keep a dense MLP of `intermediate_size`. Qwen2-MoE adds a shared
expert that every token passes through, scaled by a sigmoid gate.
"""

from __future__ import annotations

from typing import Any

from omni.stages.llm.models.base import DecoderArch
from omni.stages.llm.models.moe import MoECausalLM, Routing, SparseMoeBlock, is_sparse_layer
from omni.stages.llm.models.qwen3 import Qwen3ForCausalLM
from torch import nn


def _routing(config: Any) -> Routing:
    return Routing(
        top_k=int(config.num_experts_per_tok),
        renormalize=bool(getattr(config, "norm_topk_prob", False)),
    )


class Qwen3MoeForCausalLM(MoECausalLM, Qwen3ForCausalLM):
    def make_mlp(self, layer_idx: int) -> nn.Module:
        config = self.config
        if not is_sparse_layer(config, layer_idx):
            return super().make_mlp(layer_idx)
        return SparseMoeBlock(
            self.geometry.hidden_size,
            int(config.num_experts),
            int(config.moe_intermediate_size),
            _routing(config),
            self.dtype,
        )


class Qwen2MoeForCausalLM(MoECausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        # Qwen2's layout: a q/k/v bias (config.qkv_bias, on by default), none on o.
        return DecoderArch(
            qkv_bias=bool(getattr(config, "qkv_bias", True)),
            o_bias=False,
            mlp_bias=False,
            qk_norm=False,
        )

    def make_mlp(self, layer_idx: int) -> nn.Module:
        config = self.config
        if not is_sparse_layer(config, layer_idx):
            return super().make_mlp(layer_idx)
        return SparseMoeBlock(
            self.geometry.hidden_size,
            int(config.num_experts),
            int(config.moe_intermediate_size),
            _routing(config),
            self.dtype,
            shared_intermediate_size=int(config.shared_expert_intermediate_size),
            shared_name="shared_expert",
            shared_gate=True,
        )
