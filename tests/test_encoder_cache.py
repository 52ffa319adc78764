"""Encoder-output cache: hits, LRU eviction among unreferenced entries, the byte budget, and
the shared-memory variant that other processes can map and that leaves nothing in /dev/shm."""

from __future__ import annotations

import secrets
import subprocess
import sys

import msgspec
import pytest
import torch
from omni.cache.encoder_cache import (
    EncoderCache,
    EncoderCacheFullError,
    SharedEncoderCache,
)
from omni.transport.shm import SharedTensorHandle, SharedTensorReader, StaleHandleError
from omni.transport.shm_segment import HEADER_BYTES, SHM_DIR, list_segments


def output(value: float, tokens: int = 4) -> torch.Tensor:
    """A float32 (tokens, 1) embedding: 4 tokens are 16 bytes."""
    return torch.full((tokens, 1), value, dtype=torch.float32)


def cached(cache: EncoderCache) -> list[str]:
    return sorted(h for h in "abcdefgh" if h in cache)


def test_get_counts_queries_and_hits():
    cache = EncoderCache(max_bytes=64)
    assert cache.get("a") is None
    first = output(1.0)
    cache.put("a", first)
    assert cache.get("a") is first
    assert cache.get("b") is None
    assert (cache.queries, cache.hits) == (3, 1)
    # Membership tests are not queries.
    assert "a" in cache and "b" not in cache
    assert (cache.queries, cache.hits, len(cache), cache.num_bytes) == (3, 1, 1, 16)


def test_eviction_is_lru_among_unreferenced_entries():
    cache = EncoderCache(max_bytes=48)  # three 16-byte entries
    for name, value in zip("abc", (1.0, 2.0, 3.0), strict=True):
        cache.put(name, output(value))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", output(4.0))  # evicts b, the least recently used
    assert cached(cache) == ["a", "c", "d"]
    assert cache.num_bytes == 48

    cache.acquire("c")
    cache.put("e", output(5.0))  # c is pinned: a goes, not c
    assert cached(cache) == ["c", "d", "e"]
    cache.put("f", output(6.0))
    assert cached(cache) == ["c", "e", "f"]
    assert torch.equal(cache.get("c"), output(3.0))

    # Released, c becomes the most recently used unreferenced entry.
    cache.release("c")
    assert cache.evict(16) == ["e"]
    assert cache.evict(17) == ["f", "c"]
    assert (len(cache), cache.num_bytes) == (0, 0)


def test_put_of_a_cached_hash_keeps_the_first_tensor():
    cache = EncoderCache(max_bytes=32)
    first = output(1.0)
    cache.put("a", first)
    cache.put("b", output(2.0))
    cache.put("a", output(9.0))  # same content hash: nothing stored, a refreshed
    assert cache.get("a") is first and cache.num_bytes == 32
    cache.put("c", output(3.0))
    assert cached(cache) == ["a", "c"]


def test_ref_counts_nest():
    cache = EncoderCache(max_bytes=32)
    cache.put("a", output(1.0))
    cache.acquire("a")
    cache.acquire("a")
    cache.release("a")
    assert cache.ref_count("a") == 1
    assert cache.evict(100) == []
    assert cache.num_referenced_bytes == 16
    cache.release("a")
    assert (cache.ref_count("a"), cache.num_referenced_bytes) == (0, 0)
    assert cache.evict(100) == ["a"]
    with pytest.raises(KeyError, match=r"encoder output a is not cached"):
        cache.acquire("a")
    cache.put("b", output(2.0))
    with pytest.raises(ValueError, match=r"^encoder output b is not acquired$"):
        cache.release("b")
    with pytest.raises(ValueError, match=r"^encoder output z is not acquired$"):
        cache.release("z")


def test_budget_refusals():
    cache = EncoderCache(max_bytes=40)
    with pytest.raises(
        ValueError, match=r"^encoder output big is 48 bytes; the encoder cache holds at most 40"
    ):
        cache.put("big", output(1.0, tokens=12))
    cache.put("a", output(1.0))
    cache.put("b", output(2.0))
    cache.acquire("a")
    assert cache.num_referenced_bytes == 16
    cache.acquire("b")
    cache.acquire("b")
    assert cache.num_referenced_bytes == 32
    assert not cache.can_put(16)
    assert cache.can_put(8)
    with pytest.raises(
        EncoderCacheFullError,
        match=r"^encoder output c needs 16 bytes; referenced entries hold 32 of the cache's 40",
    ):
        cache.put("c", output(3.0))
    assert cached(cache) == ["a", "b"] and cache.num_bytes == 32
    with pytest.raises(ValueError, match=r"^encoder cache max_bytes is 0; it must be positive$"):
        EncoderCache(max_bytes=0)
    with pytest.raises(ValueError, match=r"^encoder output e is empty; nothing to cache$"):
        cache.put("e", torch.zeros(0, 4))


def test_close_drops_referenced_entries_too():
    cache = EncoderCache(max_bytes=32)
    cache.put("a", output(1.0))
    cache.acquire("a")
    cache.put("b", output(2.0))
    assert cache.clear() == ["b"]
    cache.close()
    assert (len(cache), cache.num_bytes) == (0, 0)


@pytest.fixture
def prefix():
    """A segment prefix no other test uses, and a check that nothing of it is left behind."""
    name = f"omnienctest{secrets.token_hex(4)}_"
    yield name
    assert list_segments(name) == []


def test_shared_cache_stores_entries_in_shared_memory(prefix):
    embedding = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    with SharedEncoderCache(max_bytes=4 * (HEADER_BYTES + 24), prefix=prefix) as cache:
        cache.put("a", embedding)
        cache.put("b", output(2.0))
        assert cache.num_bytes == (HEADER_BYTES + 24) + (HEADER_BYTES + 16)
        got = cache.get("a")
        assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got, embedding)
        names = cache.segment_names()
        assert sorted(list_segments(prefix)) == names and len(names) == 2

        # Another reader maps the entry by its handle, without a copy of the owner's.
        handle = cache.handle("a")
        assert handle is not None and cache.handle("zz") is None
        assert (handle.dtype, handle.shape, handle.nbytes) == ("bfloat16", [3, 4], 24)
        reader = SharedTensorReader(prefix=prefix)
        assert torch.equal(reader.open(handle), embedding)

        # Evicted: the segment is unlinked at once, the tensors handed out stay readable, and
        # the old handle is refused.
        assert cache.evict(1) == ["b"]
        assert cache.evict(1) == ["a"]
        assert list_segments(prefix) == []
        assert torch.equal(got, embedding)
        reader.close()
        with pytest.raises((StaleHandleError, FileNotFoundError)):
            SharedTensorReader(prefix=prefix).open(handle)


def test_shared_cache_entry_is_mapped_by_another_process(prefix):
    embedding = torch.linspace(-1, 1, 10, dtype=torch.float32).reshape(2, 5)
    # The child maps the segment with numpy alone (importing torch would cost seconds): the
    # handle and the documented layout (a 64-byte header, then the raw bytes) are enough.
    child = (
        "import json, mmap, sys, numpy as np\n"
        "handle = json.loads(sys.stdin.read())\n"
        f"with open('{SHM_DIR}/' + handle['segment'], 'rb') as f:\n"
        "    mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "count = handle['nbytes'] // 4\n"
        f"data = np.frombuffer(mapping, np.float32, count=count, offset={HEADER_BYTES})\n"
        "print(handle['dtype'], handle['shape'], [round(float(v), 4) for v in data])"
    )
    with SharedEncoderCache(max_bytes=1 << 20, prefix=prefix) as cache:
        cache.put("page", embedding)
        cache.acquire("page")
        handle = cache.handle("page")
        assert handle is not None
        result = subprocess.run(
            [sys.executable, "-c", child],
            input=msgspec.json.encode(handle),
            capture_output=True,
            check=True,
            timeout=120,
        )
        assert result.stdout.decode().strip() == (
            "float32 [2, 5] [-1.0, -0.7778, -0.5556, -0.3333, -0.1111, "
            "0.1111, 0.3333, 0.5556, 0.7778, 1.0]"
        )
    # Closed with the entry still acquired: its segment is gone all the same.
    assert list_segments(prefix) == []
    assert not any(name.startswith(prefix) for name in (p.name for p in SHM_DIR.iterdir()))


def test_shared_cache_budget_counts_the_segment_header(prefix):
    with SharedEncoderCache(max_bytes=2 * (HEADER_BYTES + 16), prefix=prefix) as cache:
        for name in "abc":
            cache.put(name, output(1.0))
        assert cached(cache) == ["b", "c"]
        assert len(list_segments(prefix)) == 2
        decoded = msgspec.json.decode(
            msgspec.json.encode(cache.handle("c")), type=SharedTensorHandle
        )
        assert decoded == cache.handle("c")
