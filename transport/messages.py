"""The stage protocol: every message between the orchestrator and a stage replica.

Conversation of one replica (a DEALER) with the orchestrator (the ROUTER):

    replica -> HELLO                 who it is: role, model, capacity, device, host
    orchestrator -> WELCOME          accepted; heartbeat timing; may it use shared memory
    replica -> HEARTBEAT (periodic)  still alive, current load; answered by a HEARTBEAT
    orchestrator -> HELLO_REQUIRED   (to an unknown peer) say HELLO again
    orchestrator -> REQUEST          work for the stage
    replica -> REPLY ... (finished)  streamed results; the last one has finished=True
    replica -> ERROR                 the request failed (or a frame could not be decoded)
    orchestrator -> ABORT            stop working on a request
    replica -> GOODBYE               leaving; take me out of routing
    orchestrator -> SHUTDOWN         please exit
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import torch
from omni.transport.codec import MessageCodec
from omni.transport.shm import SharedTensorHandle

PROTOCOL_VERSION = 1

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
RequestId = Annotated[str, msgspec.Meta(max_length=256)]


class Hello(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replica_id: Name
    role: Name
    model: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    capacity: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    device: Annotated[str, msgspec.Meta(max_length=64)] = "cpu"
    pid: Annotated[int, msgspec.Meta(ge=0)]
    # Hostname plus boot id: equal only for processes that can share /dev/shm.
    host_id: Annotated[str, msgspec.Meta(max_length=512)] = ""
    protocol_version: int = PROTOCOL_VERSION


class Welcome(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replica_id: Name
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0)]
    heartbeat_timeout_s: Annotated[float, msgspec.Meta(gt=0)]
    shared_memory: bool = False


# A replica's own numbers (the LLM stage: scheduler queues, KV usage, prefix-cache counters),
# named plainly and bounded so that a heartbeat stays small.
StageStats = Annotated[
    dict[Annotated[str, msgspec.Meta(min_length=1, max_length=64)], float],
    msgspec.Meta(max_length=64),
]


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replica_id: Name
    load: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Sent by replicas with their worker's `stats()`; the orchestrator's echo leaves it empty.
    stats: StageStats = {}


class HelloRequired(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The orchestrator does not know this peer (it restarted, or declared the replica dead)."""

    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class StageRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: RequestId
    inputs: dict[str, torch.Tensor] = {}
    shm_inputs: dict[str, SharedTensorHandle] = {}
    # Plain msgpack values only (numbers, strings, lists, maps); no objects can appear here.
    params: dict[str, Any] = {}


class StageReply(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: RequestId
    outputs: dict[str, torch.Tensor] = {}
    shm_outputs: dict[str, SharedTensorHandle] = {}
    data: dict[str, Any] = {}
    finished: bool = False


class StageError(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Empty when the error is not about one request (an undecodable frame, for example).
    request_id: RequestId
    message: Annotated[str, msgspec.Meta(max_length=4096)]


class Abort(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: RequestId


class Goodbye(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replica_id: Name
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class Shutdown(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


# One-byte kinds. Stable wire values: never renumber, only add.
MESSAGE_KINDS: dict[int, type[msgspec.Struct]] = {
    0x01: Hello,
    0x02: Welcome,
    0x03: Heartbeat,
    0x04: HelloRequired,
    0x10: StageRequest,
    0x11: StageReply,
    0x12: StageError,
    0x13: Abort,
    0x20: Goodbye,
    0x21: Shutdown,
}

StageMessage = (
    Hello
    | Welcome
    | Heartbeat
    | HelloRequired
    | StageRequest
    | StageReply
    | StageError
    | Abort
    | Goodbye
    | Shutdown
)


def stage_codec() -> MessageCodec:
    """The codec for the stage protocol."""
    return MessageCodec(MESSAGE_KINDS)
