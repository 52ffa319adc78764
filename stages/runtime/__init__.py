"""The runtime every stage (encoder, LLM core, generator) shares: a worker interface and the
process loop that connects it to the orchestrator."""

from omni.stages.runtime.config import StageConfig
from omni.stages.runtime.runtime import StageRuntime
from omni.stages.runtime.worker import (
    StageOutput,
    StageWorker,
    StreamingStageWorker,
    WorkerOptions,
    WorkerRequest,
    check_worker_options,
    create_worker,
    register_worker,
    worker_class,
)

__all__ = [
    "StageConfig",
    "StageOutput",
    "StageRuntime",
    "StageWorker",
    "StreamingStageWorker",
    "WorkerOptions",
    "WorkerRequest",
    "check_worker_options",
    "create_worker",
    "register_worker",
    "worker_class",
]
