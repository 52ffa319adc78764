"""Llama family (`LlamaForCausalLM`): Llama 2/3/3.1, SmolLM2, TinyLlama, Mistral-style GQA.

Biases follow `attention_bias` (q/k/v/o together) and `mlp_bias`; llama3 rope scaling comes
from `config.rope_parameters`.
"""

from __future__ import annotations

from typing import Any

from omni.stages.llm.models.base import CausalLM, DecoderArch


class LlamaForCausalLM(CausalLM):
    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderArch(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=False,
        )
