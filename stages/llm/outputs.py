"""What the engine hands back per request per step (vLLM's RequestOutput, kept small)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.stages.contracts.llm import TokenLogprob


@dataclass
class CompletionOutput:
    index: int
    # Cumulative text and token ids so far; the *_delta fields hold what this step added, for
    # streaming clients.
    text: str
    token_ids: list[int]
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    # Each generated token's log-probability (and its top alternatives when `logprobs` > 0 in
    # the sampling params), when the request asked for logprobs; and those of this step's.
    logprobs: list[TokenLogprob] | None = None
    logprobs_delta: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # The stop string or stop token id that ended the request (None for EOS and length).
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
    # Seconds between arrival and the scheduler's first admission (None: never admitted).
    queue_time_s: float | None = None
    # Set when the engine gave up on the request (finish_reason "abort").
    error: str | None = None
