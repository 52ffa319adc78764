"""What a multi-modal request brings to the LLM core besides its token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omni.cache.block_hash import MultiModalPlaceholder


@dataclass(frozen=True)
class MultiModalInputs:
    """Encoder outputs to splice over placeholder tokens, and (for M-RoPE models) the prompt's
    rotary positions.

    `embeddings[i]` fills `placeholders[i]`: `placeholders[i].length` rows of the model's
    hidden size. The placeholders' content hashes go into the KV block hashes, so two images
    with the same placeholder layout never share cached blocks.
    """

    placeholders: Sequence[MultiModalPlaceholder]
    # None for an item the orchestrator found inside a prefix-cache hit (see
    # LLMEngine.cached_prefix_tokens): its encoder pass was skipped.
    embeddings: Sequence[torch.Tensor | None]
    # int64 [3, num_prompt_tokens] and the offset that continues them for generated tokens.
    mrope_positions: np.ndarray | None = None
    mrope_position_delta: int = 0

    def check(self, num_prompt_tokens: int, hidden_size: int) -> None:
        """Raises ValueError naming the item when the inputs do not fit the prompt."""
        if len(self.embeddings) != len(self.placeholders):
            raise ValueError(
                f"got {len(self.embeddings)} multi-modal embeddings for "
                f"{len(self.placeholders)} placeholders"
            )
        previous_end = 0
        ordered = sorted(enumerate(self.placeholders), key=lambda pair: pair[1].offset)
        for index, item in ordered:
            end = item.offset + item.length
            if end > num_prompt_tokens:
                raise ValueError(
                    f"multi-modal item {index} covers tokens {item.offset}..{end - 1}, past the "
                    f"prompt's {num_prompt_tokens} tokens"
                )
            if item.offset < previous_end:
                raise ValueError(f"multi-modal item {index} overlaps the item before it")
            previous_end = end
            embedding = self.embeddings[index]
            if embedding is None:
                continue
            shape = tuple(embedding.shape)
            if shape != (item.length, hidden_size):
                raise ValueError(
                    f"multi-modal item {index} has embeddings of shape {shape}; its placeholder "
                    f"needs ({item.length}, {hidden_size})"
                )
        if self.mrope_positions is not None:
            shape = tuple(self.mrope_positions.shape)
            if shape != (3, num_prompt_tokens):
                raise ValueError(
                    f"mrope_positions has shape {shape}; the prompt needs (3, {num_prompt_tokens})"
                )
