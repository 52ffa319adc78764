"""Named shared-memory segments under /dev/shm: naming, header, mapping and sweeping.

A segment is `<prefix><owner pid>_<random hex>` and starts with a 64-byte header:

    magic (8 bytes) | readers left (int64) | generation (int64) | payload capacity (int64)

`omni.transport.shm` builds the tensor pool and reader on top; this module knows nothing of
tensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
DEFAULT_PREFIX = "omni_"
HEADER_BYTES = 64  # payload stays 64-byte aligned
MAGIC = b"OMNISHM1"
HEADER = struct.Struct("<8sqqq")
# Segments grow in 2 MiB steps so tensors of slightly different sizes reuse one segment.
SEGMENT_ROUNDING = 2 * 1024 * 1024
NAME_PATTERN = r"[A-Za-z][A-Za-z0-9]*_"


def check_prefix(prefix: str) -> str:
    if not re.fullmatch(NAME_PATTERN, prefix):
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
class Segment:
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
        magic, readers, generation, _ = HEADER.unpack_from(self.mapping, 0)
        if magic != MAGIC:
            raise ValueError(f"shared-memory segment {self.name} has no omni header")
        return readers, generation

    def write_header(self, readers: int, generation: int) -> None:
        HEADER.pack_into(self.mapping, 0, MAGIC, readers, generation, self.capacity)

    def close(self) -> None:
        # A consumer may still hold tensors over the mapping; then the kernel unmaps it when the
        # last of them is freed, so a BufferError here is expected and harmless.
        with contextlib.suppress(BufferError):
            self.mapping.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


# Linux 5.14+; Python does not name it yet.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def map_segment(fd: int, size: int) -> mmap.mmap:
    """Map a segment for a consumer: MAP_POPULATE faults every page in now, once."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def map_new_segment(fd: int, size: int) -> mmap.mmap:
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
