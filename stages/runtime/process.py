"""Running a stage as its own process: signals, logging and the exit code."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch
from omni.stages.runtime.config import StageConfig
from omni.stages.runtime.runtime import StageRuntime
from omni.stages.runtime.worker import StageWorker

logger = logging.getLogger(__name__)

# Exit code of a stage that cannot start as configured (unknown role, missing device, bad flag):
# restarting it would fail the same way, so the supervisor does not.
EXIT_BAD_CONFIG = 2


def bind_device(device: str) -> torch.device:
    """Make `device` this process's default accelerator; a clear error if it does not exist."""
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name (try cpu or cuda:0)") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = target.index or 0
        if index >= count:
            raise ValueError(
                f"device {device} was requested but this host has {count} CUDA devices"
            )
        torch.cuda.set_device(index)
    elif target.type != "cpu":
        raise ValueError(f"device {device!r}: only cpu and cuda devices are supported")
    return target


def run_stage_process(config: StageConfig, worker: StageWorker) -> int:
    """Serve `worker` until SIGTERM/SIGINT, the orchestrator's SHUTDOWN or the parent's exit.

    Shutdown is always the clean path: in-flight requests are failed with a clear error, the
    orchestrator gets a GOODBYE and this process's shared memory is unlinked.
    """
    bind_device(config.device)
    runtime = StageRuntime(config, worker)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        runtime.stop(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    logger.info(
        "stage %s (%s) on %s connecting to %s",
        runtime.replica_id,
        config.role,
        config.device,
        config.connect,
    )
    runtime.run()
    logger.info("stage %s exited: %s", runtime.replica_id, runtime.exit_reason)
    return 1 if runtime.failed else 0
