"""Shared-memory tensor handoff between processes on one host.

A producer (`SharedTensorPool`) copies a tensor into a named segment under /dev/shm and sends a
small `SharedTensorHandle`; a consumer (`SharedTensorReader`) maps the segment and gets a tensor
over the mapping without another copy.

Ownership lives in a 64-byte header at the start of each segment:

    magic (8 bytes) | readers left (int64) | generation (int64) | payload capacity (int64)

The producer sets "readers left" when it writes; each consumer decrements it when done (under
an flock on the segment file, so two processes never race). At zero the segment is free and
the producer reuses it: reuse matters because the first touch of a fresh tmpfs page costs a
page fault, which for an 18 MB tensor is slower than the copy itself. The generation changes
on every reuse, so a late release or open of an old handle is recognised and ignored.

Segment names carry the owner's pid (`omni_<pid>_<random>`). The owner unlinks its segments
on close; when an owner dies instead, `sweep_owner` / `sweep_dead_owners` remove what it left,
which the supervisor runs at start-up and whenever it restarts a stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import re
import secrets
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
import torch
from omni.transport.tensors import TORCH_DTYPES, check_shape, torch_dtype_name

SHM_DIR = Path("/dev/shm")
DEFAULT_PREFIX = "omni_"
HEADER_BYTES = 64  # payload stays 64-byte aligned
_MAGIC = b"OMNISHM1"
_HEADER = struct.Struct("<8sqqq")
# Segments grow in 2 MiB steps so tensors of slightly different sizes reuse one segment.
_SEGMENT_ROUNDING = 2 * 1024 * 1024
_NAME_PATTERN = r"[A-Za-z][A-Za-z0-9]*_"

SegmentName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9]*_[0-9]+_[0-9a-f]+$")]


class SharedTensorHandle(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a tensor lies in shared memory. Travels inside messages; names no path."""

    segment: SegmentName
    generation: Annotated[int, msgspec.Meta(ge=1)]
    dtype: str
    shape: list[int]
    nbytes: Annotated[int, msgspec.Meta(ge=1)]


class StaleHandleError(ValueError):
    """The segment was released (or reused) before this handle was opened."""


def _check_prefix(prefix: str) -> str:
    if not re.fullmatch(_NAME_PATTERN, prefix):
        raise ValueError(f"shared-memory prefix {prefix!r} must be letters/digits ending in '_'")
    return prefix


def owner_pid(name: str, prefix: str = DEFAULT_PREFIX) -> int | None:
    """The pid encoded in a segment name, or None if the name is not one of ours."""
    match = re.fullmatch(re.escape(prefix) + r"([0-9]+)_[0-9a-f]+", name)
    return int(match.group(1)) if match else None


def list_segments(
    prefix: str = DEFAULT_PREFIX, pid: int | None = None, directory: Path = SHM_DIR
) -> list[str]:
    """Names of our segments in `directory` (only those owned by `pid` when given)."""
    names = []
    for entry in os.listdir(directory):
        owner = owner_pid(entry, prefix)
        if owner is not None and (pid is None or owner == pid):
            names.append(entry)
    return sorted(names)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_owner(pid: int, prefix: str = DEFAULT_PREFIX, directory: Path = SHM_DIR) -> list[str]:
    """Unlink every segment owned by `pid` (call once that process is known dead)."""
    removed = []
    for name in list_segments(prefix, pid, directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            removed.append(name)
    return removed


def sweep_dead_owners(prefix: str = DEFAULT_PREFIX, directory: Path = SHM_DIR) -> list[str]:
    """Unlink segments whose owner process no longer exists."""
    removed = []
    for name in list_segments(prefix, None, directory):
        pid = owner_pid(name, prefix)
        if pid is not None and not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)
                removed.append(name)
    return removed


@dataclass
class _Segment:
    """One mapped segment file; both sides keep the descriptor open for flock."""

    name: str
    fd: int
    mapping: mmap.mmap
    capacity: int

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def read_header(self) -> tuple[int, int]:
        magic, readers, generation, _ = _HEADER.unpack_from(self.mapping, 0)
        if magic != _MAGIC:
            raise ValueError(f"shared-memory segment {self.name} has no omni header")
        return readers, generation

    def write_header(self, readers: int, generation: int) -> None:
        _HEADER.pack_into(self.mapping, 0, _MAGIC, readers, generation, self.capacity)

    def close(self) -> None:
        # A consumer may still hold tensors over the mapping; then the kernel unmaps it when the
        # last of them is freed, so a BufferError here is expected and harmless.
        with contextlib.suppress(BufferError):
            self.mapping.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


# Linux 5.14+; Python does not name it yet.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _map(fd: int, size: int) -> mmap.mmap:
    """Map a segment for a consumer: MAP_POPULATE faults every page in now, once."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _map_for_writing(fd: int, size: int) -> mmap.mmap:
    """Map a new segment for its producer with every page already faulted in for writing.

    MAP_POPULATE alone maps shared pages read-only, so the first copy would still take one
    write fault per 4 KiB page (4,600 for an 18 MB tensor, ~10 ms). Where the kernel allows
    huge pages on tmpfs (shmem_enabled=advise), MADV_HUGEPAGE also cuts TLB misses.
    """
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with contextlib.suppress(OSError, AttributeError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    try:
        mapping.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # older kernel: touch one byte per page instead
        pages = np.frombuffer(mapping, dtype=np.uint8)
        pages[:: mmap.PAGESIZE] = 0
        del pages
    return mapping


class SharedTensorPool:
    """Producer side: writes tensors into reusable segments owned by this process."""

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        max_bytes: int = 8 * 1024**3,
        directory: Path = SHM_DIR,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes is {max_bytes}; it must be positive")
        self.prefix = _check_prefix(prefix)
        self.max_bytes = max_bytes
        self.directory = Path(directory)
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def total_bytes(self) -> int:
        return sum(seg.capacity for seg in self._segments)

    def segment_names(self) -> list[str]:
        return [seg.name for seg in self._segments]

    def put(self, tensor: torch.Tensor, readers: int = 1) -> SharedTensorHandle | None:
        """Copy `tensor` into shared memory for `readers` consumers.

        Returns None when the pool has no room (the caller then sends the tensor inline).
        """
        source = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        claimed = self._claim_for(tensor.dtype, list(tensor.shape), readers)
        if claimed is None:
            return None
        segment, handle = claimed
        # numpy's copy is one plain memcpy on this thread. torch's copy_ splits large copies
        # across its OpenMP threads, which is 4-8x slower whenever another process holds a core
        # (measured on a busy 2-core machine: 1.2 ms against 4.8-8 ms for 18 MB).
        payload = np.frombuffer(
            segment.mapping, dtype=np.uint8, count=handle.nbytes, offset=HEADER_BYTES
        )
        np.copyto(payload, source.numpy())
        del payload  # drop the export so that close() can unmap
        return handle

    def allocate(
        self, shape: list[int], dtype: torch.dtype, readers: int = 1
    ) -> tuple[torch.Tensor, SharedTensorHandle] | None:
        """A writable tensor in shared memory and its handle: produce output in place, no copy.

        Write the tensor completely before sending the handle, and do not touch it afterwards:
        once the consumers release it, the pool hands the same memory out again.
        """
        claimed = self._claim_for(dtype, shape, readers)
        if claimed is None:
            return None
        segment, handle = claimed
        raw = torch.frombuffer(
            segment.mapping, dtype=torch.uint8, count=handle.nbytes, offset=HEADER_BYTES
        )
        return raw.view(dtype).view(shape), handle

    def _claim_for(
        self, dtype: torch.dtype, shape: list[int], readers: int
    ) -> tuple[_Segment, SharedTensorHandle] | None:
        if readers < 1:
            raise ValueError(f"readers is {readers}; a shared tensor needs at least one")
        dtype_name = torch_dtype_name(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            raise ValueError("an empty tensor cannot go through shared memory; send it inline")
        with self._lock:
            if self._closed:
                raise RuntimeError("the shared tensor pool is closed")
            claimed = self._claim(nbytes, readers)
        if claimed is None:
            return None
        segment, generation = claimed
        handle = SharedTensorHandle(
            segment=segment.name,
            generation=generation,
            dtype=dtype_name,
            shape=list(shape),
            nbytes=nbytes,
        )
        return segment, handle

    def _claim(self, nbytes: int, readers: int) -> tuple[_Segment, int] | None:
        for segment in sorted(self._segments, key=lambda seg: seg.capacity):
            if segment.capacity < nbytes:
                continue
            with segment.locked():
                left, generation = segment.read_header()
                if left == 0:
                    segment.write_header(readers, generation + 1)
                    return segment, generation + 1
        capacity = -(-nbytes // _SEGMENT_ROUNDING) * _SEGMENT_ROUNDING
        if not self._make_room(capacity):
            return None
        segment = self._create(capacity)
        segment.write_header(readers, 1)
        self._segments.append(segment)
        return segment, 1

    def _make_room(self, capacity: int) -> bool:
        """Unlink free segments (smallest first) until `capacity` more bytes fit."""
        if capacity > self.max_bytes:
            return False
        for segment in sorted(self._segments, key=lambda seg: seg.capacity):
            if self.total_bytes + capacity <= self.max_bytes:
                break
            with segment.locked():
                free = segment.read_header()[0] == 0
            if free:
                self._segments.remove(segment)
                self._unlink(segment)
        return self.total_bytes + capacity <= self.max_bytes

    def _create(self, capacity: int) -> _Segment:
        name = f"{self.prefix}{os.getpid()}_{secrets.token_hex(6)}"
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + capacity)
            mapping = _map_for_writing(fd, HEADER_BYTES + capacity)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return _Segment(name=name, fd=fd, mapping=mapping, capacity=capacity)

    def _unlink(self, segment: _Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / segment.name)
        segment.close()

    def close(self) -> None:
        """Unlink every segment; consumers that still map one keep their memory until done."""
        with self._lock:
            self._closed = True
            for segment in self._segments:
                self._unlink(segment)
            self._segments.clear()

    def __enter__(self) -> SharedTensorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedTensorReader:
    """Consumer side: maps segments (cached) and returns tensors over them without copying."""

    def __init__(
        self, prefix: str = DEFAULT_PREFIX, directory: Path = SHM_DIR, max_cached: int = 64
    ) -> None:
        self.prefix = _check_prefix(prefix)
        self.directory = Path(directory)
        self.max_cached = max_cached
        self._cache: OrderedDict[str, _Segment] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, handle: SharedTensorHandle, release_on_gc: bool = False) -> torch.Tensor:
        """A tensor over the shared bytes of `handle` (no copy).

        With `release_on_gc`, this reader's share is released when the tensor and every view
        of it are garbage; otherwise call `release(handle)` when done.
        """
        dtype = TORCH_DTYPES.get(handle.dtype)
        if dtype is None:
            raise ValueError(f"shared tensor {handle.segment} has unknown dtype {handle.dtype!r}")
        dims = check_shape(
            handle.shape, dtype.itemsize, handle.nbytes, f"shared tensor {handle.segment}"
        )
        segment = self._segment(handle.segment)
        with segment.locked():
            readers, generation = segment.read_header()
        if generation != handle.generation or readers <= 0:
            raise StaleHandleError(f"shared tensor {handle.segment} was already released")
        if handle.nbytes > segment.capacity:
            raise ValueError(
                f"shared tensor {handle.segment} claims {handle.nbytes} bytes; "
                f"the segment holds {segment.capacity}"
            )
        view = memoryview(segment.mapping)[HEADER_BYTES : HEADER_BYTES + handle.nbytes]
        # torch.frombuffer keeps `view` alive for as long as any tensor over it lives, which is
        # what lets a finalizer on `view` mark the end of the consumer's use.
        tensor = torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(dims)
        if release_on_gc:
            weakref.finalize(view, self._release_quietly, handle)
        return tensor

    def release(self, handle: SharedTensorHandle) -> bool:
        """Give back this consumer's share; False if it was already released or is gone."""
        return self._update(handle, lambda readers: readers - 1)

    def discard(self, handle: SharedTensorHandle) -> bool:
        """Free the segment for every consumer at once (the request was aborted)."""
        return self._update(handle, lambda readers: 0)

    def _update(self, handle: SharedTensorHandle, change: object) -> bool:
        try:
            segment = self._segment(handle.segment)
        except FileNotFoundError:
            return False  # owner gone and swept: nothing left to release
        with segment.locked():
            readers, generation = segment.read_header()
            if generation != handle.generation or readers <= 0:
                return False
            segment.write_header(max(0, change(readers)), generation)  # type: ignore[operator]
        return True

    def _release_quietly(self, handle: SharedTensorHandle) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.release(handle)

    def forget_owner(self, pid: int) -> None:
        """Drop cached mappings of a dead owner's segments so their memory can be returned."""
        with self._lock:
            for name in [name for name in self._cache if owner_pid(name, self.prefix) == pid]:
                self._cache.pop(name).close()

    def _segment(self, name: str) -> _Segment:
        if owner_pid(name, self.prefix) is None:
            raise ValueError(f"{name!r} is not a shared tensor segment of prefix {self.prefix!r}")
        with self._lock:
            segment = self._cache.get(name)
            if segment is not None:
                self._cache.move_to_end(name)
                return segment
            fd = os.open(self.directory / name, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if size < HEADER_BYTES:
                    raise ValueError(f"shared-memory segment {name} is truncated ({size} bytes)")
                segment = _Segment(
                    name=name, fd=fd, mapping=_map(fd, size), capacity=size - HEADER_BYTES
                )
            except BaseException:
                os.close(fd)
                raise
            self._cache[name] = segment
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)[1].close()
            return segment

    def close(self) -> None:
        with self._lock:
            for segment in self._cache.values():
                segment.close()
            self._cache.clear()
