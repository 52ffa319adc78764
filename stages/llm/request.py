"""A request's state as the scheduler and model runner see it."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from omni.cache.block_hash import MultiModalPlaceholder
from omni.stages.contracts.llm import TokenLogprob
from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.structured_output import GrammarState

# Stands for a sampled token still on the device; never a real token id.
PENDING_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    # Its cached prefix was evicted before it ran, and it waits for embeddings of media items
    # it had skipped as cached (see Scheduler.take_needs_items).
    WAITING_FOR_ITEMS = "waiting_for_items"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason: "stop", "length" or "abort"; None while unfinished."""
        return self.value if self.is_finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Every id that ends generation unless ignore_eos (generation configs may list several).
    eos_token_ids: frozenset[int] = frozenset()
    mm_placeholders: Sequence[MultiModalPlaceholder] = ()
    cache_salt: str | None = None
    # Multi-modal embeddings to splice at placeholder positions, one per placeholder, filled
    # in by the encoder stage; None for text-only requests. An entry may be None when the
    # orchestrator found the item inside a prefix-cache hit and skipped its encoder pass.
    mm_embeddings: list[torch.Tensor | None] | None = None
    # M-RoPE models (Qwen2-VL family): the prompt's [3, num_prompt_tokens] positions from the
    # prompt processor, and the offset that continues them for generated tokens.
    mrope_positions: np.ndarray | None = None
    mrope_position_delta: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # When the scheduler first admitted it (queue time = this - arrival_time); None before.
    first_scheduled_time: float | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Log-probability of each sampled token, when the request asked for logprobs.
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Tokens whose KV is in the cache (computed or served by a prefix hit). Catches up to
    # num_tokens step by step: no separate prefill and decode phases.
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission (usage reporting).
    num_cached_tokens: int = -1
    # The token that stopped the request, or the stop string (set by the engine).
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Placeholder tokens at the tail of the token lists (asynchronous scheduling only).
    num_pending_tokens: int = 0
    # Why the engine gave up on the request (finish_reason "abort"), for the client.
    error: str | None = None
    # The request's own random stream when it set a seed (made by the engine on the device
    # that samples), so its tokens do not depend on what else shares the batch.
    generator: torch.Generator | None = None
    # Where a structured-output request stands in its grammar (None: unconstrained).
    grammar: GrammarState | None = None

    def __post_init__(self) -> None:
        # Prompt and output tokens in one list, because the KV cache and block hashes treat
        # them alike: a preempted request recomputes both.
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    # ---- asynchronous scheduling: tokens sampled by a step still on the device ----------------

    def append_pending_token(self) -> None:
        """Holds the place of a token a launched step is sampling, so the next step can be
        scheduled (and its input fed from the device) before the token reaches the host."""
        self.output_token_ids.append(PENDING_TOKEN)
        self.all_token_ids.append(PENDING_TOKEN)
        self.num_pending_tokens += 1

    def resolve_pending_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Writes the oldest pending token's real id (pending tokens are always the tail)."""
        index = len(self.output_token_ids) - self.num_pending_tokens
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id
        self.num_pending_tokens -= 1
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def drop_pending_tokens(self) -> None:
        """Forgets tokens of steps launched after the request finished."""
        if self.num_pending_tokens:
            del self.output_token_ids[-self.num_pending_tokens :]
            del self.all_token_ids[-self.num_pending_tokens :]
            self.num_pending_tokens = 0

    @property
    def num_resolved_output_tokens(self) -> int:
        return len(self.output_token_ids) - self.num_pending_tokens

    def missing_embeddings(self, num_cached_tokens: int) -> list[int]:
        """Items whose embedding was skipped but is needed after all: the prefix hit now ends
        before the item does (its blocks were evicted since the item was skipped)."""
        return [
            index
            for index, embedding in enumerate(self.mm_embeddings or ())
            if embedding is None
            and self.mm_placeholders[index].offset + self.mm_placeholders[index].length
            > num_cached_tokens
        ]

    def append_output_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
