"""Async reply streams: replies delivered from another thread arrive whole and in order, and a
burst wakes the event loop once rather than once per reply."""

from __future__ import annotations

import asyncio
import threading

from omni.supervision.streams import AsyncReplyStream, Reply


def test_bursts_from_a_thread_arrive_in_order_with_one_wake_up_each() -> None:
    async def scenario() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        schedule = loop.call_soon_threadsafe

        def counting(callback, *args):  # type: ignore[no-untyped-def]
            nonlocal wake_ups
            wake_ups += 1
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        streams = [AsyncReplyStream(f"r{i}", lambda _id: None) for i in range(3)]

        def burst(first: int, count: int, finished: bool) -> None:
            for step in range(first, first + count):
                for stream in streams:
                    last = finished and step == first + count - 1
                    stream.deliver(
                        Reply(stream.request_id, "replica", body=bytes([step]), finished=last)
                    )

        # Two bursts from the I/O-thread side, the loop not running in between: then a third
        # after the first two were taken.
        sender = threading.Thread(target=burst, args=(0, 4, False))
        sender.start()
        sender.join()
        burst(4, 2, False)
        await asyncio.sleep(0)
        third = threading.Thread(target=burst, args=(6, 3, True))
        third.start()
        third.join()
        steps = [[(await reply).body[0] for reply in _replies(s)] for s in streams]
        return steps, wake_ups

    steps, wake_ups = asyncio.run(scenario())
    assert steps == [list(range(9))] * 3
    assert wake_ups == 2


def _replies(stream: AsyncReplyStream):  # type: ignore[no-untyped-def]
    while not stream.done:
        yield stream.next()


def test_a_finished_event_loop_leaves_no_inbox_behind() -> None:
    import gc

    from omni.supervision.streams import _inboxes

    async def open_stream() -> None:
        AsyncReplyStream("r0", lambda _id: None)

    gc.collect()  # loops of earlier tests
    before = len(_inboxes)
    asyncio.run(open_stream())
    gc.collect()
    assert len(_inboxes) == before
