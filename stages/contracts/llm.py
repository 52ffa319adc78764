"""The LLM stage (role "llm"): a prompt and its media items in, tokens out.

A request is `GenerateRequest` plus tensors:

* `MROPE_POSITIONS` int64 `[3, P]` for M-RoPE models (Qwen2-VL);
* per media item i, either `item_tensor(i, encoder.EMBEDDINGS)` (its embeddings, already made:
  offline callers and tests), or the tensors of its encoder request, `item_tensor(i, NAME)`,
  which the stage sends on as NAME to a replica of `MediaItem.encoder_role` with
  `MediaItem.encoder_body`, if and only if it needs the item: the stage decides at admission,
  from its own prefix cache and encoder-output cache, and asks again when cached blocks it
  counted on were evicted before the request ran.

Each step the stage answers every request that advanced, all in one message: a `TokenUpdate`
per request, the last one with `finished` set and the totals filled in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, TypeVar

import msgspec
from omni.stages.contracts import Contract
from omni.stages.contracts.sampling import MAX_LOGPROBS, SamplingParams

ROLE = "llm"
MROPE_POSITIONS = "mrope_positions"

Count = Annotated[int, msgspec.Meta(ge=0)]
TokenId = Annotated[int, msgspec.Meta(ge=0)]
# The prompt processor's content hash (hex): what the prefix cache and encoder caches key on.
ItemHash = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


def item_tensor(index: int, name: str) -> str:
    """The request tensor `name` of media item `index`."""
    return f"item{index}.{name}"


T = TypeVar("T")


def item_tensors_of(index: int, tensors: Mapping[str, T]) -> dict[str, T]:
    """Item `index`'s tensors, by their names without the item prefix."""
    prefix = f"item{index}."
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}


class MediaItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    item_hash: ItemHash
    # The run of placeholder tokens it fills: prompt_token_ids[offset : offset + length].
    offset: Count
    length: Annotated[int, msgspec.Meta(ge=1)]
    # Who makes its embeddings when the stage needs them ("" when they come with the request),
    # and that role's request, encoded by its contract.
    encoder_role: Annotated[str, msgspec.Meta(max_length=64)] = ""
    encoder_body: Annotated[bytes, msgspec.Meta(max_length=65536)] = b""


class GenerateRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prompt_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=10_000_000)]
    sampling: SamplingParams
    # Separates tenants' prefix caches: blocks are shared only between equal salts.
    cache_salt: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    mm_items: Annotated[list[MediaItem], msgspec.Meta(max_length=4096)] = []
    # Continues the M-RoPE positions for generated tokens (position p uses p + delta).
    mrope_position_delta: int = 0


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A sampled token's log-probability (of the raw logits) and, when the request asked for
    N alternatives, the N most likely tokens' ids and log-probabilities, best first."""

    logprob: float
    top_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_LOGPROBS)] = []
    top_logprobs: Annotated[list[float], msgspec.Meta(max_length=MAX_LOGPROBS)] = []


class TokenUpdate(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """What one step added to one request; the last carries the totals."""

    text_delta: str = ""
    token_ids_delta: list[TokenId] = []
    finish_reason: str | None = None
    # The stop string or stop token id that ended it (None for EOS or length).
    stop_reason: str | int | None = None
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    # Prompt tokens served by the prefix cache.
    cached_tokens: Count = 0
    queue_time_s: float | None = None
    # One per token of `token_ids_delta`, when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None


class LLMStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    requests_running: Count = 0
    requests_waiting: Count = 0
    # Requests waiting for their media items' embeddings from an encoder stage.
    requests_encoding: Count = 0
    kv_cache_usage: float = 0.0
    kv_blocks_used: Count = 0
    kv_blocks_total: Count = 0
    # Prompt tokens looked up in the prefix cache at admission, and those it served.
    prefix_cache_queries: Count = 0
    prefix_cache_hits: Count = 0
    # Media items: asked of an encoder stage, and served by the stage's encoder-output cache.
    items_encoded: Count = 0
    items_from_encoder_cache: Count = 0


CONTRACT: Contract[GenerateRequest, TokenUpdate, LLMStats] = Contract(
    ROLE, GenerateRequest, TokenUpdate, LLMStats
)
