"""`n` > 1: n samples of one prompt, which prefill it once.

The first sample is sent alone and its first token awaited: by then the LLM stage has
prefilled the prompt and its full KV blocks are in the prefix cache. The other n - 1 go to the
same replica (same affinity key) and find those blocks there: each prefills only the last,
partial block (the last prompt token is never served from the cache), and the blocks are
shared by reference count. `omni:prefix_cache_hits` counts the shared tokens. Each sample has
its own seed stream: with a seed, sample i uses seed + i, so a seeded request is reproducible
choice by choice, as vLLM's is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import TypeVar

from omni.multimodal.prompt import MultiModalPrompt
from omni.server.orchestrator import Orchestrator, TokenDelta
from omni.stages.contracts.sampling import SamplingParams

T = TypeVar("T")


async def start_choices(
    orch: Orchestrator,
    prompt_token_ids: list[int],
    params: SamplingParams,
    mm_prompt: MultiModalPrompt | None = None,
) -> list[AsyncIterator[TokenDelta]]:
    """The n choices' delta streams. The first one's first delta is fetched here, before any
    response starts, so that an error the stage reports at admission is still a 4xx."""
    affinity = None
    if params.n > 1:
        affinity = hashlib.blake2b(repr(prompt_token_ids).encode(), digest_size=16).hexdigest()
    first_stream = orch.generate(prompt_token_ids, params.for_sample(0), mm_prompt, affinity)
    first = await first_delta(first_stream)
    streams = [with_first(first, first_stream)]
    for index in range(1, params.n):
        streams.append(
            orch.generate(prompt_token_ids, params.for_sample(index), mm_prompt, affinity)
        )
    return streams


async def first_delta(deltas: AsyncIterator[T]) -> T | None:
    """The first delta, fetched before the response starts so that an error the stage reports
    at admission still gets its 4xx status instead of an error event inside a 200 stream."""
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await deltas.aclose()  # type: ignore[attr-defined]
        raise


async def with_first(first: T | None, deltas: AsyncIterator[T]) -> AsyncIterator[T]:
    # Closing this generator (a client that left) closes `deltas`, which aborts the request.
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]
        if first is not None:
            yield first
        async for delta in deltas:
            yield delta


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The streams' items as they come, tagged with their stream's index. One stream is
    iterated directly (no tasks: the common n = 1 path costs nothing extra); closing the merge
    closes every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):  # type: ignore[type-var]
            async for item in streams[0]:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put((index, item, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, got, error = await queue.get()
            if error is not None:
                raise error
            if got is None:
                open_streams -= 1
                continue
            yield index, got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
