"""Shared-memory tensor handoff: ownership, reuse, release paths and sweeping."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from omni.transport.shm import (
    SharedTensorHandle,
    SharedTensorPool,
    SharedTensorReader,
    StaleHandleError,
    list_segments,
    sweep_dead_owners,
)

PREFIX = f"omnitest{os.getpid()}_"


@pytest.fixture
def pool() -> SharedTensorPool:
    with SharedTensorPool(prefix=PREFIX, max_bytes=16 * 1024**2) as pool:
        yield pool
    assert list_segments(PREFIX) == []


@pytest.fixture
def reader() -> SharedTensorReader:
    reader = SharedTensorReader(prefix=PREFIX)
    yield reader
    reader.close()


def _page(rows: int = 252, cols: int = 358) -> torch.Tensor:
    return (torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) / 7).to(
        torch.bfloat16
    )


def test_handoff_is_exact_and_zero_copy(pool: SharedTensorPool, reader: SharedTensorReader) -> None:
    page = _page()
    handle = pool.put(page.t())  # non-contiguous input is laid out contiguously
    assert handle is not None
    assert (handle.dtype, handle.shape, handle.nbytes) == ("bfloat16", [358, 252], 252 * 358 * 2)
    first = reader.open(handle)
    second = reader.open(handle)
    assert torch.equal(first, page.t())
    assert first.data_ptr() == second.data_ptr()  # both views of the one mapping
    assert reader.release(handle) is True
    assert reader.release(handle) is False  # one reader, one release
    assert list_segments(PREFIX) == [handle.segment]


def test_copy_out_gives_copies_and_releases_each_share(
    pool: SharedTensorPool, reader: SharedTensorReader
) -> None:
    page = _page()
    handles = {"page": pool.put(page), "ids": pool.put(torch.arange(5))}
    assert None not in handles.values()
    copies = reader.copy_out(handles)  # type: ignore[arg-type]
    assert torch.equal(copies["page"], page) and copies["ids"].tolist() == [0, 1, 2, 3, 4]
    for handle in handles.values():
        assert handle is not None
        assert reader.release(handle) is False  # already given back
    # Both segments are free again: the next tensor reuses one, and the copies stay intact.
    reused = pool.put(torch.zeros(5, dtype=torch.int64))
    assert reused is not None and reused.segment in {h.segment for h in handles.values() if h}
    assert torch.equal(copies["page"], page) and copies["ids"].tolist() == [0, 1, 2, 3, 4]


def test_segment_is_reused_only_after_last_reader(
    pool: SharedTensorPool, reader: SharedTensorReader
) -> None:
    first = pool.put(torch.ones(1000), readers=2)
    assert first is not None
    busy = pool.put(torch.ones(1000))
    assert busy is not None and busy.segment != first.segment
    reader.release(first)
    still_held = pool.put(torch.ones(10))
    assert still_held is not None and still_held.segment not in (first.segment,)
    reader.release(first)
    reused = pool.put(torch.full((7,), 3, dtype=torch.int64))
    assert reused is not None
    assert (reused.segment, reused.generation) == (first.segment, 2)
    assert reader.open(reused).tolist() == [3] * 7
    with pytest.raises(StaleHandleError, match="already released"):
        reader.open(first)
    assert reader.release(first) is False  # a late release of the old generation is ignored
    assert len(pool.segment_names()) == 3


def test_discard_frees_for_every_reader(pool: SharedTensorPool, reader: SharedTensorReader) -> None:
    handle = pool.put(torch.ones(100), readers=3)
    assert handle is not None
    assert reader.discard(handle) is True
    again = pool.put(torch.zeros(100))
    assert again is not None and again.segment == handle.segment


def test_release_on_gc_waits_for_every_view(
    pool: SharedTensorPool, reader: SharedTensorReader
) -> None:
    handle = pool.put(torch.arange(100, dtype=torch.int32))
    assert handle is not None
    tensor = reader.open(handle, release_on_gc=True)
    view = tensor[10:12]
    del tensor
    gc.collect()
    assert reader.release_deferred() == 0
    other = pool.put(torch.ones(100))
    assert other is not None and other.segment != handle.segment  # view still holds it
    assert view.tolist() == [10, 11]
    del view
    gc.collect()
    assert reader.release_deferred() == 1
    reused = pool.put(torch.ones(100))
    assert reused is not None and reused.segment == handle.segment


def test_pool_limit_evicts_free_segments_then_refuses(reader: SharedTensorReader) -> None:
    two_mib = 2 * 1024**2
    with SharedTensorPool(prefix=PREFIX, max_bytes=2 * two_mib) as pool:
        a = pool.put(torch.ones(1000))
        b = pool.put(torch.ones(1000))
        assert a is not None and b is not None
        assert pool.put(torch.ones(1000)) is None  # both held: no room
        reader.release(a)
        big = pool.put(torch.ones(two_mib // 4 + 1))  # needs 4 MiB: evicts free `a`, not `b`
        assert big is None  # `b` still holds 2 MiB, so 4 MiB cannot fit
        reader.release(b)
        big = pool.put(torch.ones(two_mib // 4 + 1))
        assert big is not None
        assert pool.segment_names() == [big.segment]
        assert list_segments(PREFIX) == [big.segment]
    assert list_segments(PREFIX) == []


def test_reader_rejects_foreign_names_and_bad_shapes(
    pool: SharedTensorPool, reader: SharedTensorReader
) -> None:
    handle = pool.put(torch.ones(4))
    assert handle is not None
    foreign = SharedTensorHandle(
        segment="other_1_ab", generation=1, dtype="uint8", shape=[1], nbytes=1
    )
    with pytest.raises(ValueError, match="not a shared tensor segment"):
        reader.open(foreign)
    lying = SharedTensorHandle(
        segment=handle.segment, generation=1, dtype="float32", shape=[5], nbytes=16
    )
    with pytest.raises(ValueError, match="shape \\[5\\] \\(20 bytes\\) but 16 bytes"):
        reader.open(lying)
    with pytest.raises(ValueError, match="empty tensor"):
        pool.put(torch.ones(0))


def test_sweep_removes_segments_of_a_killed_owner() -> None:
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from omni.transport.shm import SharedTensorPool
        pool = SharedTensorPool(prefix={PREFIX!r})
        print(pool.put(torch.ones(10)).segment, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        name = child.stdout.readline().strip()
        assert name.startswith(f"{PREFIX}{child.pid}_")
        assert sweep_dead_owners(PREFIX) == []  # owner alive: untouched
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert list_segments(PREFIX) == [name]  # a killed owner leaves it behind...
        assert sweep_dead_owners(PREFIX) == [name]  # ...and the sweep takes it
        assert list_segments(PREFIX) == []
    finally:
        child.kill()
        child.wait()


def test_allocate_lets_a_producer_write_in_place(
    pool: SharedTensorPool, reader: SharedTensorReader
) -> None:
    allocated = pool.allocate([3, 5], torch.bfloat16)
    assert allocated is not None
    tensor, handle = allocated
    tensor.copy_(torch.arange(15, dtype=torch.bfloat16).view(3, 5))
    assert (handle.shape, handle.dtype, handle.nbytes) == ([3, 5], "bfloat16", 30)
    seen = reader.open(handle)
    assert seen.tolist() == torch.arange(15).view(3, 5).tolist()
    assert seen.data_ptr() != tensor.data_ptr()  # the reader's own mapping of the same bytes
    tensor[0, 0] = 99
    assert seen[0, 0].item() == 99
