"""Continuous batching with no separate prefill and decode phases.

Every step, each request's computed tokens catch up to its known tokens (prompt plus output)
under one token budget: a request in decode needs one token, a new prompt needs all of its
uncached tokens, and a prompt longer than what is left of the budget is chunked across steps.
When KV blocks run out, the most recently admitted running request is preempted and later
recomputed from scratch (its prefix blocks usually survive in the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from omni.cache.kv_cache_manager import KVCacheManager
from omni.stages.contracts.llm import TokenLogprob
from omni.stages.llm.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    # Tokens of all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    # are computed this step.
    num_new_tokens: int
    # The request's block ids in logical order (the manager's list: read-only here).
    block_ids: list[int]

    @property
    def completes_known_tokens(self) -> bool:
        """Whether this step's last token is the request's last known token, i.e. whether the
        step's logits are a real next-token prediction rather than a prefill chunk's."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    # Requests ended at admission (request.error says why); already freed.
    failed: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        ask_for_missing_items: bool = False,
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # A request whose skipped media items turn out to be needed (their cached blocks were
        # evicted) is set aside until someone supplies the embeddings (the LLM stage, which
        # asks an encoder); without that, it fails with a clear error (the offline engine).
        self.ask_for_missing_items = ask_for_missing_items
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Requests set aside for their items, with the indices of the items they need.
        self.needs_items: dict[str, list[int]] = {}
        self.num_preemptions = 0

    # ---- admission and removal -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Ends requests (stop string, abort) and frees everything they hold. Unknown or
        already finished ids are ignored, so aborts may race with natural completion."""
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_ITEMS:
                del self.needs_items[request_id]
            else:
                self.waiting.remove(request)
            request.status = status
            self.kv_cache.free(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Running requests first, in admission order, so older requests keep making progress.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_pending_tokens and self._at_limit(request):
                # Asynchronous scheduling: its pending token is its last; it finishes when that
                # token is resolved, so it needs no further step.
                index += 1
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while self.kv_cache.allocate_slots(request, num_new) is None:
                # Out of blocks: recompute preemption of the newest running request. If that is
                # this request itself, it simply waits for the next step.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(
                    ScheduledRequest(
                        request, num_new, self.kv_cache.get_block_ids(request.request_id)
                    )
                )
                budget -= num_new
                index += 1
                continue
            break

        # New requests only when nothing was preempted this step: admitting them would just
        # evict the work we preempted to make room for.
        while (
            not out.preempted_ids
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            missing = request.missing_embeddings(num_cached)
            if missing and self.ask_for_missing_items:
                self.waiting.popleft()
                request.status = RequestStatus.WAITING_FOR_ITEMS
                self.needs_items[request.request_id] = missing
                continue
            if missing:
                request.error = (
                    f"multi-modal item {missing[0]} was sent without its embedding, but the "
                    "prefix cache no longer holds it; send the request again with it"
                )
                self.finish_requests([request.request_id], RequestStatus.FINISHED_ABORTED)
                out.failed.append(request)
                continue
            num_new = min(request.num_tokens - num_cached, budget)
            new_blocks = self.kv_cache.allocate_slots(request, num_new, computed_blocks, num_cached)
            if new_blocks is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(
                ScheduledRequest(request, num_new, self.kv_cache.get_block_ids(request.request_id))
            )
            budget -= num_new
        return out

    def provide_items(self, request_id: str, embeddings: dict[int, torch.Tensor]) -> None:
        """The embeddings a request set aside by `needs_items` was waiting for: it goes back
        to the front of the queue (it had arrived before the requests queued since)."""
        request = self.requests[request_id]
        if request.status != RequestStatus.WAITING_FOR_ITEMS or request.mm_embeddings is None:
            raise ValueError(f"request {request_id!r} is not waiting for media items")
        for index, embedding in embeddings.items():
            request.mm_embeddings[index] = embedding
        del self.needs_items[request_id]
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Front of the queue: a preempted request resumes before newer arrivals.
        self.waiting.appendleft(request)

    def update_from_output(
        self,
        out: SchedulerOutput,
        sampled_token_ids: list[int | None],
        logprobs: list[TokenLogprob | None] | None = None,
    ) -> list[Request]:
        """Advances each scheduled request by the tokens it computed and appends its sampled
        token (None for a prefill chunk that did not reach the end of the known tokens).
        Returns the requests that finished this step; they are already freed."""
        finished: list[Request] = []
        for i, sched in enumerate(out.scheduled):
            request = sched.request
            if request.is_finished:
                continue  # aborted while the step ran
            token = sampled_token_ids[i]
            request.num_computed_tokens += sched.num_new_tokens
            if token is None:
                continue
            request.append_output_token(token, logprobs[i] if logprobs is not None else None)
            if self._finish_if_stopped(request, token):
                finished.append(request)
        return finished

    def _finish_if_stopped(self, request: Request, token: int) -> bool:
        status = self._stop_status(request, token)
        if status is None:
            return False
        # As in vLLM, stop_reason names an explicit stop token; EOS leaves it None.
        if token not in request.eos_token_ids or request.sampling_params.ignore_eos:
            request.stop_reason = token if status == RequestStatus.FINISHED_STOPPED else None
        request.drop_pending_tokens()
        self.finish_requests([request.request_id], status)
        return True

    # ---- asynchronous scheduling ----------------------------------------------------------------

    def advance(self, out: SchedulerOutput) -> None:
        """After a step is launched: count its tokens as computed and hold a pending token for
        every request it samples, so the next step can be scheduled before the tokens arrive."""
        for sched in out.scheduled:
            samples = sched.completes_known_tokens
            sched.request.num_computed_tokens += sched.num_new_tokens
            if samples:
                sched.request.append_pending_token()

    def resolve(
        self,
        requests: list[Request],
        tokens: list[int],
        logprobs: list[TokenLogprob | None] | None,
    ) -> list[Request]:
        """A launched step's sampled tokens arrived: fill each request's oldest pending token
        and apply the stop rules. Returns the requests that finished (already freed)."""
        finished = []
        for i, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            if request.is_finished:
                continue  # aborted or stopped while the step ran
            request.resolve_pending_token(token, logprobs[i] if logprobs is not None else None)
            if self._finish_if_stopped(request, token):
                finished.append(request)
        return finished

    def _at_limit(self, request: Request) -> bool:
        """Whether the request's tokens, pending ones included, already reach a length limit."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and request.num_output_tokens >= max_tokens:
            return True
        return request.num_tokens >= self.max_model_len

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        num_output = request.num_resolved_output_tokens
        if num_output < params.min_tokens:
            return None
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens - request.num_pending_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
