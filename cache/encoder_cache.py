"""The encoder-output cache: embeddings keyed by the content hash of the media item.

A request whose image (or audio clip) was seen before skips the encoder: the item hash from
`omni.media` (the same string `MultiModalPlaceholder.item_hash` carries) finds the embedding.

Bookkeeping and storage are split. `EncoderCache` keeps the ref counts, the LRU order and the
byte budget; an `EncoderStorage` holds the tensors. `InProcessStorage` keeps them in a dict;
`SharedMemoryStorage` copies each into its own named segment under /dev/shm, so the LLM
replicas on a node can map an entry (through `SharedEncoderCache.handle`) without a copy.

Rules the scheduler relies on:
- an entry a request has `acquire`d is never evicted, until it is `release`d as often;
- eviction takes the least recently used unreferenced entry first;
- an entry larger than the whole budget is refused with a ValueError, and a `put` that cannot
  make room because referenced entries hold the budget raises `EncoderCacheFullError`
  (`can_put` is the check to call first).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omni.transport.shm import SharedTensorHandle
from omni.transport.shm_segment import (
    DEFAULT_PREFIX,
    HEADER_BYTES,
    SHM_DIR,
    Segment,
    check_prefix,
    map_new_segment,
)
from omni.transport.tensors import torch_dtype_name

# Consumers of a shared entry never bring its reader count to zero (they may call
# `SharedTensorReader.release` once each); only the owner's eviction zeroes it.
_SHARED_ENTRY_READERS = 1 << 62


class EncoderCacheFullError(RuntimeError):
    """Referenced entries hold so much of the budget that a new entry does not fit."""


class EncoderStorage(ABC):
    """Holds the tensors of an `EncoderCache`; the cache decides what is stored and freed."""

    @abstractmethod
    def footprint(self, tensor: torch.Tensor) -> int:
        """Bytes `tensor` would take in this storage, charged against the cache's budget."""

    @abstractmethod
    def store(self, item_hash: str, tensor: torch.Tensor) -> None:
        """Keep `tensor` under `item_hash` (never called for a hash already stored)."""

    @abstractmethod
    def load(self, item_hash: str) -> torch.Tensor:
        """The stored tensor (no copy): callers must not write to it."""

    @abstractmethod
    def free(self, item_hash: str) -> None:
        """Drop the entry; tensors already handed out stay valid."""

    @abstractmethod
    def close(self) -> None:
        """Release everything the storage holds."""


class InProcessStorage(EncoderStorage):
    """Tensors in a dict, on whatever device the encoder produced them."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def footprint(self, tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def store(self, item_hash: str, tensor: torch.Tensor) -> None:
        self._tensors[item_hash] = tensor

    def load(self, item_hash: str) -> torch.Tensor:
        return self._tensors[item_hash]

    def free(self, item_hash: str) -> None:
        del self._tensors[item_hash]

    def close(self) -> None:
        self._tensors.clear()


@dataclass
class _Entry:
    num_bytes: int
    ref_count: int = 0


class EncoderCache:
    """Content-addressed encoder outputs with ref counts and LRU eviction under `max_bytes`."""

    def __init__(self, max_bytes: int, storage: EncoderStorage | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"encoder cache max_bytes is {max_bytes}; it must be positive")
        self.max_bytes = max_bytes
        self.storage = storage if storage is not None else InProcessStorage()
        self._entries: dict[str, _Entry] = {}
        # Unreferenced entries only, least recently used first: eviction pops from the front.
        self._evictable: OrderedDict[str, None] = OrderedDict()
        self._num_bytes = 0
        self._num_referenced_bytes = 0
        self.hits = 0
        self.queries = 0
        # The scheduler and the I/O threads that receive encoder outputs may both touch it.
        self._lock = threading.RLock()

    @property
    def num_bytes(self) -> int:
        """Bytes held by all entries, referenced or not."""
        return self._num_bytes

    @property
    def num_referenced_bytes(self) -> int:
        """Bytes held by entries that cannot be evicted now."""
        return self._num_referenced_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item_hash: object) -> bool:
        """Whether `item_hash` is cached; unlike `get`, not counted as a query."""
        return item_hash in self._entries

    def ref_count(self, item_hash: str) -> int:
        """How many acquisitions of `item_hash` are outstanding (0 when absent)."""
        entry = self._entries.get(item_hash)
        return entry.ref_count if entry is not None else 0

    def get(self, item_hash: str) -> torch.Tensor | None:
        """The cached output for `item_hash`, or None; counts a query, and a hit if found."""
        with self._lock:
            self.queries += 1
            if item_hash not in self._entries:
                return None
            self.hits += 1
            self._touch(item_hash)
            return self.storage.load(item_hash)

    def can_put(self, num_bytes: int) -> bool:
        """Whether an entry of `num_bytes` (a storage footprint) fits after evicting."""
        with self._lock:
            return num_bytes <= self.max_bytes - self.num_referenced_bytes

    def put(self, item_hash: str, tensor: torch.Tensor) -> None:
        """Cache `tensor` as the output for `item_hash`, evicting LRU entries to make room.

        Keys are content hashes, so a hash already cached keeps its tensor (only its recency
        is refreshed). The tensor is kept as given, not copied, by the in-process storage:
        do not modify it afterwards.
        """
        if not item_hash:
            raise ValueError("encoder output item_hash must be a non-empty string")
        if tensor.numel() == 0:
            raise ValueError(f"encoder output {item_hash} is empty; nothing to cache")
        with self._lock:
            if item_hash in self._entries:
                self._touch(item_hash)
                return
            num_bytes = self.storage.footprint(tensor)
            if num_bytes > self.max_bytes:
                raise ValueError(
                    f"encoder output {item_hash} is {num_bytes} bytes; "
                    f"the encoder cache holds at most {self.max_bytes} bytes"
                )
            if not self.can_put(num_bytes):
                raise EncoderCacheFullError(
                    f"encoder output {item_hash} needs {num_bytes} bytes; referenced entries "
                    f"hold {self.num_referenced_bytes} of the cache's {self.max_bytes} bytes"
                )
            self.evict(self._num_bytes + num_bytes - self.max_bytes)
            self.storage.store(item_hash, tensor)
            self._entries[item_hash] = _Entry(num_bytes)
            self._evictable[item_hash] = None
            self._num_bytes += num_bytes

    def acquire(self, item_hash: str) -> None:
        """Pin the entry (a request will read it); KeyError if it is not cached."""
        with self._lock:
            entry = self._entries.get(item_hash)
            if entry is None:
                raise KeyError(f"encoder output {item_hash} is not cached")
            if entry.ref_count == 0:
                self._num_referenced_bytes += entry.num_bytes
                del self._evictable[item_hash]
            entry.ref_count += 1

    def release(self, item_hash: str) -> None:
        """Undo one `acquire`; at zero the entry becomes the most recently used evictable."""
        with self._lock:
            entry = self._entries.get(item_hash)
            if entry is None or entry.ref_count == 0:
                raise ValueError(f"encoder output {item_hash} is not acquired")
            entry.ref_count -= 1
            if entry.ref_count == 0:
                self._num_referenced_bytes -= entry.num_bytes
                self._evictable[item_hash] = None

    def evict(self, num_bytes: int) -> list[str]:
        """Free at least `num_bytes` if the unreferenced entries allow, oldest first.

        Returns the evicted hashes, in eviction order.
        """
        evicted: list[str] = []
        freed = 0
        with self._lock:
            while freed < num_bytes and self._evictable:
                item_hash, _ = self._evictable.popitem(last=False)
                freed += self._remove(item_hash)
                evicted.append(item_hash)
        return evicted

    def clear(self) -> list[str]:
        """Evict every unreferenced entry; returns their hashes."""
        with self._lock:
            return self.evict(self._num_bytes)

    def close(self) -> None:
        """Drop every entry, referenced or not, and release the storage."""
        with self._lock:
            for item_hash in list(self._entries):
                self._remove(item_hash)
            self._evictable.clear()
            self._num_referenced_bytes = 0
            self.storage.close()

    def __enter__(self) -> EncoderCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _touch(self, item_hash: str) -> None:
        if item_hash in self._evictable:
            self._evictable.move_to_end(item_hash)

    def _remove(self, item_hash: str) -> int:
        entry = self._entries.pop(item_hash)
        self.storage.free(item_hash)
        self._num_bytes -= entry.num_bytes
        return entry.num_bytes


@dataclass
class _SharedEntry:
    segment: Segment
    handle: SharedTensorHandle
    tensor: torch.Tensor  # the owner's view over the mapping


class SharedMemoryStorage(EncoderStorage):
    """Each entry in its own /dev/shm segment, exact-sized and unlinked when evicted.

    Segments are named and headed like the transport's (`omni_<pid>_<hex>`, readers and
    generation in the header), so `SharedTensorReader.open(handle)` maps an entry in another
    process and the supervisor's `sweep_dead_owners` removes them if this process dies.
    Entries come back on the CPU whatever device they were put from.
    Unlike the transport's pool, a segment is not reused: cache entries live long, so the
    first-touch cost of a fresh segment is paid once per entry, not once per request.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, directory: Path = SHM_DIR) -> None:
        self.prefix = check_prefix(prefix)
        self.directory = Path(directory)
        self._entries: dict[str, _SharedEntry] = {}

    def footprint(self, tensor: torch.Tensor) -> int:
        return HEADER_BYTES + tensor.numel() * tensor.element_size()

    def store(self, item_hash: str, tensor: torch.Tensor) -> None:
        dtype_name = torch_dtype_name(tensor.dtype)
        source = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        nbytes = source.numel()
        segment = self._create(HEADER_BYTES + nbytes)
        try:
            # Through a memoryview, not the mmap itself: torch.frombuffer keeps the memoryview
            # (an export of the mmap) alive with the tensor, so closing the mapping while a
            # caller still holds a tensor fails safely instead of unmapping under it.
            payload = memoryview(segment.mapping)[HEADER_BYTES : HEADER_BYTES + nbytes]
            owner_view = torch.frombuffer(payload, dtype=torch.uint8)
            # numpy's copy is one memcpy on this thread (see SharedTensorPool.put for why).
            np.copyto(owner_view.numpy(), source.numpy())
            segment.write_header(_SHARED_ENTRY_READERS, 1)
        except BaseException:
            self._unlink(segment)
            raise
        handle = SharedTensorHandle(
            segment=segment.name,
            generation=1,
            dtype=dtype_name,
            shape=list(tensor.shape),
            nbytes=nbytes,
        )
        typed = owner_view.view(tensor.dtype).view(tensor.shape)
        self._entries[item_hash] = _SharedEntry(segment, handle, typed)

    def load(self, item_hash: str) -> torch.Tensor:
        return self._entries[item_hash].tensor

    def handle(self, item_hash: str) -> SharedTensorHandle:
        return self._entries[item_hash].handle

    def free(self, item_hash: str) -> None:
        entry = self._entries.pop(item_hash)
        segment, generation = entry.segment, entry.handle.generation
        del entry  # drop the owner's view so that the mapping can close now
        with segment.locked():
            # Readers that open the old handle from now on get StaleHandleError.
            segment.write_header(0, generation)
        self._unlink(segment)

    def segment_names(self) -> list[str]:
        return sorted(entry.segment.name for entry in self._entries.values())

    def close(self) -> None:
        for item_hash in list(self._entries):
            self.free(item_hash)

    def _create(self, size: int) -> Segment:
        name = f"{self.prefix}{os.getpid()}_{secrets.token_hex(6)}"
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = map_new_segment(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return Segment(name=name, fd=fd, mapping=mapping, capacity=size - HEADER_BYTES)

    def _unlink(self, segment: Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / segment.name)
        # Tensors handed out by `load` may still view the mapping; then the kernel unmaps it
        # once they are gone (Segment.close tolerates that).
        segment.close()


class SharedEncoderCache(EncoderCache):
    """An `EncoderCache` whose entries live in shared memory, mappable by other processes.

    The owning process (one per node) puts and evicts; another replica asks the owner for
    `handle(item_hash)` and opens it with a `SharedTensorReader`. A tensor it already opened
    stays valid after eviction (the mapping outlives the unlink); opening an evicted handle
    raises `StaleHandleError` or `FileNotFoundError`, which the replica treats as a miss.
    """

    def __init__(
        self, max_bytes: int, prefix: str = DEFAULT_PREFIX, directory: Path = SHM_DIR
    ) -> None:
        self._shared = SharedMemoryStorage(prefix, directory)
        super().__init__(max_bytes, storage=self._shared)

    def handle(self, item_hash: str) -> SharedTensorHandle | None:
        """Where the entry lies in shared memory, or None if it is not cached."""
        with self._lock:
            if item_hash not in self._entries:
                return None
            return self._shared.handle(item_hash)

    def segment_names(self) -> list[str]:
        """The /dev/shm names of the entries' segments."""
        with self._lock:
            return self._shared.segment_names()
