"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): Llama's layout with a bias on q/k/v (never on o)."""

from __future__ import annotations

from typing import Any

from omni.stages.llm.models.base import CausalLM, DecoderArch


class Qwen2ForCausalLM(CausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return DecoderArch(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
