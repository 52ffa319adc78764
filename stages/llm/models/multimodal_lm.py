"""The language model inside a multi-modal checkpoint, without its encoders.

A Qwen2-VL or Qwen2-Audio checkpoint holds an encoder (vision tower, audio tower and
projector) beside a decoder-only language model. The encoder runs in its own stage, so the
LLM stage builds only the language model from the config's `text_config`, skips the encoder's
tensors, and renames the language model's tensors onto the text-only layout (`model.layers...`,
`lm_head...`). Everything it does load is checked as strictly as for the text-only models.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from omni.stages.llm.models.base import CausalLM


def text_config_of(config: Any) -> Any:
    """The language model's config: `config.text_config` (transformers 5) or `config` itself
    (older flat configs). `tie_word_embeddings` is decided by the top-level config where it
    has one (the VL configs keep it there), else by the text config."""
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        return config
    text_config = copy.copy(text_config)
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(text_config, "tie_word_embeddings", False)
    text_config.tie_word_embeddings = bool(tied)
    return text_config


class MultiModalLanguageModel(CausalLM):
    """Mix in before the text model's class (`class X(MultiModalLanguageModel, Qwen2ForCausalLM)`)
    and name the checkpoint prefixes that belong to other stages and the renames."""

    # Checkpoint tensors that belong to encoder stages and are not loaded here.
    IGNORED_CHECKPOINT_PREFIXES: ClassVar[tuple[str, ...]] = ()
    # (checkpoint prefix, native prefix); the first matching one applies, so a longer prefix
    # must come before a shorter one it starts with.
    CHECKPOINT_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__(text_config_of(config), dtype)
        self.multimodal_config = config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._language_model_tensors(weights))

    def _language_model_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith(self.IGNORED_CHECKPOINT_PREFIXES):
                continue
            for source, target in self.CHECKPOINT_RENAMES:
                if name.startswith(source):
                    name = target + name.removeprefix(source)
                    break
            yield name, tensor
