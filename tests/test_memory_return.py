"""Freed buffers of a few MiB go back to the system once the mmap threshold is pinned: a
process holding 128 clip-sized buffers at once, then freeing them, ends near where it began.
Without the pin, glibc's threshold rises on the first free, later buffers come from the heap,
and the small allocations that outlive them keep the heap from shrinking."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from omni.supervision.memory import pin_mmap_threshold

WORKLOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    if sys.argv[1] == "pinned":
        from omni.supervision.memory import pin_mmap_threshold
        assert pin_mmap_threshold()

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    # One clip-sized buffer freed: unpinned, glibc now raises its mmap threshold past 1 MiB.
    first = np.full(1 << 18, 1.0, dtype=np.float32)
    del first
    before = rss_mib()
    buffers, kept = [], []
    for i in range(128):  # 128 requests' 1 MiB buffers in flight at once
        buffers.append(np.full(1 << 18, i, dtype=np.float32))
        # What outlives a request (a log line, a cache entry), over pymalloc's 512 bytes so
        # that it comes from malloc too, between the buffers.
        kept.append(np.full(200, i))
    del buffers
    print(json.dumps({"before": before, "after": rss_mib()}))
    """
)


def _growth_mib(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True
    )
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    return float(sizes["after"] - sizes["before"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_return_to_the_system_when_pinned() -> None:
    assert pin_mmap_threshold()  # glibc here
    # 128 MiB were live at once; pinned, only the small allocations kept on purpose stay.
    assert _growth_mib("pinned") < 8
    # Unpinned, the buffers came from the heap between the kept allocations, which holds
    # them: the check above can fail.
    assert _growth_mib("plain") > 100
