"""The LLM stage's thread count for a CPU step: the cores that no other runnable thread holds,
at least one, at most the stage's budget, read from the kernel's count in /proc/loadavg."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omni.stages.llm.cpu_threads import CoreShare, runnable_threads


def loadavg(tmp_path: Path, text: str) -> str:
    path = tmp_path / "loadavg"
    path.write_text(text)
    return str(path)


def test_runnable_threads_reads_the_running_count(tmp_path: Path) -> None:
    assert runnable_threads(loadavg(tmp_path, "0.56 0.87 0.78 3/86 17025\n")) == 3
    assert runnable_threads(loadavg(tmp_path, "garbage")) is None
    assert runnable_threads(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("budget", "cores", "runnable", "threads"),
    [
        (2, 2, 1, 2),  # only the stepping thread runs: every core
        (2, 2, 2, 1),  # another stage holds the second core
        (2, 2, 5, 1),  # never fewer than one
        (2, 2, None, 2),  # no count (not Linux): the budget
        (4, 8, 1, 4),  # never more than the budget
        (4, 8, 6, 3),  # five others on eight cores leave three
    ],
)
def test_threads_for_counts_the_free_cores(
    budget: int, cores: int, runnable: int | None, threads: int
) -> None:
    share = CoreShare(budget)
    share.cores = cores
    assert share.threads_for(runnable) == threads


def test_apply_sets_torchs_thread_count(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        share = CoreShare(2, path=loadavg(tmp_path, "0.1 0.1 0.1 2/90 1\n"))
        share.cores = 2
        assert share.apply() == 1
        assert torch.get_num_threads() == 1
        Path(share.path).write_text("0.1 0.1 0.1 1/90 1\n")
        assert share.apply() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_llm_stage_shares_the_cores_and_the_offline_engine_does_not() -> None:
    from omni.stages.llm.config import EngineConfig
    from omni.stages.llm.worker import engine_config
    from omni.stages.runtime import WorkerOptions

    assert EngineConfig(model="m").share_cpu_cores is False
    assert engine_config(WorkerOptions(model="m")).share_cpu_cores is True
    off = WorkerOptions(model="m", extra={"share_cpu_cores": "false"})
    assert engine_config(off).share_cpu_cores is False
