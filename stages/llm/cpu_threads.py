"""How many threads a step on the CPU computes on: the cores no other thread is running on.

On a CPU-only machine the LLM stage shares the cores with the pipeline's other stages (OCR,
speech recognition, the API processes), each its own process. A second thread makes a small
prefill faster but not twice as fast: on a 2-core AMD EPYC, the embedded SmolLM2-135M's
34-token prefill (fp32, its weights streamed from memory either way) took 130 ms of wall time
and 250 ms of CPU on two threads, against 180 ms and 180 ms on one (docs/benchmarks.md,
perception). While another stage has work for the second core, the LLM's second thread takes
that core from it and gives back less than it takes; while nothing else runs, the core would
idle. So before each step the stage counts the threads runnable on the machine at that moment
(the kernel's figure in /proc/loadavg, which includes the stepping thread itself) and computes
on the cores they leave free: at least one, at most its budget (torch's thread count at start:
OMP_NUM_THREADS, else every core).
"""

from __future__ import annotations

import os

import torch

LOADAVG = "/proc/loadavg"


def runnable_threads(path: str = LOADAVG) -> int | None:
    """Threads runnable on the machine now (the 4th field of /proc/loadavg, "running/total"),
    or None where the file is missing or unreadable (not Linux)."""
    try:
        with open(path) as source:
            fields = source.read().split()
        return int(fields[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CoreShare:
    """Sets torch's intra-op thread count before each CPU step (see the module docstring)."""

    def __init__(self, budget: int | None = None, path: str = LOADAVG) -> None:
        self.budget = max(1, budget if budget is not None else torch.get_num_threads())
        self.cores = usable_cores()
        self.path = path
        self.current = torch.get_num_threads()

    def threads_for(self, runnable: int | None) -> int:
        """The thread count for a step when `runnable` threads (this one included) run now."""
        if runnable is None:
            return self.budget
        others = max(0, runnable - 1)
        return max(1, min(self.budget, self.cores - others))

    def apply(self) -> int:
        """Sets and returns the thread count for the step about to run."""
        threads = self.threads_for(runnable_threads(self.path))
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
        return threads
