"""The language model of Qwen2-VL and Qwen2.5-VL: Qwen2 with multimodal rotary (M-RoPE).

Registered under the checkpoints' own architecture names
(`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`), but only the
language model lives here: the vision tower runs in its own stage
(`omni.stages.encoders.vision.VisionEncoder`), so its `visual.*` tensors are skipped when
loading. Everything else is checked as strictly as for the text-only models.

Entry point for the model runner, the same signature as every native model:

    hidden = model(None, positions, kv_caches, attn_meta, backend, inputs_embeds=embeds)

where `positions` is int64 `[3, T]` (temporal, height, width; from
`omni.multimodal.qwen2_vl.mrope_positions` for a prompt, and `text position +
mrope_position_delta` in all three rows while decoding) and `embeds` are
`model.embed_tokens(ids)` with the vision encoder's outputs written over the image
placeholder rows. A `[T]` positions tensor is accepted for text-only batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from omni.stages.llm.models.base import CausalLM, DecoderArch
from omni.stages.llm.models.mrope import MRotaryEmbedding

# Checkpoints name the language model either the original way (`model.layers...`, what the
# released Qwen checkpoints and transformers' save_pretrained write) or transformers 5's module
# way (`model.language_model.layers...`); the latter is folded onto the former.
_LANGUAGE_MODEL_PREFIX = "model.language_model."


def text_config_of(config: Any) -> Any:
    """The language model's config: `config.text_config` (transformers 5) or `config` itself
    (older flat configs). `tie_word_embeddings` is decided by the top-level config, where the
    VL configs keep it."""
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        return config
    text_config = copy.copy(text_config)
    text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    return text_config


class Qwen2VLForCausalLM(CausalLM):
    """Qwen2(.5)-VL's language model over a paged KV cache, rotating with M-RoPE."""

    # Tells the model runner to build [3, T] positions (and 3-row CUDA-graph inputs).
    uses_mrope: ClassVar[bool] = True
    # Checkpoint tensors that belong to other stages (the vision tower) and are not loaded.
    IGNORED_CHECKPOINT_PREFIXES: ClassVar[tuple[str, ...]] = ("visual.", "model.visual.")

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        text_config = text_config_of(config)
        super().__init__(text_config, dtype)
        self.vl_config = config
        self.model.rotary_emb = MRotaryEmbedding(text_config, self.geometry.head_dim)

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        return DecoderArch(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._language_model_tensors(weights))

    def _language_model_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith(self.IGNORED_CHECKPOINT_PREFIXES):
                continue
            if name.startswith(_LANGUAGE_MODEL_PREFIX):
                name = "model." + name.removeprefix(_LANGUAGE_MODEL_PREFIX)
            yield name, tensor
