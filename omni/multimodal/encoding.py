"""Which items of a prompt need the encoder, and the embeddings the LLM gets for each.

An item skips the encoder when its placeholders lie wholly inside the prefix-cache hit (its
embedding is not needed at all: None) or when the encoder-output cache holds its content hash
(the cached rows are used). The rest are encoded in one request, each distinct item once (a
clip repeated in one prompt is encoded once), and their outputs are put into the cache.

    plan = plan_encoding(prompt, cached_tokens, encoder_cache)
    encoded = encode(prompt.encoder_request(plan.to_encode)) if plan.to_encode else None
    embeddings = complete_encoding(prompt, plan, encoded, encoder_cache)
    mm = prompt.to_multimodal_inputs(embeddings)

The same two steps serve the in-process engine and the stage router (`requests.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni.cache.encoder_cache import EncoderCache
from omni.multimodal.prompt import MultiModalPrompt


@dataclass(frozen=True)
class EncodingPlan:
    """`embeddings[i]`: the cached rows of item i, or None (prefix-cached, or still to be
    encoded). `to_encode`: the distinct items to send to the encoder, in prompt order;
    `source[i]` names, for each item to encode, the item in `to_encode` whose rows it takes."""

    embeddings: tuple[torch.Tensor | None, ...]
    to_encode: tuple[int, ...]
    source: dict[int, int]


def plan_encoding(
    prompt: MultiModalPrompt, cached_tokens: int, encoder_cache: EncoderCache | None = None
) -> EncodingPlan:
    embeddings: list[torch.Tensor | None] = [None] * len(prompt.placeholders)
    first_with_hash: dict[str, int] = {}
    source: dict[int, int] = {}
    for index in prompt.items_to_encode(cached_tokens):
        item_hash = prompt.placeholders[index].item_hash
        cached = encoder_cache.get(item_hash) if encoder_cache is not None else None
        if cached is not None:
            embeddings[index] = cached
            continue
        source[index] = first_with_hash.setdefault(item_hash, index)
    return EncodingPlan(tuple(embeddings), tuple(first_with_hash.values()), source)


def complete_encoding(
    prompt: MultiModalPrompt,
    plan: EncodingPlan,
    encoded: torch.Tensor | None,
    encoder_cache: EncoderCache | None = None,
) -> list[torch.Tensor | None]:
    """Per item, the embeddings to splice (None for prefix-cached items): the plan's cached
    rows plus `encoded`, the encoder's output for `plan.to_encode`, split over the items.
    New outputs go into `encoder_cache` where they fit its budget."""
    embeddings = list(plan.embeddings)
    if not plan.to_encode:
        return embeddings
    if encoded is None:
        raise ValueError(f"{len(plan.to_encode)} items need encoder output; none was given")
    # Copied: an encoder reply may map shared memory that is released with its stream.
    rows = {
        index: part.clone()
        for index, part in zip(
            plan.to_encode, prompt.split_embeddings(encoded, plan.to_encode), strict=True
        )
    }
    for index, origin in plan.source.items():
        embeddings[index] = rows[origin]
    if encoder_cache is not None:
        for index, tensor in rows.items():
            if encoder_cache.can_put(encoder_cache.storage.footprint(tensor)):
                encoder_cache.put(prompt.placeholders[index].item_hash, tensor)
    return embeddings
