"""The LLM engine: requests in, one scheduler step at a time, outputs out.

Synchronous and single-threaded on purpose: the offline API drives it directly, and the LLM
stage process wraps it in its busy loop.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import torch
from omni.cache.block_hash import MultiModalPlaceholder
from omni.cache.kv_cache_manager import KVCacheManager
from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.detokenizer import IncrementalDetokenizer
from omni.stages.llm.mm_inputs import MultiModalInputs
from omni.stages.llm.model_runner import LaunchedStep, TokenFeed
from omni.stages.llm.models.loader import resolve_model_path
from omni.stages.llm.outputs import CompletionOutput, RequestOutput
from omni.stages.llm.parallel.ranks import start_replica
from omni.stages.llm.request import Request, RequestStatus
from omni.stages.llm.scheduler import Scheduler, SchedulerOutput
from omni.stages.llm.structured_output import GrammarCompiler, GrammarState
from transformers import AutoTokenizer, PreTrainedTokenizerBase


def eos_token_ids(model_path: str, tokenizer: PreTrainedTokenizerBase | None) -> frozenset[int]:
    """EOS ids the way transformers' generate sees them: the generation config's (which may
    list several, e.g. Llama 3 and Qwen2.5 chat models) and the tokenizer's."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        eos = None
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None and not ids:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_path = resolve_model_path(config.model, include_weights=config.load_format != "dummy")
        self.tokenizer: PreTrainedTokenizerBase | None = None
        if not config.skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(config.tokenizer) if config.tokenizer else model_path
            )
        # Ranks 1..N-1 of a tensor-parallel replica: child processes that follow this one's
        # step plans (see omni.stages.llm.parallel); None without tensor parallelism.
        self.runner, self.ranks = start_replica(config, model_path)
        if self.ranks is not None:
            weakref.finalize(self, self.ranks.kill)  # an engine dropped unclosed ends them too
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = int(self.runner.hf_config.get_text_config().vocab_size)
        self.kv_cache = KVCacheManager(
            self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
        )
        self.eos_token_ids = eos_token_ids(model_path, self.tokenizer)
        self._outputs: dict[str, _OutputState] = {}
        # Asynchronous scheduling: the launched step whose tokens are not read yet.
        self._inflight: _InFlightStep | None = None
        # Requests set aside for media items that take_needs_items has reported.
        self._items_asked: set[str] = set()
        # Structured-output requests whose grammar is compiling (off the step loop); they
        # reach the scheduler once it is ready.
        self._grammars: GrammarCompiler | None = None
        self._compiling: dict[str, tuple[Request, futures.Future[Any]]] = {}

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        mm: MultiModalInputs | None = None,
        cache_salt: str | None = None,
        stream: bool = True,
    ) -> None:
        """Queues a request. With stream=False, step() reports it only once it finishes,
        which saves building an output per token for offline batches."""
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine runs without a tokenizer: pass prompt token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        self._check_prompt(token_ids)
        self._check_params(params)
        if mm is not None:
            mm.check(len(token_ids), int(self.runner.hf_config.get_text_config().hidden_size))
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            mm_placeholders=() if mm is None else mm.placeholders,
            mm_embeddings=None if mm is None else list(mm.embeddings),
            mrope_positions=None if mm is None else mm.mrope_positions,
            mrope_position_delta=0 if mm is None else mm.mrope_position_delta,
            cache_salt=cache_salt,
        )
        if params.seed is not None:
            request.generator = torch.Generator(device=self.runner.device)
            request.generator.manual_seed(params.seed)
        if params.structured_outputs is not None:
            self._compiling[request_id] = (
                request, self._grammar_compiler().submit(params.structured_outputs)
            )
        else:
            self.scheduler.add_request(request)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop or [],
                include_stop_str_in_output=params.include_stop_str_in_output,
                min_tokens=params.min_tokens,
            )
        self._outputs[request_id] = _OutputState(text, detok, stream)

    def _grammar_compiler(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise ValueError("structured_outputs needs the engine's tokenizer")
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._grammars

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar has compiled go to the scheduler; those whose constraint
        did not compile fail. When nothing else can run, wait a moment for one, rather than
        spin the step loop."""
        if not self._compiling:
            return []
        pending = [future for _, future in self._compiling.values()]
        if self.scheduler.num_unfinished == 0 and self._inflight is None:
            futures.wait(pending, timeout=0.05, return_when=futures.FIRST_COMPLETED)
        failed = []
        for request_id, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            error = future.exception()
            if error is None:
                request.grammar = GrammarState(future.result())
                self.scheduler.add_request(request)
                continue
            request.status = RequestStatus.FINISHED_ABORTED
            request.error = str(error)
            failed.append(self._failed_output(request))
        return failed

    def _check_params(self, params: SamplingParams) -> None:
        if params.n != 1:
            # One sequence per request: LLM.generate and the server fan n out into requests
            # that share the prompt's blocks through the prefix cache.
            raise ValueError(f"n={params.n}: the engine runs one sequence per request")
        bad = next((t for t in params.logit_bias or () if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"logit_bias token id {bad} is outside the vocabulary [0, {self.vocab_size})"
            )

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens, which must also hold at least one generated token"
            )
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})"
            )

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for request_id in ids:
            self._compiling.pop(request_id, None)
            self._outputs.pop(request_id, None)
            self._items_asked.discard(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._compiling) or (
            self._inflight is not None and not self._inflight.all_finished
        )

    def has_runnable_requests(self) -> bool:
        """Whether `step` can make progress: unfinished requests other than those set aside
        for their media items (see `take_needs_items`)."""
        runnable = self.scheduler.num_unfinished - len(self.scheduler.needs_items)
        in_flight = self._inflight is not None and not self._inflight.all_finished
        return runnable > 0 or bool(self._compiling) or in_flight

    @property
    def has_new_needs_items(self) -> bool:
        """Whether `take_needs_items` has a request not reported yet."""
        return len(self.scheduler.needs_items) > len(self._items_asked)

    def take_needs_items(self) -> list[tuple[str, list[int]]]:
        """Requests set aside because media items they were admitted without (inside a prefix
        hit then) are needed after all, with those items' indices; each is asked for once.
        Only when `scheduler.ask_for_missing_items` is set, else such requests fail."""
        asked = [
            (request_id, missing)
            for request_id, missing in self.scheduler.needs_items.items()
            if request_id not in self._items_asked
        ]
        self._items_asked.update(request_id for request_id, _ in asked)
        return asked

    def provide_items(self, request_id: str, embeddings: dict[int, torch.Tensor]) -> None:
        """The embeddings a request from `take_needs_items` waited for; it runs again."""
        request = self.scheduler.requests.get(request_id)
        if request is None:
            raise ValueError(f"request {request_id!r} is not in flight")
        hidden = int(self.runner.hf_config.get_text_config().hidden_size)
        for index, embedding in embeddings.items():
            item = request.mm_placeholders[index]
            if tuple(embedding.shape) != (item.length, hidden):
                raise ValueError(
                    f"multi-modal item {index} has embeddings of shape "
                    f"{tuple(embedding.shape)}; its placeholder needs ({item.length}, {hidden})"
                )
        self._items_asked.discard(request_id)
        self.scheduler.provide_items(request_id, embeddings)

    # ---- stepping -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the other ranks of a tensor-parallel replica (without them, nothing to do).
        The engine is unusable afterwards."""
        ranks, self.ranks = self.ranks, None
        if ranks is not None:
            ranks.close()

    def step(self) -> list[RequestOutput]:
        """Runs one forward pass; returns an output for every request that gained tokens."""
        if self.ranks is None:
            return self._step()
        if self.ranks.death is not None:
            raise RuntimeError(f"the replica lost a rank: {self.ranks.death}")
        try:
            return self._step()
        except Exception as exc:
            # A rank's death fails rank 0's collectives, maybe before the watcher has seen it:
            # say which rank died, not what gloo saw.
            death = self.ranks.wait_for_death(1.0) if self.ranks is not None else None
            if death is not None:
                raise RuntimeError(f"the replica lost a rank: {death}") from exc
            raise

    def _step(self) -> list[RequestOutput]:
        compile_failures = self._admit_compiled()
        if self.config.async_scheduling:
            return compile_failures + self._step_async()
        out = self.scheduler.schedule()
        outputs = compile_failures + [self._failed_output(request) for request in out.failed]
        if out.is_empty:
            return outputs
        tokens, logprobs = self.runner.execute(out)
        self.scheduler.update_from_output(out, tokens, logprobs)
        for sched, token in zip(out.scheduled, tokens, strict=True):
            if token is None:
                continue
            output = self._advance(sched.request, token)
            if output is not None:
                outputs.append(output)
        return outputs

    def _step_async(self) -> list[RequestOutput]:
        """Schedules and launches the next step while the previous one runs, then reads the
        previous step's tokens: the host's work overlaps the device's."""
        outputs: list[RequestOutput] = []
        previous = self._inflight
        out = self.scheduler.schedule()
        outputs += [self._failed_output(request) for request in out.failed]
        launched = None
        if not out.is_empty:
            feed = None if previous is None else previous.feed_for(out)
            forwarded = self.runner.launch_forward(out, feed)
            launched = _InFlightStep(forwarded.step, forwarded.requests)
            self.scheduler.advance(out)
            if previous is not None and _samples_from_history(forwarded.requests):
                # The previous step's tokens decide this step's grammar masks, penalties or
                # min_tokens bans: read them first, while the device runs this step's forward.
                outputs += self._resolve(previous)
                previous = None
            self.runner.sample(forwarded)
        if previous is not None:
            outputs += self._resolve(previous)
        # A step whose requests all finished meanwhile has nothing left to report; the device
        # finishes it before anything launched later, so its results can simply be dropped.
        self._inflight = None if launched is None or launched.all_finished else launched
        return outputs

    def _resolve(self, inflight: _InFlightStep) -> list[RequestOutput]:
        tokens, logprobs = inflight.step.result()
        rows = inflight.step.rows
        sampled = [tokens[i] for i in rows]
        sampled_logprobs = None if logprobs is None else [logprobs[i] for i in rows]
        live = [
            (r, t) for r, t in zip(inflight.requests, sampled, strict=True) if not r.is_finished
        ]
        self.scheduler.resolve(inflight.requests, sampled, sampled_logprobs)
        outputs = []
        for request, token in live:
            output = self._advance(request, token)
            if output is not None:
                outputs.append(output)
        return outputs

    def cached_prefix_tokens(
        self,
        prompt_token_ids: Sequence[int],
        mm_placeholders: Sequence[MultiModalPlaceholder] = (),
        cache_salt: str | None = None,
    ) -> int:
        """How many of the prompt's tokens the prefix cache would serve if it were admitted
        now: an item ending within them need not be encoded (pass None as its embedding)."""
        return self.kv_cache.probe_prefix(prompt_token_ids, mm_placeholders, cache_salt)

    def _failed_output(self, request: Request) -> RequestOutput:
        state = self._outputs.pop(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            prompt=state.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="abort")],
            finished=True,
            error=request.error,
        )

    def _advance(self, request: Request, token: int) -> RequestOutput | None:
        """Feeds the new token to the request's text (which may hit a stop string) and builds
        its output, if the request streams or has finished."""
        state = self._outputs[request.request_id]
        if request.grammar is not None:
            request.grammar.accept(token)
        detok = state.detokenizer
        delta = ""
        if detok is not None:
            delta = detok.append(token)
            if detok.stopped_by is not None:
                request.stop_reason = detok.stopped_by
                if not request.is_finished:
                    request.drop_pending_tokens()
                    self.scheduler.finish_requests(
                        [request.request_id], RequestStatus.FINISHED_STOPPED
                    )
            elif request.is_finished:
                # Finished by EOS, a stop token or length: release the text held back in case
                # it began a stop string.
                delta += detok.flush()
        if not request.is_finished and not state.stream:
            return None
        if request.is_finished:
            del self._outputs[request.request_id]
        wants_logprobs = request.sampling_params.logprobs is not None
        completion = CompletionOutput(
            index=0,
            text=detok.output_text if detok is not None else "",
            token_ids=request.output_token_ids[: request.num_resolved_output_tokens],
            text_delta=delta,
            token_ids_delta=[token],
            logprobs=list(request.output_logprobs) if wants_logprobs else None,
            # One token a step: this step's is the last.
            logprobs_delta=request.output_logprobs[-1:] if wants_logprobs else None,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=state.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.is_finished,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            queue_time_s=None
            if request.first_scheduled_time is None
            else request.first_scheduled_time - request.arrival_time,
        )


@dataclass
class _InFlightStep:
    """A launched step and, per sampled row, the request it samples for."""

    step: LaunchedStep
    requests: list[Request]

    @property
    def all_finished(self) -> bool:
        return all(request.is_finished for request in self.requests)

    def feed_for(self, out: SchedulerOutput) -> TokenFeed | None:
        """Where the next step's inputs need this step's tokens: each request's pending token
        from this step sits at the tail of its known tokens."""
        row_of = {request.request_id: j for j, request in enumerate(self.requests)}
        dst, src = [], []
        flat = 0
        for sched in out.scheduled:
            request = sched.request
            pending_at = request.num_tokens - request.num_pending_tokens
            start = request.num_computed_tokens
            if request.num_pending_tokens and start <= pending_at < start + sched.num_new_tokens:
                dst.append(flat + pending_at - start)
                src.append(row_of[request.request_id])
            flat += sched.num_new_tokens
        if not dst:
            return None
        assert self.step.tokens is not None
        return TokenFeed(dst, src, self.step.tokens)


@dataclass
class _OutputState:
    """What the engine keeps per request to build its outputs."""

    prompt: str | None
    detokenizer: IncrementalDetokenizer | None
    stream: bool


def _samples_from_history(requests: Sequence[Request]) -> bool:
    """Whether any request's sampling depends on the tokens it has sampled so far."""
    return any(
        r.sampling_params.has_penalties or r.sampling_params.min_tokens or r.grammar is not None
        for r in requests
    )
