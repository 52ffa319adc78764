"""Replies of one stage request, delivered from the router's I/O thread to the caller.

`ReplyStream` is iterated from ordinary threads, `AsyncReplyStream` from asyncio code; both end
after the reply marked `finished`, or raise a `StageFailure` that says what went wrong.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from omni.transport.shm import SharedTensorHandle


class StageFailure(RuntimeError):
    """A stage request did not complete."""


class ReplicaLostError(StageFailure):
    """The replica serving the request died, went silent or left."""


class NoReplicaError(StageFailure):
    """No live replica of the role took the request in time (or the queue was full)."""


class StageRequestError(StageFailure):
    """The stage ran the request and reported an error."""

    def __init__(self, message: str, stage_message: str | None = None) -> None:
        super().__init__(message)
        # The stage's own words (which name the item and its limit), without the router's
        # "<replica> failed request <id>: " in front: what an API answers its client.
        self.stage_message = message if stage_message is None else stage_message


class RequestAbortedError(StageFailure):
    """The request was aborted by its caller."""


@dataclass(frozen=True)
class Reply:
    """One reply: tensors (shared-memory ones already mapped), the role's reply struct as
    msgpack (`body`, decoded with the role's contract), and whether it ends."""

    request_id: str
    replica_id: str
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    body: bytes = b""
    finished: bool = False
    # The shared-memory handles behind some of `tensors`, for forwarding to another stage.
    handles: Mapping[str, SharedTensorHandle] = field(default_factory=dict)


Item = Reply | StageFailure


class _StreamBase:
    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self.done = False

    def abort(self) -> None:
        """Stop the request; the stage is told and its shared memory released."""
        if not self.done:
            self.done = True
            self._abort(self.request_id)

    def _after(self, item: Item) -> Reply:
        if isinstance(item, StageFailure):
            self.done = True
            raise item
        if item.finished:
            self.done = True
        return item

    def deliver(self, item: Item) -> None:  # called from the router's I/O thread
        raise NotImplementedError


class ReplyStream(_StreamBase):
    """Blocking iterator over the replies of one request."""

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        super().__init__(request_id, abort)
        self._queue: queue.SimpleQueue[Item] = queue.SimpleQueue()

    def deliver(self, item: Item) -> None:
        self._queue.put(item)

    def next(self, timeout: float | None = None) -> Reply:
        """The next reply; TimeoutError after `timeout` seconds; StopIteration once finished."""
        if self.done:
            raise StopIteration
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no reply for request {self.request_id} within {timeout} s"
            ) from None
        return self._after(item)

    def __iter__(self) -> Iterator[Reply]:
        return self

    def __next__(self) -> Reply:
        return self.next()

    def result(self, timeout: float | None = None) -> list[Reply]:
        """Every reply up to the finished one, waiting at most `timeout` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        while not self.done:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            replies.append(self.next(left))
        return replies


class _LoopInbox:
    """Replies bound for one event loop's streams, handed over in one wake-up per burst.

    A stage answers every running request on each step, so the router's I/O thread delivers
    many replies at once; a `call_soon_threadsafe` each would wake the loop (a pipe write and
    a lock) once per streamed token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: `_inboxes` maps each loop to its inbox, and a value that held its key would
        # keep both alive after the loop is gone.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Item], Item]] = []

    def put(self, target: asyncio.Queue[Item], item: Item) -> None:
        with self._lock:
            self._pending.append((target, item))
            if len(self._pending) > 1:
                return  # a drain is already scheduled and has not run yet
        loop = self._loop()
        if loop is not None:  # else nobody is left to read the reply
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for target, item in pending:
            target.put_nowait(item)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox] = (
    weakref.WeakKeyDictionary()
)


class AsyncReplyStream(_StreamBase):
    """Async iterator over the replies of one request; create it inside the event loop."""

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        super().__init__(request_id, abort)
        loop = asyncio.get_running_loop()
        inbox = _inboxes.get(loop)
        if inbox is None:
            inbox = _inboxes[loop] = _LoopInbox(loop)
        self._inbox = inbox
        self._queue: asyncio.Queue[Item] = asyncio.Queue()

    def deliver(self, item: Item) -> None:
        self._inbox.put(self._queue, item)

    async def next(self, timeout: float | None = None) -> Reply:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no reply for request {self.request_id} within {timeout} s"
            ) from None
        return self._after(item)

    def __aiter__(self) -> AsyncIterator[Reply]:
        return self

    async def __anext__(self) -> Reply:
        return await self.next()

    async def result(self, timeout: float | None = None) -> list[Reply]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        replies = []
        while not self.done:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            replies.append(await self.next(left))
        return replies
