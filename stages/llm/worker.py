"""The LLM core as a stage: the engine behind the stage runtime's worker interface.

Requests are in the format of `omni.stages.llm.wire` (prompt, sampling settings, multi-modal
embeddings and M-RoPE positions, or a prefix probe). Each step returns one reply per request
that gained tokens: `data` holds `text_delta`, `token_ids_delta`, and on the last reply
`finish_reason`, `stop_reason` and usage counts; a probe's reply holds `cached_tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omni.stages.llm.config import EngineConfig
from omni.stages.llm.engine import LLMEngine
from omni.stages.llm.outputs import RequestOutput
from omni.stages.llm.wire import decode_llm_request
from omni.stages.runtime.worker import (
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def engine_config(options: WorkerOptions) -> EngineConfig:
    """EngineConfig from the stage's options: `--option max_num_seqs=64` and the like, each
    value parsed to the field's type."""
    model = options.model
    if not model:
        from omni.default_model import default_model_path

        model = default_model_path()
    kwargs: dict[str, Any] = {"model": model, "device": options.device}
    for key, text in options.extra.items():
        if key not in _ENGINE_FIELDS or key in ("model", "device"):
            raise ValueError(f"unknown LLM stage option {key!r}; known: {sorted(_ENGINE_FIELDS)}")
        kwargs[key] = _parse_option(key, text, _ENGINE_FIELDS[key].default)
    return EngineConfig(**kwargs)


def _parse_option(key: str, text: str, default: Any) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"option {key} must be true or false, got {text!r}")
        return text.lower() in ("true", "1")
    for kind in (int, float):
        if isinstance(default, kind) or default is None:
            try:
                return kind(text)
            except ValueError:
                if isinstance(default, kind):
                    raise ValueError(
                        f"option {key} must be a {kind.__name__}, got {text!r}"
                    ) from None
    return text


@register_worker("llm")
class LLMWorker(StageWorker):
    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.engine: LLMEngine | None = None
        # Answers ready without the engine (refusals, prefix probes), sent on the next step.
        self._immediate: list[StageOutput] = []

    def load(self) -> None:
        self.engine = LLMEngine(engine_config(self.options))

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("the LLM worker was used before load()")
        return self.engine

    def add_request(self, request: WorkerRequest) -> None:
        engine = self._engine()
        try:
            spec = decode_llm_request(request.inputs, request.params)
            if spec.probe:
                # The orchestrator asks before encoding: items inside the hit need no encoder.
                prompt_ids = spec.prompt if isinstance(spec.prompt, list) else []
                placeholders = spec.mm.placeholders if spec.mm is not None else ()
                cached = engine.cached_prefix_tokens(prompt_ids, placeholders, spec.cache_salt)
                self._immediate.append(
                    StageOutput(request.request_id, data={"cached_tokens": cached}, finished=True)
                )
                return
            engine.add_request(
                request.request_id,
                spec.prompt,
                spec.sampling_params,
                mm=spec.mm,
                cache_salt=spec.cache_salt,
            )
        except (ValueError, TypeError) as exc:
            self._immediate.append(
                StageOutput(request_id=request.request_id, finished=True, error=str(exc))
            )

    def step(self) -> list[StageOutput]:
        immediate, self._immediate = self._immediate, []
        engine = self._engine()
        outputs = engine.step() if engine.has_unfinished_requests() else []
        return immediate + [_to_stage_output(o) for o in outputs]

    def has_work(self) -> bool:
        return bool(self._immediate) or self._engine().has_unfinished_requests()

    def abort(self, request_id: str) -> None:
        self._immediate = [o for o in self._immediate if o.request_id != request_id]
        self._engine().abort_request(request_id)

    def stats(self) -> dict[str, float]:
        """The scheduler's queues, KV blocks in use and the prefix cache's token counters
        (queries: prompt tokens looked up at admission; hits: those served from the cache)."""
        engine = self.engine
        if engine is None:
            return {}
        kv = engine.kv_cache
        return {
            "requests_running": len(engine.scheduler.running),
            "requests_waiting": len(engine.scheduler.waiting),
            "kv_cache_usage": kv.usage,
            "kv_blocks_used": kv.pool.num_usable_blocks - kv.num_free_blocks,
            "kv_blocks_total": kv.pool.num_usable_blocks,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
        }


def _to_stage_output(output: RequestOutput) -> StageOutput:
    completion = output.outputs[0]
    data: dict[str, Any] = {
        "text_delta": completion.text_delta,
        "token_ids_delta": completion.token_ids_delta,
    }
    if output.finished:
        data.update(
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            prompt_tokens=len(output.prompt_token_ids),
            completion_tokens=len(completion.token_ids),
            cached_tokens=output.num_cached_tokens,
        )
        if output.queue_time_s is not None:
            data["queue_time_s"] = output.queue_time_s
        if completion.logprobs is not None:
            data["logprobs"] = completion.logprobs
    return StageOutput(
        request_id=output.request_id, data=data, finished=output.finished, error=output.error
    )
