"""Qwen3 dense (`Qwen3ForCausalLM`): no q/k/v bias by default, an explicit `head_dim` that
need not be hidden/heads, and an RMSNorm over head_dim on each q and k head before rotary."""

from __future__ import annotations

from typing import Any

from omni.stages.llm.models.base import CausalLM, DecoderArch


class Qwen3ForCausalLM(CausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(
            qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True
        )
