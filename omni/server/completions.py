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
from omni.server.choices import merge, start_choices
from omni.server.constraints import output_constraint
from omni.server.logprobs import LogprobText, chat_content, completion_logprobs
from omni.server.orchestrator import Orchestrator, TokenDelta
from omni.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    completion_id,
    usage,
)
from omni.server.tool_calls import ToolCallStream, ToolPlan
from omni.stages.contracts.llm import TokenLogprob
from omni.stages.contracts.sampling import MAX_LOGPROBS


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def chat_completion(
    orch: Orchestrator, request: ChatCompletionRequest, http: Request
) -> Response:
    tools = ToolPlan.of(request, orch.tool_parser)
    prompt_ids, mm_prompt = await orch.prompt_for_chat_async(
        request.messages, None if tools is None else tools.template_tools()
    )
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    if not 0 <= (request.top_logprobs or 0) <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs={request.top_logprobs} must be in [0, "
                       f"{MAX_LOGPROBS}]", param="top_logprobs")
    params = orch.sampling_params(
        len(prompt_ids),
        max_tokens=request.max_completion_tokens or request.max_tokens,
        **_shared_sampling(request),
        logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        structured_outputs=output_constraint(request, tools),
    )
    header = _Header("chatcmpl", "chat.completion", orch.model_name)
    streams = await start_choices(orch, prompt_ids, params, mm_prompt)
    text_of = LogprobText(orch.tokenizer)
    if request.stream:
        if request.return_token_ids:
            raise APIError(400, "return_token_ids is served without stream", param="stream")
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _sse(_chat_chunks(header, streams, tools, text_of, include_usage))
    results = await _collect_while_connected(http, streams)
    choices = []
    for index, (text, token_ids, logprobs, last) in enumerate(results):
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish_reason = last.finish_reason
        if tools is not None:
            content, calls = tools.extract(text)
            finish_reason = tools.finish_reason(calls, finish_reason)
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [call.message() for call in calls]
        choices.append({
            "index": index,
            "message": message,
            "logprobs": {"content": chat_content(text_of, token_ids, logprobs)}
            if request.logprobs else None,
            "finish_reason": finish_reason,
            **({"token_ids": token_ids} if request.return_token_ids else {}),
        })
    extra: dict[str, Any] = {"prompt_token_ids": prompt_ids} if request.return_token_ids else {}
    return JSONResponse(header.body(choices=choices, usage=_usage(results), **extra))


async def completion(orch: Orchestrator, request: CompletionRequest, http: Request) -> Response:
    prompt_ids = orch.prompt_for_completion(request.prompt)
    params = orch.sampling_params(
        len(prompt_ids),
        max_tokens=request.max_tokens,
        **_shared_sampling(request),
        logprobs=request.logprobs,
        structured_outputs=output_constraint(request),
    )
    header = _Header("cmpl", "text_completion", orch.model_name)
    echo = ""
    if request.echo:
        echo = (
            request.prompt
            if isinstance(request.prompt, str)
            else orch.tokenizer.decode(request.prompt)
        )
    streams = await start_choices(orch, prompt_ids, params)
    text_of = LogprobText(orch.tokenizer)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _sse(
            _completion_chunks(header, echo, streams, request.logprobs, text_of, include_usage)
        )
    results = await _collect_while_connected(http, streams)
    choices = [
        {
            "index": index,
            "text": echo + text,
            "logprobs": None if request.logprobs is None else completion_logprobs(
                text_of, token_ids, logprobs, request.logprobs, len(echo)
            ),
            "finish_reason": last.finish_reason,
        }
        for index, (text, token_ids, logprobs, last) in enumerate(results)
    ]
    return JSONResponse(header.body(choices=choices, usage=_usage(results)))


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
        "logit_bias": request.logit_bias,
    }


# What a response streams: the LLM's deltas, or (answers with audio) deltas and samples.
T = TypeVar("T")
# One choice's whole answer: text, token ids, their logprobs (when asked), the last delta.
Collected = tuple[str, list[int], list[TokenLogprob], TokenDelta]


async def _collect(deltas: AsyncIterator[TokenDelta]) -> Collected:
    parts: list[str] = []
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    last = TokenDelta(text="", token_ids=[])
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            parts.append(delta.text)
            token_ids += delta.token_ids
            logprobs += delta.logprobs or ()
            last = delta
    return "".join(parts), token_ids, logprobs, last


async def _collect_while_connected(
    http: Request, streams: list[AsyncIterator[TokenDelta]]
) -> list[Collected]:
    """Every choice's `_collect`, unless the client leaves first: then the generations are
    cancelled, which aborts them in the LLM stage, instead of running to their end for
    nobody."""
    collecting = asyncio.ensure_future(asyncio.gather(*(_collect(s) for s in streams)))
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


def _usage(results: list[Collected]) -> dict[str, Any]:
    """One prompt, n completions: OpenAI counts the prompt once."""
    lasts = [last for _, _, _, last in results]
    completion_tokens = sum(last.completion_tokens for last in lasts)
    # The prompt's own cache hit: later choices also hit the blocks the first one prefilled.
    cached = min(last.cached_tokens for last in lasts)
    return usage(lasts[0].prompt_tokens, completion_tokens, cached)


async def _disconnected(http: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type=sse.MEDIA_TYPE, headers={"Cache-Control": "no-cache"}
    )


def chat_chunk(
    header: _Header,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> bytes:
    """One `chat.completion.chunk` event with one choice."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return sse.event(header.body(CHAT_CHUNK, choices=[choice]))


def chat_stream_end(
    header: _Header, last: TokenDelta | None, include_usage: bool
) -> Iterator[bytes]:
    """The events that close a one-choice chat stream: the finish reason, the usage chunk
    when asked for, then [DONE]."""
    if last is not None:
        yield chat_chunk(header, {}, last.finish_reason)
        if include_usage:
            body = last.usage()
            yield sse.event(header.body(CHAT_CHUNK, choices=[], usage=body))
    yield sse.DONE


async def _chat_chunks(
    header: _Header,
    streams: list[AsyncIterator[TokenDelta]],
    tools: ToolPlan | None,
    text_of: LogprobText,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    calls = [None if tools is None else ToolCallStream(tools) for _ in streams]
    ends: list[Collected | None] = [None] * len(streams)
    for index in range(len(streams)):
        yield chat_chunk(header, {"role": "assistant", "content": ""}, index=index)
    try:
        async for index, delta in merge(streams):
            tool_stream = calls[index]
            text = delta.text if tool_stream is None else tool_stream.feed(delta.text)
            logprobs = None
            if delta.logprobs:
                logprobs = {"content": chat_content(text_of, delta.token_ids, delta.logprobs)}
            if text or logprobs:
                yield chat_chunk(header, {"content": text}, index=index, logprobs=logprobs)
            if delta.finish_reason is not None:
                finish_reason: str | None = delta.finish_reason
                if tool_stream is not None:
                    for closing in tool_stream.finish():
                        yield chat_chunk(header, closing, index=index)
                    assert tools is not None
                    finish_reason = tools.finish_reason(tool_stream.calls, finish_reason)
                yield chat_chunk(header, {}, finish_reason, index=index)
                ends[index] = ("", [], [], delta)
    except APIError as exc:  # the stage failed after the stream began: tell the client
        yield sse.event(exc.body())
        yield sse.DONE
        return
    finished = [end for end in ends if end is not None]
    if include_usage and len(finished) == len(streams):
        yield sse.event(header.body(CHAT_CHUNK, choices=[], usage=_usage(finished)))
    yield sse.DONE


async def _completion_chunks(
    header: _Header,
    echo: str,
    streams: list[AsyncIterator[TokenDelta]],
    num_logprobs: int | None,
    text_of: LogprobText,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(index: int, text: str, delta: TokenDelta | None = None) -> bytes:
        logprobs = None
        if delta is not None and num_logprobs is not None and delta.logprobs:
            logprobs = completion_logprobs(
                text_of, delta.token_ids, delta.logprobs, num_logprobs, offsets[index]
            )
        offsets[index] += len(text)
        finish_reason = None if delta is None else delta.finish_reason
        choice = {"index": index, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        return sse.event(header.body(choices=[choice]))

    offsets = [0] * len(streams)
    ends: list[Collected] = []
    if echo:
        for index in range(len(streams)):
            yield chunk(index, echo)
    try:
        async for index, delta in merge(streams):
            if delta.text or delta.finish_reason or delta.logprobs:
                yield chunk(index, delta.text, delta)
            if delta.finish_reason is not None:
                ends.append(("", [], [], delta))
    except APIError as exc:
        yield sse.event(exc.body())
        yield sse.DONE
        return
    if include_usage and len(ends) == len(streams):
        yield sse.event(header.body(choices=[], usage=_usage(ends)))
    yield sse.DONE
