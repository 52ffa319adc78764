"""`POST /v1/audio/speech`: OpenAI's speech API over the speech stage.

Served when `omni serve` runs a speech stage (the default voice, espeak-ng, unless
`--no-speech`; or `--speech-model PATH`). The body takes OpenAI's fields: `model` (the voice
model's name, or OpenAI's `tts-1`, `tts-1-hd`, `gpt-4o-mini-tts`), `input` (at most 4096
characters), `voice`, `response_format` (`wav`, `flac`, `pcm`, and `mp3` / `opus` where
libsndfile has them; `aac` is refused), `speed` (0.25 to 4.0, or what the voice allows) and
`stream_format` ("audio"; "sse" is refused). omni adds `seed`. All audio is 24 kHz mono, as
OpenAI's is.

`pcm` streams: each sentence's samples are sent as soon as the stage has them. The other
formats are whole files whose headers hold the length, sent once the last sentence is ready.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import msgspec
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from omni.server.app import AppSettings, parse_body
from omni.server.protocol import APIError, _OpenAIModel
from omni.server.speech_service import SpeechService
from omni.speech.audio_format import MEDIA_TYPES, SUPPORTED_FORMATS, pcm16_bytes
from omni.stages.contracts.speech import ENCODED_OUTPUT, SpeechParams
from omni.supervision.streams import Reply

# OpenAI's default response_format, where this build can write it.
DEFAULT_FORMAT = "mp3" if "mp3" in SUPPORTED_FORMATS else "wav"


class SpeechRequest(_OpenAIModel):
    model: str | None = None
    input: str
    voice: str | None = None
    response_format: str = DEFAULT_FORMAT
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str | None = None
    # omni's extra.
    seed: int = 0


def speech_params(service: SpeechService, request: SpeechRequest) -> SpeechParams:
    service.check_model(request.model)
    if request.stream_format != "audio":
        raise APIError(
            400,
            f"stream_format {request.stream_format!r} is not served; use 'audio'",
            param="stream_format",
        )
    if request.instructions:
        # Ignoring it would change the answer the client asked for, so say so.
        raise APIError(
            400,
            f"instructions are not supported by the voice model {service.model_name!r}",
            param="instructions",
        )
    return service.params(
        input=request.input,
        voice=request.voice,
        response_format=request.response_format,
        speed=request.speed,
        seed=request.seed,
    )


async def speak(service: SpeechService, request: SpeechRequest) -> Response:
    params = speech_params(service, request)
    media_type = MEDIA_TYPES[request.response_format]
    if request.response_format == "pcm":
        # Samples only (no file at the end); the first sentence is awaited before the
        # response starts, so a refusal (unknown voice) is still a 4xx.
        chunks = service.samples(msgspec.structs.replace(params, response_format=None))
        try:
            first, _ = await chunks.__anext__()
        except BaseException:
            await chunks.aclose()
            raise
        return StreamingResponse(_pcm_stream(first, chunks), media_type=media_type)
    encoded = b""
    async for _, reply in service.samples(params):
        if reply.finished:
            encoded = reply.tensors[ENCODED_OUTPUT].numpy().tobytes()
    return Response(encoded, media_type=media_type)


async def _pcm_stream(
    first: np.ndarray, chunks: AsyncGenerator[tuple[np.ndarray, Reply], None]
) -> AsyncIterator[bytes]:
    # Closing this generator (a client that left) closes `chunks`, which aborts the request.
    try:
        yield pcm16_bytes(first)
        async for samples, _ in chunks:
            yield pcm16_bytes(samples)
    finally:
        await chunks.aclose()


def add_speech_routes(app: FastAPI, service: SpeechService, settings: AppSettings) -> None:
    """Serve `POST /v1/audio/speech` on an app from `build_app`, and let its chat route
    answer with audio (it finds the service on `app.state.speech`)."""
    app.state.speech = service

    @app.post("/v1/audio/speech")
    async def create_speech(request: Request) -> Response:
        parsed = await parse_body(request, SpeechRequest, settings)
        return await speak(service, parsed)
