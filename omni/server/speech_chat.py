"""Chat completions that answer with audio: `"modalities": ["text", "audio"]`.

The LLM stage writes the answer and the speech stage speaks it, chained here in the API
process: the answer's text is cut into sentences as it streams in (`SentenceBuffer`), and each
finished sentence goes to the speech stage at once, so speaking overlaps the rest of the
generation. The reply is OpenAI's: `message.audio` with `id`, `data` (base64 of the whole
file in `audio.format`), `transcript` (the answer's text), `format` and `expires_at`; the
message's `content` is null, as OpenAI's is. With `stream: true` the chunks carry
`delta.audio`: `transcript` pieces as tokens arrive, `data` pieces (base64 of 16-bit 24 kHz
PCM) as each sentence is spoken, and a last one with `expires_at`. Streaming needs
`audio.format` "pcm16", as OpenAI's does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from omni.server import sse
from omni.server.choices import first_delta, with_first
from omni.server.completions import (
    _Header,
    _shared_sampling,
    _sse,
    chat_chunk,
    chat_stream_end,
)
from omni.server.constraints import output_constraint
from omni.server.orchestrator import Orchestrator, TokenDelta
from omni.server.protocol import APIError, ChatCompletionRequest, _OpenAIModel
from omni.server.speech_service import HTTP_SAMPLE_RATE, SpeechService
from omni.speech.audio_format import SUPPORTED_FORMATS, encode_audio, pcm16_bytes
from omni.speech.sentences import SentenceBuffer

# OpenAI's chat audio formats -> omni's response formats.
CHAT_AUDIO_FORMATS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "opus": "opus", "pcm16": "pcm"}
# OpenAI keeps a reply's audio for an hour so a later turn can refer to it by id; omni keeps
# nothing, but reports the same field so clients that read it work.
AUDIO_EXPIRES_S = 3600


class ChatAudioOutput(_OpenAIModel):
    voice: str | None = None
    format: str | None = None


class AudioChatCompletionRequest(ChatCompletionRequest):
    """A chat request that may ask for audio; without `modalities` it is a plain one."""

    modalities: list[Literal["text", "audio"]] | None = None
    audio: ChatAudioOutput | None = None

    def wants_audio(self) -> bool:
        return bool(self.modalities) and "audio" in (self.modalities or [])


@dataclass(frozen=True)
class _Ended:
    error: BaseException | None = None


async def chat_completion_with_audio(
    orch: Orchestrator,
    service: SpeechService | None,
    request: AudioChatCompletionRequest,
    http: Request,
) -> Response:
    if service is None:
        raise APIError(
            400,
            "this server runs no speech stage, so it cannot answer with audio; start "
            "omni serve with espeak-ng installed, or with --speech-model PATH",
            param="modalities",
        )
    audio = request.audio or ChatAudioOutput()
    chat_format = audio.format or ("pcm16" if request.stream else "wav")
    response_format = CHAT_AUDIO_FORMATS.get(chat_format)
    if response_format is None or response_format not in SUPPORTED_FORMATS:
        served = [k for k, v in CHAT_AUDIO_FORMATS.items() if v in SUPPORTED_FORMATS]
        raise APIError(
            400,
            f"audio.format {chat_format!r} is not supported; supported: {', '.join(served)}",
            param="audio.format",
        )
    if request.stream and chat_format != "pcm16":
        raise APIError(
            400,
            f"audio.format is {chat_format!r}, but a streamed audio answer must be 'pcm16'",
            param="audio.format",
        )
    for param, asked in (
        ("logprobs", request.logprobs),
        ("n", request.n != 1),
        ("tools", bool(request.tools)),
        ("response_format", output_constraint(request) is not None),
    ):
        if asked:
            raise APIError(400, f"{param} with audio output is not supported", param=param)
    try:
        await service.check_voice(audio.voice)
    except APIError as exc:
        if exc.param == "voice":
            exc.param = "audio.voice"
        raise
    prompt_ids, mm_prompt = await orch.prompt_for_chat_async(request.messages)
    params = orch.sampling_params(
        len(prompt_ids),
        max_tokens=request.max_completion_tokens or request.max_tokens,
        **_shared_sampling(request),
    )
    header = _Header("chatcmpl", "chat.completion", orch.model_name)
    events = spoken_answer(service, orch.generate(prompt_ids, params, mm_prompt), audio.voice)
    audio_id = f"audio_{uuid.uuid4().hex}"
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        first = await first_delta(events)
        return _sse(_audio_chunks(header, audio_id, first, events, include_usage))
    texts: list[str] = []
    parts: list[np.ndarray] = []
    last = TokenDelta(text="", token_ids=[])
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, TokenDelta):
                texts.append(event.text)
                last = event
            else:
                parts.append(event)
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    message = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "audio": {
            "id": audio_id,
            "data": base64.b64encode(
                encode_audio(samples, HTTP_SAMPLE_RATE, response_format)
            ).decode(),
            "expires_at": int(time.time()) + AUDIO_EXPIRES_S,
            "transcript": "".join(texts),
            "format": chat_format,
        },
    }
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}
    return JSONResponse(header.body(choices=[choice], usage=last.usage()))


async def spoken_answer(
    service: SpeechService, deltas: AsyncIterator[TokenDelta], voice: str | None
) -> AsyncIterator[TokenDelta | np.ndarray]:
    """The LLM's deltas as they come, interleaved with each sentence's samples (24 kHz) as the
    speech stage finishes it; sentences are spoken in order. Closing this early aborts both
    the LLM request and the speech request in flight."""
    events: asyncio.Queue[TokenDelta | np.ndarray | _Ended] = asyncio.Queue()
    sentences: asyncio.Queue[str | None] = asyncio.Queue()

    async def read_text() -> None:
        buffer = SentenceBuffer()
        async for delta in deltas:
            await events.put(delta)
            for sentence in buffer.feed(delta.text):
                sentences.put_nowait(sentence)
        for sentence in buffer.flush():
            sentences.put_nowait(sentence)
        sentences.put_nowait(None)

    async def speak() -> None:
        while (sentence := await sentences.get()) is not None:
            params = service.params(input=sentence, voice=voice)
            async for samples, _ in service.samples(params):
                await events.put(samples)

    async def run(work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:  # handed to the consumer, which raises it
            await events.put(_Ended(exc))
        else:
            await events.put(_Ended())

    tasks = [asyncio.ensure_future(run(read_text())), asyncio.ensure_future(run(speak()))]
    running = len(tasks)
    try:
        while running:
            event = await events.get()
            if isinstance(event, _Ended):
                if event.error is not None:
                    raise event.error
                running -= 1
            else:
                yield event
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await deltas.aclose()  # type: ignore[attr-defined]


async def _audio_chunks(
    header: _Header,
    audio_id: str,
    first: TokenDelta | np.ndarray | None,
    events: AsyncIterator[TokenDelta | np.ndarray],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def audio(**fields: Any) -> bytes:
        return chat_chunk(header, {"audio": {"id": audio_id, **fields}})

    yield chat_chunk(header, {"role": "assistant", "content": None})
    last: TokenDelta | None = None
    try:
        async for event in with_first(first, events):
            if isinstance(event, TokenDelta):
                last = event
                if event.text:
                    yield audio(transcript=event.text)
            else:
                yield audio(data=base64.b64encode(pcm16_bytes(event)).decode())
    except APIError as exc:  # a stage failed after the stream began: tell the client
        yield sse.event(exc.body())
        yield sse.DONE
        return
    yield audio(expires_at=int(time.time()) + AUDIO_EXPIRES_S)
    for closing in chat_stream_end(header, last, include_usage):
        yield closing
