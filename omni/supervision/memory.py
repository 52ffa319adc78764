"""Large buffers go back to the system when they are freed.

glibc serves an allocation above its mmap threshold (128 KiB) with mmap, and returns it with
munmap when freed; but the first time such a chunk is freed it raises the threshold to that
chunk's size (up to 32 MiB), so from then on buffers of that size come from the heap arenas,
one per thread, whose free memory is kept. A server thread pool that decodes clips and images
into buffers of a few MiB therefore keeps the high-water mark of whatever was ever in flight
at once: the issue-14 soak saw the audio API process grow 12% after 64 requests had waited for
a restarting LLM stage, and never come back. Fixing the threshold (any mallopt of it turns
the adjustment off) keeps large buffers on mmap, so RSS follows what is live.

`omni serve` pins it in its API processes. Stage processes keep the default: their RSS stayed
flat in that soak, and a step loop that builds large host tensors every step would pay an
mmap, a munmap and the page faults for each of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own default, kept fixed


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library is not glibc
    (musl and macOS return large blocks to the system anyway)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not done:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) failed", threshold)
    return done
