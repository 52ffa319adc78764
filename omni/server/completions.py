"""The two generation endpoints' bodies: chat completions and text completions, whole or as
server-sent events in OpenAI's chunk format."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from omni.server import sse
from omni.server.orchestrator import Orchestrator, TokenDelta
from omni.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    completion_id,
)


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def chat_completion(
    orch: Orchestrator, request: ChatCompletionRequest, http: Request
) -> Response:
    prompt_ids, mm_prompt = await orch.prompt_for_chat_async(request.messages)
    if request.top_logprobs:
        raise APIError(400, "top_logprobs > 0 is not supported yet", param="top_logprobs")
    if request.logprobs and request.stream:
        raise APIError(400, "logprobs with stream=true is not supported yet", param="logprobs")
    params = orch.sampling_params(
        len(prompt_ids),
        max_tokens=request.max_completion_tokens or request.max_tokens,
        **_shared_sampling(request),
        logprobs=0 if request.logprobs else None,
    )
    header = _Header("chatcmpl", "chat.completion", orch.model_name)
    deltas = orch.generate(prompt_ids, params, mm_prompt)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        first = await _first(deltas)
        return _sse(_chat_chunks(header, first, deltas, include_usage))
    text, token_ids, last = await _collect_while_connected(http, deltas)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": _chat_logprobs(orch, token_ids, last) if request.logprobs else None,
        "finish_reason": last.finish_reason,
    }
    return JSONResponse(header.body(choices=[choice], usage=last.usage()))


async def completion(orch: Orchestrator, request: CompletionRequest, http: Request) -> Response:
    prompt_ids = orch.prompt_for_completion(request.prompt)
    if request.logprobs:
        raise APIError(400, "logprobs > 0 (alternatives) is not supported yet", param="logprobs")
    if request.logprobs is not None and request.stream:
        raise APIError(400, "logprobs with stream=true is not supported yet", param="logprobs")
    params = orch.sampling_params(
        len(prompt_ids),
        max_tokens=request.max_tokens,
        **_shared_sampling(request),
        logprobs=request.logprobs,
    )
    header = _Header("cmpl", "text_completion", orch.model_name)
    echo = ""
    if request.echo:
        echo = (
            request.prompt
            if isinstance(request.prompt, str)
            else orch.tokenizer.decode(request.prompt)
        )
    deltas = orch.generate(prompt_ids, params)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        first = await _first(deltas)
        return _sse(_completion_chunks(header, echo, first, deltas, include_usage))
    text, token_ids, last = await _collect_while_connected(http, deltas)
    logprobs = None
    if request.logprobs is not None:
        tokens = [orch.tokenizer.decode([t]) for t in token_ids]
        logprobs = {
            "tokens": tokens,
            "token_logprobs": last.logprobs or [],
            "top_logprobs": None,
            "text_offset": _offsets(tokens, len(echo)),
        }
    choice = {
        "index": 0,
        "text": echo + text,
        "logprobs": logprobs,
        "finish_reason": last.finish_reason,
    }
    return JSONResponse(header.body(choices=[choice], usage=last.usage()))


# ---- helpers --------------------------------------------------------------------------------

CHAT_CHUNK = "chat.completion.chunk"


class _Header:
    """id, object, created and model: the same on every chunk of one response."""

    def __init__(self, prefix: str, kind: str, model: str) -> None:
        self.id = completion_id(prefix)
        self.kind = kind
        self.created = int(time.time())
        self.model = model

    def body(self, kind: str | None = None, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind or self.kind,
            "created": self.created,
            "model": self.model,
            **fields,
        }


def _shared_sampling(request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    return {
        "n": request.n,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": request.stop,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
        "min_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
        "stop_token_ids": request.stop_token_ids,
    }


# What a response streams: the LLM's deltas, or (answers with audio) deltas and samples.
T = TypeVar("T")


async def _first(deltas: AsyncIterator[T]) -> T | None:
    """The first delta, fetched before the response starts so that an error the stage reports
    at admission still gets its 4xx status instead of an error event inside a 200 stream."""
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await deltas.aclose()  # type: ignore[attr-defined]
        raise


async def _collect(deltas: AsyncIterator[TokenDelta]) -> tuple[str, list[int], TokenDelta]:
    parts: list[str] = []
    token_ids: list[int] = []
    last = TokenDelta(text="", token_ids=[])
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            parts.append(delta.text)
            token_ids += delta.token_ids
            last = delta
    return "".join(parts), token_ids, last


async def _collect_while_connected(
    http: Request, deltas: AsyncIterator[TokenDelta]
) -> tuple[str, list[int], TokenDelta]:
    """`_collect`, unless the client leaves first: then the generation is cancelled, which
    aborts the request in the LLM stage, instead of running to its end for nobody."""
    collecting = asyncio.ensure_future(_collect(deltas))
    watching = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if collecting.done():
        return collecting.result()
    collecting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collecting
    raise ClientGone


async def _disconnected(http: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type=sse.MEDIA_TYPE, headers={"Cache-Control": "no-cache"}
    )


async def _with_first(first: T | None, deltas: AsyncIterator[T]) -> AsyncIterator[T]:
    # Closing this generator (a client that left) closes `deltas`, which aborts the request.
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]
        if first is not None:
            yield first
        async for delta in deltas:
            yield delta


def chat_chunk(header: _Header, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    """One `chat.completion.chunk` event with one choice."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return sse.event(header.body(CHAT_CHUNK, choices=[choice]))


def chat_stream_end(
    header: _Header, last: TokenDelta | None, include_usage: bool
) -> Iterator[bytes]:
    """The events that close a chat stream: the finish reason, the usage chunk when asked
    for, then [DONE]."""
    if last is not None:
        yield chat_chunk(header, {}, last.finish_reason)
        if include_usage:
            body = last.usage()
            yield sse.event(header.body(CHAT_CHUNK, choices=[], usage=body))
    yield sse.DONE


async def _chat_chunks(
    header: _Header,
    first: TokenDelta | None,
    deltas: AsyncIterator[TokenDelta],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    yield chat_chunk(header, {"role": "assistant", "content": ""})
    last: TokenDelta | None = None
    try:
        async for delta in _with_first(first, deltas):
            last = delta
            if delta.text:
                yield chat_chunk(header, {"content": delta.text})
    except APIError as exc:  # the stage failed after the stream began: tell the client
        yield sse.event(exc.body())
        yield sse.DONE
        return
    for closing in chat_stream_end(header, last, include_usage):
        yield closing


async def _completion_chunks(
    header: _Header,
    echo: str,
    first: TokenDelta | None,
    deltas: AsyncIterator[TokenDelta],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(text: str, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return sse.event(header.body(choices=[choice]))

    if echo:
        yield chunk(echo)
    last: TokenDelta | None = None
    try:
        async for delta in _with_first(first, deltas):
            last = delta
            if delta.text or delta.finish_reason:
                yield chunk(delta.text, delta.finish_reason)
    except APIError as exc:
        yield sse.event(exc.body())
        yield sse.DONE
        return
    if last is not None and include_usage:
        body = last.usage()
        yield sse.event(header.body(choices=[], usage=body))
    yield sse.DONE


def _chat_logprobs(orch: Orchestrator, token_ids: list[int], last: TokenDelta) -> dict[str, Any]:
    content = []
    for token_id, logprob in zip(token_ids, last.logprobs or [], strict=False):
        token = orch.tokenizer.decode([token_id])
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [],
            }
        )
    return {"content": content}


def _offsets(tokens: list[str], start: int) -> list[int]:
    offsets = []
    for token in tokens:
        offsets.append(start)
        start += len(token)
    return offsets
