"""stages/runtime/memory.py: glibc keeps freed blocks of up to 32 MiB in the heap."""

from __future__ import annotations

import platform

import pytest
from omni.stages.runtime.memory import MAX_MMAP_THRESHOLD, keep_freed_memory


def test_keep_freed_memory_sets_glibc_thresholds() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's thresholds are glibc's")
    assert keep_freed_memory() is True
    assert keep_freed_memory(MAX_MMAP_THRESHOLD) is True


def test_a_trim_threshold_below_the_mmap_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match=r"trim_threshold is 1024; it must be >= 33554432"):
        keep_freed_memory(1024)
