"""The work a stage does, behind one small interface that every kind of stage implements.

The stage runtime (`omni.stages.runtime.runtime`) owns sockets, threads, heartbeats and shared
memory; a `StageWorker` only turns requests into outputs. Encoders, the LLM core and generators
each subclass it and register under a role name:

    @register_worker("echo")
    class EchoWorker(StreamingStageWorker): ...

Two shapes of worker fit:

* `StageWorker` directly, for busy-loop stages that batch across requests (the LLM core, an
  encoder batching items): `add_request` queues work, each `step` advances every active request
  by one batch and returns whatever outputs are ready.
* `StreamingStageWorker`, for stages that handle one request at a time as a generator of
  outputs: implement `handle(request)`; requests interleave chunk by chunk.

A request's `body` and an output's `reply` are the role's contract structs
(`omni.stages.contracts.ROLE`): the worker decodes the one and builds the other. A worker may
also ask another role for work (`take_peer_calls`), and hears the answers through
`on_peer_reply`; the runtime carries both.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker is told at construction: which model, on which device."""

    model: str = ""
    device: str = "cpu"
    # Free-form per-role settings (`--option key=value` on the command line).
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.device:
            raise ValueError("device must be named (for example 'cpu' or 'cuda:0')")


@dataclass(frozen=True)
class WorkerRequest:
    """A request as a worker sees it: tensors already decoded or mapped from shared memory,
    and its body, the role's request struct as msgpack (decode it with the role's contract)."""

    request_id: str
    inputs: Mapping[str, torch.Tensor]
    body: bytes = b""


@dataclass(frozen=True)
class StageOutput:
    """One reply for one request. `finished` marks the last; `error` fails the request.
    `reply` is the role's reply struct (None for a reply of tensors alone)."""

    request_id: str
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    reply: msgspec.Struct | None = None
    finished: bool = False
    error: str | None = None


@dataclass(frozen=True)
class PeerCall:
    """A request this worker sends to a replica of another role (through the orchestrator)."""

    request_id: str
    role: str
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class PeerReply:
    """One answer to a `PeerCall`: a reply (the last has `finished`), or its failure, where
    `lost` means the serving replica died or none was free, so asking again may succeed.
    `tensors` are the worker's own to keep: none maps another process's shared memory."""

    request_id: str
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    body: bytes = b""
    finished: bool = False
    error: str | None = None
    lost: bool = False


class StageWorker(ABC):
    """Turns requests into outputs inside one stage process. Called from one thread only."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options

    @classmethod  # noqa: B027
    def check_options(cls, options: WorkerOptions) -> None:
        """Raise ValueError naming a bad option, without loading anything: the server calls
        it (through `check_worker_options`) before it starts any stage process. Optional:
        empty on purpose."""

    def load(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Load weights and warm up; runs once in the stage process before it says HELLO."""

    @abstractmethod
    def add_request(self, request: WorkerRequest) -> None:
        """Accept a request; the work happens in later `step` calls."""

    @abstractmethod
    def step(self) -> list[StageOutput]:
        """Advance active requests by one unit of work and return the outputs now ready."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether `step` has anything to do (the runtime sleeps on its queue otherwise)."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop a request; no further outputs may be returned for it. Unknown ids are ignored."""

    def close(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Free resources at shutdown."""

    def broken(self) -> str | None:
        """Why the worker can no longer serve (a process it needs, such as a tensor-parallel
        rank, died), else None. The runtime looks every time round its loop and stops, failing
        what the replica held, so that the supervisor starts it again. Optional."""
        return None

    def stats(self) -> msgspec.Struct | None:
        """The role's stats struct, sent with each heartbeat for the orchestrator's metrics.

        Called from the runtime's I/O thread while the busy loop runs, so it must only read
        counters and lengths (each read is atomic under the GIL), never step or allocate.
        """
        return None

    def take_peer_calls(self) -> tuple[list[PeerCall], list[str]]:
        """Requests for other roles made since the last call, and ids of earlier ones to
        withdraw; the runtime sends them after every `add_request` and `step`."""
        return [], []

    def on_peer_reply(self, reply: PeerReply) -> None:
        """An answer to one of this worker's `PeerCall`s (never called for a withdrawn one)."""
        raise NotImplementedError(f"{type(self).__name__} makes no peer calls")


class StreamingStageWorker(StageWorker):
    """A worker written as `handle(request)`, a generator of outputs for one request.

    Each `step` takes one output from each active request in turn, so a long request does not
    hold back short ones and an abort takes effect between two outputs. A generator that ends
    without yielding a finished output gets an empty finished one; an exception fails only its
    own request.
    """

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self._active: OrderedDict[str, Iterator[StageOutput]] = OrderedDict()

    @abstractmethod
    def handle(self, request: WorkerRequest) -> Iterator[StageOutput]:
        """Yield this request's outputs; mark the last one `finished=True`."""

    def add_request(self, request: WorkerRequest) -> None:
        if request.request_id in self._active:
            raise ValueError(f"request {request.request_id!r} is already active")
        self._active[request.request_id] = self.handle(request)

    def has_work(self) -> bool:
        return bool(self._active)

    def step(self) -> list[StageOutput]:
        outputs = []
        for request_id in list(self._active):
            stream = self._active[request_id]
            try:
                output = next(stream)
            except StopIteration:
                output = StageOutput(request_id=request_id, finished=True)
            except Exception as exc:  # one bad request must not take the stage down
                logger.exception("request %s failed", request_id)
                output = StageOutput(
                    request_id=request_id, finished=True, error=f"{type(exc).__name__}: {exc}"
                )
            if output.request_id != request_id:
                raise ValueError(
                    f"handle() for {request_id!r} yielded output for {output.request_id!r}"
                )
            if output.finished or output.error is not None:
                del self._active[request_id]
            outputs.append(output)
        return outputs

    def abort(self, request_id: str) -> None:
        stream = self._active.pop(request_id, None)
        if stream is not None and hasattr(stream, "close"):
            stream.close()

    def close(self) -> None:
        for request_id in list(self._active):
            self.abort(request_id)


# -- registry ---------------------------------------------------------------------------------

_WORKERS: dict[str, type[StageWorker]] = {}

# Roles whose worker lives in a module that registers it on import. Stages add their entry here
# (or pass --worker-module) so `omni stage ROLE` can find them without importing everything.
BUILTIN_WORKER_MODULES: dict[str, str] = {
    "echo": "omni.stages.runtime.testing",
    "llm": "omni.stages.llm.worker",
    "vision": "omni.stages.encoders.vision",
    "audio": "omni.stages.encoders.audio",
    "asr": "omni.stages.encoders.audio_asr",
    "ocr": "omni.stages.encoders.ocr",
    "image": "omni.stages.generators.image",
    "speech": "omni.stages.generators.speech",
}

W = TypeVar("W", bound=type[StageWorker])


def register_worker(role: str) -> Callable[[W], W]:
    """Class decorator: make `cls` the worker for `role`."""
    if not role or not role.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"role {role!r} must be letters, digits, '-' or '_'")

    def decorate(cls: W) -> W:
        existing = _WORKERS.get(role)
        if existing is not None and existing is not cls:
            raise ValueError(f"role {role!r} is already served by {existing.__qualname__}")
        _WORKERS[role] = cls
        return cls

    return decorate


def worker_class(role: str) -> type[StageWorker]:
    """The worker registered for `role`, importing its built-in module if needed."""
    if role not in _WORKERS and role in BUILTIN_WORKER_MODULES:
        importlib.import_module(BUILTIN_WORKER_MODULES[role])
    try:
        return _WORKERS[role]
    except KeyError:
        known = sorted(set(_WORKERS) | set(BUILTIN_WORKER_MODULES))
        raise ValueError(f"no stage worker for role {role!r}; known roles: {known}") from None


def check_worker_options(role: str, options: WorkerOptions) -> None:
    """The role's worker's `check_options`: a bad option fails here, with one clear error,
    rather than as a stage process that exits at start-up."""
    worker_class(role).check_options(options)


def create_worker(role: str, options: WorkerOptions) -> StageWorker:
    return worker_class(role)(options)
