"""`POST /v1/audio/transcriptions`: OpenAI's transcription API over the speech recognition
stage (Whisper tiny.en, embedded).

A multipart form, as OpenAI's: `file` (WAV, FLAC, OGG or MP3, judged by its bytes; up to
25 MB and 600 s, heard in 30 s windows), `model` (`whisper-tiny.en`, or OpenAI's `whisper-1`,
`gpt-4o-transcribe`, `gpt-4o-mini-transcribe`, which mean it), `language` (ISO-639-1; this model
hears English), `prompt` (text the speech continues: names, spellings), `response_format`
(`json`, `text`, `srt`, `vtt`, `verbose_json` with timed segments), `temperature` (0: the
decoding is greedy), `timestamp_granularities[]` (`segment`) and `stream`. With `stream=true`
the text arrives as server-sent events as the stage hears each window:
`{"type": "transcript.text.delta", "delta": ...}` and, last, `{"type":
"transcript.text.done", "text": ...}`, as OpenAI's streamed transcriptions do. A clip heard
before (same bytes, prompt and language) is answered from the cache.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from omni.media.sniff import sniff
from omni.server import sse
from omni.server.perception import Perception
from omni.server.protocol import APIError, model_not_found
from omni.speech.whisper_convert import WHISPER_TINY_EN_NAME
from omni.stages.contracts.asr import Segment, Transcript

ROUTE = "/v1/audio/transcriptions"
ASR_MODEL_NAME = WHISPER_TINY_EN_NAME
# OpenAI's transcription model names: OpenAI clients send them, and they mean this model.
OPENAI_ASR_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAM_FORMATS = ("json", "text")
FIELDS = frozenset({"model", "language", "prompt", "response_format", "temperature", "stream",
                    "timestamp_granularities[]", "timestamp_granularities"})
_MAX_FIELD_BYTES = 64 * 1024
# OpenAI's own limit on the file.
MAX_FILE_BYTES = 25 * 1000 * 1000


@dataclass(frozen=True)
class TranscriptionRequest:
    data: bytes
    model: str
    language: str = ""
    prompt: str = ""
    response_format: str = "json"
    stream: bool = False


class TranscriptionService:
    """Checks a request's fields and answers it through `Perception`'s transcripts."""

    def __init__(self, perception: Perception, model_name: str = ASR_MODEL_NAME) -> None:
        self.perception = perception
        self.model_name = model_name

    def check_model(self, requested: str) -> None:
        if requested in (self.model_name, *OPENAI_ASR_MODELS):
            return
        raise model_not_found(
            requested,
            f"transcribes with {self.model_name!r} (OpenAI's names "
            f"{', '.join(OPENAI_ASR_MODELS)} mean it too)",
        )

    async def answer(self, request: TranscriptionRequest) -> Response:
        if request.stream:
            return StreamingResponse(
                self._events(request), media_type=sse.MEDIA_TYPE,
                headers={"Cache-Control": "no-cache"},
            )  # fmt: skip
        pieces = await self.perception.transcribe(
            request.data, "file", request.prompt, request.language
        )
        return render(pieces, request.response_format, request.language)

    async def _events(self, request: TranscriptionRequest) -> AsyncIterator[bytes]:
        texts: list[str] = []
        end_s = 0.0
        stream = self.perception.transcribe_stream(
            request.data, "file", request.prompt, request.language
        )
        try:
            async for piece in stream:
                if piece.text:
                    delta = (" " if texts else "") + piece.text
                    texts.append(piece.text)
                    yield sse.event({"type": "transcript.text.delta", "delta": delta})
                end_s = piece.end_s
        except APIError as exc:  # the stage failed after the stream began: say so
            yield sse.event(exc.body())
            return
        yield sse.event({"type": "transcript.text.done", "text": " ".join(texts),
                         "usage": _usage(end_s)})


def render(pieces: list[Transcript], response_format: str, language: str = "") -> Response:
    """The whole transcript in `response_format`."""
    text = " ".join(piece.text for piece in pieces if piece.text)
    segments = [segment for piece in pieces for segment in piece.segments]
    duration = pieces[-1].end_s if pieces else 0.0
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format == "srt":
        return PlainTextResponse(srt(segments), media_type="application/x-subrip")
    if response_format == "vtt":
        return PlainTextResponse(vtt(segments), media_type="text/vtt")
    body: dict[str, Any] = {"text": text, "usage": _usage(duration)}
    if response_format == "verbose_json":
        body = {
            "task": "transcribe",
            "language": "english" if language in ("", "en", "english") else language,
            "duration": duration,
            "text": text,
            "segments": [_verbose_segment(index, segment)
                         for index, segment in enumerate(segments)],
            "usage": _usage(duration),
        }
    return JSONResponse(body)


def _usage(seconds: float) -> dict[str, Any]:
    # OpenAI bills transcriptions by the second of audio, rounded up.
    return {"type": "duration", "seconds": math.ceil(seconds)}


def _verbose_segment(index: int, segment: Segment) -> dict[str, Any]:
    encoded = segment.text.encode()
    return {
        "id": index,
        # Where its 30 s window starts, in Whisper's 10 ms frames.
        "seek": int(segment.start // 30) * 3000,
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "temperature": 0.0,
        "compression_ratio": round(len(encoded) / len(zlib.compress(encoded)), 4),
    }


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: list[Segment]) -> str:
    return "".join(
        f"{index}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n"
        for index, s in enumerate(segments, start=1)
    )


def vtt(segments: list[Segment]) -> str:
    cues = "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n"
                   for s in segments)
    return "WEBVTT\n\n" + cues


def add_transcription_routes(
    app: FastAPI,
    service: TranscriptionService,
    max_body_bytes: int,
    read_body: Callable[[Request, int], Awaitable[bytes]],
) -> None:
    @app.post(ROUTE)
    async def transcriptions(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise APIError(415, f"{ROUTE} takes multipart/form-data with a 'file' field",
                           code="unsupported_media_type")
        body = await read_body(request, max_body_bytes)
        parsed = await read_form(request, body)
        service.check_model(parsed.model)
        return await service.answer(parsed)


async def read_form(request: Request, body: bytes) -> TranscriptionRequest:
    """The form's fields, checked; APIError(400) naming the field otherwise."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=1, max_fields=32, max_part_size=_MAX_FIELD_BYTES
        )
    except (HTTPException, MultiPartException) as exc:
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", exc))
        raise APIError(400, f"the multipart form could not be read: {detail}") from None
    try:
        fields: dict[str, str] = {}
        granularities: list[str] = []
        data: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "file":
                    raise APIError(400, f"form field {key!r} is a file; the audio goes in "
                                   "'file'", param=key)
                data = await value.read()
                continue
            if key not in FIELDS:
                raise APIError(400, f"unknown form field {key!r}; the fields are: file, "
                               f"{', '.join(sorted(FIELDS))}", param=key)
            if key.startswith("timestamp_granularities"):
                granularities.append(value)
            else:
                fields[key] = value
    finally:
        await form.close()
    return _checked(data, fields, granularities)


def _checked(data: bytes | None, fields: dict[str, str], granularities: list[str]
             ) -> TranscriptionRequest:
    if data is None:
        raise APIError(400, "the form has no 'file': attach the audio with -F file=@clip.wav",
                       param="file")
    if len(data) > MAX_FILE_BYTES:
        raise APIError(413, f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES} bytes",
                       param="file", code="request_too_large")
    kind = sniff(data)
    if kind is None or kind.kind != "audio":
        nouns = {"image": "an image file", "pdf": "a PDF file"}
        what = "empty" if not data else nouns[kind.kind] if kind else "not audio"
        raise APIError(400, f"file is {what}; send WAV, FLAC, OGG or MP3 audio (judged by its "
                       "contents)", param="file", code="invalid_media")
    if "model" not in fields:
        raise APIError(400, "model is required (for example whisper-1)", param="model")
    response_format = fields.get("response_format", "json")
    if response_format not in FORMATS:
        raise APIError(400, f"response_format {response_format!r} is not one of "
                       f"{', '.join(FORMATS)}", param="response_format")
    stream = fields.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    if stream == "true" and response_format not in STREAM_FORMATS:
        raise APIError(400, f"stream=true sends text events; response_format "
                       f"{response_format!r} cannot stream (use json or text)",
                       param="response_format")
    temperature = fields.get("temperature", "0")
    try:
        greedy = float(temperature) == 0
    except ValueError:
        raise APIError(400, f"temperature must be a number, got {temperature!r}",
                       param="temperature") from None
    if not greedy:
        raise APIError(400, f"temperature {temperature}: only 0 is served (greedy decoding)",
                       param="temperature")
    for granularity in granularities:
        if granularity != "segment":
            raise APIError(400, f"timestamp_granularities {granularity!r} is not served; "
                           "'segment' is", param="timestamp_granularities[]")
    if granularities and response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format verbose_json",
                       param="timestamp_granularities[]")
    return TranscriptionRequest(
        data=data,
        model=fields["model"],
        language=fields.get("language", ""),
        prompt=fields.get("prompt", ""),
        response_format=response_format,
        stream=stream == "true",
    )
