"""What every model's processed multi-modal prompt shares, whatever the modality.

A prompt is token ids in which each media item owns a run of placeholder tokens
(`MultiModalPlaceholder(item_hash, offset, length)`); the item's encoder output, one row per
placeholder token, is spliced over that run. `MultiModalPrompt` is the base the per-model
prompts (`Qwen2VLPrompt`, `Qwen2AudioPrompt`) build on: it knows how to split an encoder's
reply over the items and how to hand the engine its `mm=` argument; a subclass says which
encoder stage role runs its items and what tensors that stage takes.

`expand_placeholders` is the one placeholder expansion: the tokenizer sees one marker token per
item, and each marker becomes the item's run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from omni.cache import MultiModalPlaceholder
from omni.stages.llm.mm_inputs import MultiModalInputs


@dataclass(frozen=True)
class EncoderItem:
    """One media item's request to its encoder stage: the role, the request struct encoded by
    that role's contract, and its tensors. The LLM stage sends it on when it needs the item."""

    role: str
    body: bytes
    tensors: Mapping[str, torch.Tensor]


class MultiModalPrompt(ABC):
    """Token ids plus one placeholder run per media item (see the module docstring).

    Subclasses are frozen dataclasses declaring `prompt_token_ids` and `placeholders`.
    """

    # The stage role (`omni stage ROLE`) whose worker encodes this prompt's items.
    ENCODER_ROLE: ClassVar[str]
    # What the items are called in errors ("images", "audio clips").
    ITEM_NOUN: ClassVar[str]

    prompt_token_ids: list[int]
    placeholders: tuple[MultiModalPlaceholder, ...]

    @abstractmethod
    def encoder_request(self, item_indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The encoder stage's input tensors for the given items (all by default), in that
        order; its reply's `embeddings` are their rows concatenated in the same order."""

    @abstractmethod
    def encoder_items(self) -> list[EncoderItem]:
        """Per item, in order, its request to the encoder stage (one item each)."""

    def mrope_tensor(self) -> torch.Tensor | None:
        """int64 [3, len(prompt_token_ids)] rotary positions for M-RoPE models, else None."""
        return None

    def mrope_delta(self) -> int:
        """What continues the M-RoPE positions for generated tokens (0 without M-RoPE)."""
        return 0

    def to_multimodal_inputs(self, embeddings: Sequence[torch.Tensor | None]) -> MultiModalInputs:
        """The LLM engine's `mm=` argument: per item its embeddings (None for an item the
        orchestrator skipped as prefix-cached)."""
        return MultiModalInputs(placeholders=list(self.placeholders), embeddings=list(embeddings))

    def split_embeddings(
        self, embeddings: torch.Tensor, item_indices: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """An encoder's output for the given items (all by default), `[sum of their lengths,
        hidden]`, as one tensor per item."""
        indices = range(len(self.placeholders)) if item_indices is None else item_indices
        lengths = [self.placeholders[i].length for i in indices]
        if embeddings.shape[0] != sum(lengths):
            raise ValueError(
                f"embeddings have {embeddings.shape[0]} rows; the prompt's {self.ITEM_NOUN} "
                f"need {sum(lengths)}"
            )
        return list(torch.split(embeddings, lengths))

    def selected_items(self, item_indices: Sequence[int] | None) -> list[int]:
        """`item_indices` (all items when None), refusing an empty selection."""
        indices = list(range(len(self.placeholders)) if item_indices is None else item_indices)
        if not indices:
            raise ValueError(f"no {self.ITEM_NOUN} selected for encoding")
        return indices

    def items_to_encode(self, cached_tokens: int) -> list[int]:
        """Indices of the items whose placeholders are not wholly inside a cached prefix of
        `cached_tokens` tokens: the only ones that need the encoder."""
        return [
            index
            for index, item in enumerate(self.placeholders)
            if item.offset + item.length > cached_tokens
        ]


def expand_placeholders(
    text_ids: Sequence[int],
    marker_id: int,
    lengths: Sequence[int],
    item_hashes: Sequence[str],
    marker: str,
) -> tuple[list[int], list[MultiModalPlaceholder]]:
    """Replace the i-th `marker_id` in `text_ids` with `lengths[i]` copies of it; return the
    expanded ids and each item's placeholder, in item order."""
    if len(lengths) != len(item_hashes):
        raise ValueError(f"{len(lengths)} item lengths but {len(item_hashes)} item hashes")
    token_ids: list[int] = []
    placeholders: list[MultiModalPlaceholder] = []
    for token_id in text_ids:
        if token_id != marker_id:
            token_ids.append(token_id)
            continue
        index = len(placeholders)
        if index == len(lengths):
            raise ValueError(f"tokenized prompt has more {marker} tokens than the {index} items")
        placeholders.append(
            MultiModalPlaceholder(item_hashes[index], len(token_ids), lengths[index])
        )
        token_ids.extend([marker_id] * lengths[index])
    if len(placeholders) != len(lengths):
        # The text had the markers, but the tokenizer did not keep them atomic.
        raise ValueError(
            f"tokenized prompt has {len(placeholders)} {marker} tokens for {len(lengths)} items"
        )
    return token_ids, placeholders
