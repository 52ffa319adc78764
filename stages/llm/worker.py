"""The LLM core as a stage: the engine behind the stage runtime's worker interface.

Requests and replies are those of the LLM contract (`omni.stages.contracts.llm`): a
`GenerateRequest` in, a `TokenUpdate` per request that gained tokens out, every step. A
request's media items get their embeddings here, at admission, and only those the prefix
cache does not already cover (see `media_items.ItemFetcher`): the request waits, outside the
engine, until an encoder stage has answered for them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from omni.cache.block_hash import MultiModalPlaceholder
from omni.cache.encoder_cache import EncoderCache
from omni.stages.contracts.encoder import EMBEDDINGS
from omni.stages.contracts.llm import (
    CONTRACT,
    MROPE_POSITIONS,
    GenerateRequest,
    LLMStats,
    TokenUpdate,
    item_tensor,
)
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.engine import LLMEngine
from omni.stages.llm.media_items import ItemFetcher, call_id_counter
from omni.stages.llm.mm_inputs import MultiModalInputs
from omni.stages.llm.models.loader import check_shardable
from omni.stages.llm.outputs import RequestOutput
from omni.stages.runtime.options import field_types, parse_option, parse_options
from omni.stages.runtime.worker import (
    PeerCall,
    PeerReply,
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

# The stage's own options beside the engine's: the encoder-output cache's budget.
ENCODER_CACHE_OPTION = "encoder_cache_mib"
DEFAULT_ENCODER_CACHE_MIB = 512

# Options that name the engine's model and device come from the stage's own flags.
_ENGINE_OPTIONS = {
    name: kind for name, kind in field_types(EngineConfig).items()
    if name not in ("model", "device")
}


def engine_config(options: WorkerOptions) -> EngineConfig:
    """EngineConfig from the stage's options: `--option max_num_seqs=64` and the like, each
    value parsed to the field's type."""
    model = options.model
    if not model:
        from omni.default_model import default_model_path

        model = default_model_path()
    extra = {k: v for k, v in options.extra.items() if k != ENCODER_CACHE_OPTION}
    values = parse_options(extra, _ENGINE_OPTIONS, "LLM")
    # A stage shares the machine's cores with the other stages (EngineConfig says why).
    values.setdefault("share_cpu_cores", True)
    return EngineConfig(model=model, device=options.device, **values)


@dataclass
class _Admitted:
    """What the stage keeps of a request until it finishes: enough to fetch its items again."""

    request: GenerateRequest
    tensors: dict[str, torch.Tensor]


@register_worker("llm")
class LLMWorker(StageWorker):
    @classmethod
    def check_options(cls, options: WorkerOptions) -> None:
        config = engine_config(options)
        _encoder_cache_mib(options)
        if config.tensor_parallel_size > 1:
            # A model whose heads or experts do not split fails here, not in every rank.
            check_shardable(
                config.model, config.tensor_parallel_size, config.enable_expert_parallel
            )

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.engine: LLMEngine | None = None
        cache_mib = _encoder_cache_mib(options)
        # Embeddings by item hash: an image seen before after other text (no prefix hit), or
        # whose cached blocks were evicted, needs no encoder pass.
        cache = EncoderCache(cache_mib * 1024 * 1024) if cache_mib > 0 else None
        self.items = ItemFetcher(cache, call_id_counter(f"llm-{uuid.uuid4().hex[:12]}"))
        self._admitted: dict[str, _Admitted] = {}
        # Refusals and failures, sent on the next step.
        self._immediate: list[StageOutput] = []

    def load(self) -> None:
        self.engine = LLMEngine(engine_config(self.options))
        # Blocks evicted between admission and scheduling: the engine hands such requests
        # back (take_needs_items) instead of failing them.
        self.engine.scheduler.ask_for_missing_items = True

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("the LLM worker was used before load()")
        return self.engine

    def add_request(self, request: WorkerRequest) -> None:
        try:
            spec = CONTRACT.decode_request(request.body)
            self._admit(request.request_id, spec, dict(request.inputs))
        except (ValueError, TypeError) as exc:
            self._admitted.pop(request.request_id, None)
            self._fail(request.request_id, str(exc))

    def _admit(
        self, request_id: str, spec: GenerateRequest, tensors: dict[str, torch.Tensor]
    ) -> None:
        engine = self._engine()
        self._admitted[request_id] = _Admitted(spec, tensors)
        if not spec.mm_items:
            self._start(request_id, {})
            return
        placeholders = _placeholders(spec)
        cached = engine.cached_prefix_tokens(spec.prompt_token_ids, placeholders, spec.cache_salt)
        given: dict[int, torch.Tensor] = {}
        needed = []
        for index, item in enumerate(placeholders):
            embeddings = tensors.get(item_tensor(index, EMBEDDINGS))
            if embeddings is not None:
                given[index] = embeddings
            elif item.offset + item.length > cached:
                needed.append(index)
        found = self.items.admit(request_id, spec.mm_items, tensors, needed)
        if found is not None:
            self._start(request_id, {**given, **found})
        else:
            # The rest arrive from the encoder; the given ones wait with the request.
            self._admitted[request_id].tensors.update(
                {item_tensor(i, EMBEDDINGS): t for i, t in given.items()}
            )

    def _start(self, request_id: str, embeddings: dict[int, torch.Tensor]) -> None:
        """Hand the request to the engine, its items' embeddings (None: prefix-cached) known."""
        admitted = self._admitted[request_id]
        spec = admitted.request
        mm = None
        if spec.mm_items:
            for name, tensor in admitted.tensors.items():
                index = _item_index(name, EMBEDDINGS)
                if index is not None:
                    embeddings.setdefault(index, tensor)
            mrope = admitted.tensors.get(MROPE_POSITIONS)
            mm = MultiModalInputs(
                placeholders=_placeholders(spec),
                embeddings=[embeddings.get(i) for i in range(len(spec.mm_items))],
                mrope_positions=None if mrope is None else mrope.to(torch.int64).numpy(),
                mrope_position_delta=spec.mrope_position_delta,
            )
            # Keep only what fetching the items again needs (their encoder inputs).
            admitted.tensors = {
                name: t
                for name, t in admitted.tensors.items()
                if _item_index(name, EMBEDDINGS) is None
            }
        self._engine().add_request(
            request_id, spec.prompt_token_ids, spec.sampling, mm=mm, cache_salt=spec.cache_salt
        )

    def step(self) -> list[StageOutput]:
        engine = self._engine()
        self._start_ready()
        for request_id, missing in engine.take_needs_items():
            admitted = self._admitted[request_id]
            spec = admitted.request
            try:
                found = self.items.admit(request_id, spec.mm_items, admitted.tensors, missing)
            except ValueError as exc:
                engine.abort_request(request_id)
                self._fail(request_id, str(exc))
                continue
            if found is not None:
                engine.provide_items(request_id, found)
        immediate, self._immediate = self._immediate, []
        outputs = engine.step() if engine.has_runnable_requests() else []
        for output in outputs:
            if output.finished:
                self._admitted.pop(output.request_id, None)
        return immediate + [_to_stage_output(o) for o in outputs]

    def _start_ready(self) -> None:
        """Requests whose items have arrived go to the engine (or back to it)."""
        engine = self._engine()
        ready, failed = self.items.take_finished()
        for request_id, embeddings in ready:
            if request_id in engine.scheduler.needs_items:
                engine.provide_items(request_id, embeddings)
            elif request_id in self._admitted:
                try:
                    self._start(request_id, embeddings)
                except (ValueError, TypeError) as exc:
                    self._fail(request_id, str(exc))
        for request_id, error in failed:
            engine.abort_request(request_id)
            self._fail(request_id, error)

    def _fail(self, request_id: str, error: str) -> None:
        self._admitted.pop(request_id, None)
        self._immediate.append(StageOutput(request_id=request_id, finished=True, error=error))

    def has_work(self) -> bool:
        engine = self._engine()
        return (
            bool(self._immediate)
            or self.items.has_finished
            or engine.has_new_needs_items
            or engine.has_runnable_requests()
        )

    def abort(self, request_id: str) -> None:
        self._immediate = [o for o in self._immediate if o.request_id != request_id]
        self._admitted.pop(request_id, None)
        self.items.forget(request_id)
        self._engine().abort_request(request_id)

    def take_peer_calls(self) -> tuple[list[PeerCall], list[str]]:
        return self.items.take_calls()

    def on_peer_reply(self, reply: PeerReply) -> None:
        self.items.on_reply(reply)

    def stats(self) -> LLMStats | None:
        """The scheduler's queues, KV blocks in use, the prefix cache's token counters
        (queries: prompt tokens looked up at admission; hits: those served from the cache)
        and where media items' embeddings came from."""
        engine = self.engine
        if engine is None:
            return None
        kv = engine.kv_cache
        return LLMStats(
            requests_running=len(engine.scheduler.running),
            requests_waiting=len(engine.scheduler.waiting),
            requests_encoding=self.items.num_waiting + len(engine.scheduler.needs_items),
            kv_cache_usage=kv.usage,
            kv_blocks_used=kv.pool.num_usable_blocks - kv.num_free_blocks,
            kv_blocks_total=kv.pool.num_usable_blocks,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            items_encoded=self.items.items_encoded,
            items_from_encoder_cache=self.items.items_from_cache,
        )

    def broken(self) -> str | None:
        """A tensor-parallel rank of this replica died: the replica stops whole."""
        ranks = self.engine.ranks if self.engine is not None else None
        return None if ranks is None or ranks.death is None else ranks.death

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()  # the other tensor-parallel ranks, if any
        if self.items.cache is not None:
            self.items.cache.close()


def _encoder_cache_mib(options: WorkerOptions) -> int:
    text = options.extra.get(ENCODER_CACHE_OPTION, str(DEFAULT_ENCODER_CACHE_MIB))
    value: int = parse_option(ENCODER_CACHE_OPTION, text, int)
    if value < 0:
        raise ValueError(f"option {ENCODER_CACHE_OPTION} is {value}; it must be >= 0")
    return value


def _placeholders(spec: GenerateRequest) -> list[MultiModalPlaceholder]:
    return [MultiModalPlaceholder(i.item_hash, i.offset, i.length) for i in spec.mm_items]


def _item_index(name: str, tensor: str) -> int | None:
    """i when `name` is item i's tensor `tensor`, else None."""
    if not (name.startswith("item") and name.endswith("." + tensor)):
        return None
    number = name[4 : -len(tensor) - 1]
    return int(number) if number.isdigit() else None


def _to_stage_output(output: RequestOutput) -> StageOutput:
    completion = output.outputs[0]
    update = TokenUpdate(
        text_delta=completion.text_delta,
        token_ids_delta=list(completion.token_ids_delta),
        logprobs=completion.logprobs_delta,
    )
    if output.finished:
        update = TokenUpdate(
            text_delta=completion.text_delta,
            token_ids_delta=list(completion.token_ids_delta),
            logprobs=completion.logprobs_delta,
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            prompt_tokens=len(output.prompt_token_ids),
            completion_tokens=len(completion.token_ids),
            cached_tokens=output.num_cached_tokens,
            queue_time_s=output.queue_time_s,
        )
    return StageOutput(
        request_id=output.request_id, reply=update, finished=output.finished, error=output.error
    )
