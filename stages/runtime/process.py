"""Running a stage as its own process: signals, logging and the exit code."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from omni.stages.runtime.config import StageConfig
from omni.stages.runtime.runtime import StageRuntime
from omni.stages.runtime.worker import StageWorker

logger = logging.getLogger(__name__)


def run_stage_process(config: StageConfig, worker: StageWorker) -> int:
    """Serve `worker` until SIGTERM/SIGINT, the orchestrator's SHUTDOWN or the parent's exit.

    Shutdown is always the clean path: in-flight requests are failed with a clear error, the
    orchestrator gets a GOODBYE and this process's shared memory is unlinked.
    """
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
    return 0
