"""glibc malloc settings for a stage process that allocates large, short-lived tensors.

PyTorch's CPU allocator takes every tensor from malloc. glibc serves a block above its mmap
threshold with a fresh mapping and returns the heap's free top to the system past its trim
threshold, so in a loop that allocates and frees tensors of megabytes (an encoder's
activations) every such tensor is new pages, which the kernel faults in and zero-fills on first
touch. Raising both thresholds keeps freed blocks in the heap for the next pass. Measured on the
2-core CPU machine: Whisper tiny.en's encoder 150 -> 125 ms a 30 s window, the same results.
The cost: the process keeps the heap of its largest pass, up to `trim_threshold` free.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's upper bound for the mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory(trim_threshold: int = 512 << 20) -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to `trim_threshold` bytes of it free
    for reuse. False (and nothing changed) where the C library is not glibc."""
    if trim_threshold < MAX_MMAP_THRESHOLD:
        raise ValueError(f"trim_threshold is {trim_threshold}; it must be >= {MAX_MMAP_THRESHOLD}")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.info("no mallopt in this C library; malloc keeps its defaults")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
