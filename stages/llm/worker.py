"""The LLM core as a stage: the engine behind the stage runtime's worker interface.

A request carries its prompt as `params["prompt"]` (text) or an int tensor input
`prompt_token_ids`, and its sampling settings as `params["sampling"]` (SamplingParams fields).
Each step returns one reply per request that gained tokens: `data` holds `text_delta`,
`token_ids_delta`, and on the last reply `finish_reason`, `stop_reason` and usage counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omni.stages.llm.config import EngineConfig
from omni.stages.llm.engine import LLMEngine
from omni.stages.llm.outputs import RequestOutput
from omni.stages.llm.sampling_params import SamplingParams
from omni.stages.runtime.worker import (
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


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


def sampling_params(params: dict[str, Any]) -> SamplingParams:
    fields = params.get("sampling") or {}
    unknown = sorted(set(fields) - _SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unknown sampling parameters {unknown}")
    return SamplingParams(**fields)


@register_worker("llm")
class LLMWorker(StageWorker):
    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.engine: LLMEngine | None = None
        # Requests refused at admission: answered with an error on the next step.
        self._refused: list[StageOutput] = []

    def load(self) -> None:
        self.engine = LLMEngine(engine_config(self.options))

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("the LLM worker was used before load()")
        return self.engine

    def add_request(self, request: WorkerRequest) -> None:
        engine = self._engine()
        try:
            params = dict(request.params)
            if "prompt_token_ids" in request.inputs:
                prompt: str | list[int] = request.inputs["prompt_token_ids"].flatten().tolist()
            elif isinstance(params.get("prompt"), str):
                prompt = params["prompt"]
            else:
                raise ValueError("a request needs params['prompt'] (text) or prompt_token_ids")
            engine.add_request(
                request.request_id,
                prompt,
                sampling_params(params),
                cache_salt=params.get("cache_salt"),
            )
        except (ValueError, TypeError) as exc:
            self._refused.append(
                StageOutput(request_id=request.request_id, finished=True, error=str(exc))
            )

    def step(self) -> list[StageOutput]:
        refused, self._refused = self._refused, []
        engine = self._engine()
        outputs = engine.step() if engine.has_unfinished_requests() else []
        return refused + [_to_stage_output(o) for o in outputs]

    def has_work(self) -> bool:
        return bool(self._refused) or self._engine().has_unfinished_requests()

    def abort(self, request_id: str) -> None:
        self._refused = [o for o in self._refused if o.request_id != request_id]
        self._engine().abort_request(request_id)


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
        if completion.logprobs is not None:
            data["logprobs"] = completion.logprobs
    return StageOutput(
        request_id=output.request_id, data=data, finished=output.finished, error=output.error
    )
