"""Shared fixtures for the stage runtime tests: short ipc paths and fast heartbeats."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from omni.stages.runtime import StageConfig, StageRuntime, WorkerOptions, create_worker
from omni.transport.shm import list_segments

from omni.supervision.router import RouterConfig, StageRouter

# Per test process, so parallel runs never see each other's segments.
SHM_PREFIX = f"omnit{os.getpid()}_"
FAST = {"heartbeat_interval_s": 0.05, "heartbeat_timeout_s": 0.5}


@contextmanager
def ipc_endpoint() -> Iterator[str]:
    # ipc paths are limited to ~100 bytes, so not pytest's long tmp_path.
    folder = tempfile.mkdtemp(prefix="omni", dir="/tmp")
    try:
        yield f"ipc://{folder}/router.sock"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def running_router(endpoint: str, **overrides: object) -> Iterator[StageRouter]:
    settings: dict[str, object] = {**FAST, "shm_prefix": SHM_PREFIX, "pending_timeout_s": 5.0}
    settings.update(overrides)
    router = StageRouter(RouterConfig(endpoint=endpoint, **settings)).start()  # type: ignore[arg-type]
    try:
        yield router
    finally:
        router.close()


def echo_runtime(endpoint: str, replica_id: str = "echo-0", **overrides: object) -> StageRuntime:
    settings: dict[str, object] = {
        "heartbeat_interval_s": 0.05,
        "server_timeout_s": 1.0,
        "shm_prefix": SHM_PREFIX,
        "shm_threshold_bytes": 4096,
        "replica_id": replica_id,
    }
    settings.update(overrides)
    config = StageConfig(role="echo", connect=endpoint, **settings)
    return StageRuntime(config, create_worker("echo", WorkerOptions(model="tiny", device="cpu")))


def our_segments() -> list[str]:
    return list_segments(SHM_PREFIX)
