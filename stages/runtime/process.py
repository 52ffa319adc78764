"""Running a stage as its own process: signals, logging and the exit code."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

import torch
from omni.stages.runtime.config import StageConfig
from omni.stages.runtime.runtime import StageRuntime
from omni.stages.runtime.worker import StageWorker

logger = logging.getLogger(__name__)

# Exit code of a stage that cannot start as configured (unknown role, missing device, bad flag):
# restarting it would fail the same way, so the supervisor does not.
EXIT_BAD_CONFIG = 2
# How often a process with colocated replicas looks whether one of them has stopped.
_GUEST_POLL_S = 0.1


def describe_exit(code: int) -> str:
    """A child process's exit status in words: "exited with code 1", "was killed by SIGKILL"."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def bind_device(device: str) -> torch.device:
    """Make `device` this process's default accelerator; a clear error if it does not exist.
    A comma list (the devices of a tensor-parallel replica's ranks) binds its first and
    checks them all."""
    names = [name.strip() for name in device.split(",")]
    targets = [_checked_device(name) for name in names]
    if targets[0].type == "cuda":
        torch.cuda.set_device(targets[0].index or 0)
    return targets[0]


def _checked_device(device: str) -> torch.device:
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
    elif target.type != "cpu":
        raise ValueError(f"device {device!r}: only cpu and cuda devices are supported")
    return target


def run_stage_process(
    config: StageConfig,
    worker: StageWorker,
    colocated: Sequence[tuple[StageConfig, StageWorker]] = (),
) -> int:
    """Serve `worker` until SIGTERM/SIGINT, the orchestrator's SHUTDOWN or the parent's exit.

    `colocated` replicas (an encoder beside the LLM on one GPU) share this process: each is a
    replica of its own role with its own links, served from its own threads and CUDA stream.
    Two processes on one GPU take turns on it (CUDA time-slices their contexts: an LLM decode
    step took three times as long while a vision forward ran in another process); in one
    process their kernels can run side by side. They load after `worker`, whose CUDA graphs must
    be captured while nothing else runs, and when any of them stops, all do, so that the
    supervisor restarts the process whole.

    Shutdown is always the clean path: in-flight requests are failed with a clear error, the
    orchestrator gets a GOODBYE and this process's shared memory is unlinked.
    """
    bind_device(config.device)
    runtime = StageRuntime(config, worker)
    guests = [StageRuntime(guest_config, guest) for guest_config, guest in colocated]
    everyone = [runtime, *guests]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for each in everyone:
            each.stop(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    for each, each_config in zip(everyone, [config, *(c for c, _ in colocated)], strict=True):
        logger.info(
            "stage %s (%s) on %s connecting to %s",
            each.replica_id,
            each_config.role,
            each_config.device,
            each_config.connect,
        )
    runtime.load()
    for guest in guests:
        guest.start(own_cuda_stream=True)
    if guests:
        threading.Thread(
            target=_stop_when_one_stops, args=(runtime, guests), name="colocated", daemon=True
        ).start()
    runtime.run()
    for guest in guests:
        guest.stop(runtime.exit_reason or "stopped")
    for guest in guests:
        guest.join()
    for each in everyone:
        logger.info("stage %s exited: %s", each.replica_id, each.exit_reason)
    if any(each.refused for each in everyone):
        return EXIT_BAD_CONFIG
    return 1 if any(each.failed for each in everyone) else 0


def _stop_when_one_stops(runtime: StageRuntime, guests: list[StageRuntime]) -> None:
    while all(guest.running for guest in guests):
        time.sleep(_GUEST_POLL_S)
    stopped = next(guest for guest in guests if not guest.running)
    runtime.stop(f"colocated replica {stopped.replica_id} stopped: {stopped.exit_reason}")
