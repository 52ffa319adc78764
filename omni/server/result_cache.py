"""A bounded, content-addressed cache of perception results (OCR text, transcripts) for one API
process, with one computation per key in flight: a page or clip asked for again, or by eight
requests at once, is read once."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ResultCache(Generic[T]):
    """Least recently used first out, `max_entries` at most (0 keeps nothing)."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries is {max_entries}; it must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[T]] = {}
        # Lookups and the ones answered without computing (for /metrics).
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> T | None:
        self.queries += 1
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: str, value: T) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """The cached value, the value another caller is computing, or `compute()`'s (kept).
        A failure is not kept: every waiter gets it, and the next caller tries again."""
        cached = self.get(key)
        if cached is not None:
            return cached
        while (running := self._in_flight.get(key)) is not None:
            try:
                value = await asyncio.shield(running)
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this caller was cancelled, not the computation
                continue  # the computing caller left: compute it here instead
            self.hits += 1
            return value
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            value = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: there may be no waiter
            raise
        finally:
            del self._in_flight[key]
        future.set_result(value)
        self.put(key, value)
        return value
