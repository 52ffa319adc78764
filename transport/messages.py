"""The stage protocol: every message between the orchestrator and a stage replica.

Conversation of one replica (a DEALER) with the orchestrator (the ROUTER):

    replica -> HELLO                 who it is: role, model, capacity, device, host
    orchestrator -> WELCOME          accepted; heartbeat timing; may it use shared memory
    replica -> HEARTBEAT (periodic)  still alive, current load; answered by a HEARTBEAT
    orchestrator -> HELLO_REQUIRED   (to an unknown peer) say HELLO again
    orchestrator -> REQUEST          work for the stage
    replica -> REPLY ... (finished)  streamed results; the last one has finished=True
    replica -> REPLIES               the replies of one step, for many requests, in one message
    replica -> ERROR                 the request failed (or a frame could not be decoded)
    orchestrator -> ABORT            stop working on a request
    replica -> GOODBYE               leaving; take me out of routing
    orchestrator -> SHUTDOWN         please exit

A replica may itself ask another role for work (the LLM stage asks an encoder for an image's
embeddings): it sends PEER_REQUEST naming the role, the orchestrator routes it like any request
and relays the replies (REPLY / REPLIES / ERROR) back to the asking replica; an ABORT from the
asking replica withdraws it. Shared-memory handles are relayed untouched when both replicas
share the orchestrator's host, so the tensor itself never passes through the orchestrator.

What a request, a reply and a heartbeat's stats mean is the business of the role's contract
(`omni.stages.contracts.ROLE`): here they are opaque msgpack bytes (`body`, `stats`) beside
named tensors. This layer knows no role.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import torch
from omni.transport.codec import MessageCodec
from omni.transport.shm import SharedTensorHandle

# 3: heartbeats carry `stalled_s`. 4: HELLO may ask for a sealed bulk channel, WELCOME offers it.
PROTOCOL_VERSION = 4

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
    # The replica joined over tcp with CURVE keys and takes a sealed bulk channel for large
    # messages (omni.transport.sealed).
    sealed_bulk: bool = False


class Welcome(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replica_id: Name
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0)]
    heartbeat_timeout_s: Annotated[float, msgspec.Meta(gt=0)]
    shared_memory: bool = False
    # A sealed bulk channel offered to a replica that asked (Hello.sealed_bulk): the port on the
    # router's host, the session id and the session key. Only ever sent inside CURVE.
    bulk_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    bulk_session: Annotated[bytes, msgspec.Meta(max_length=16)] = b""
    bulk_key: Annotated[bytes, msgspec.Meta(max_length=32)] = b""


# A contract's msgpack-encoded struct (request parameters, reply, heartbeat stats). Bounded so
# that a hostile peer cannot make a header of gigabytes; tensors travel as frames, not here.
Body = Annotated[bytes, msgspec.Meta(max_length=16 * 1024 * 1024)]
Stats = Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replica_id: Name
    load: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Seconds since the replica's worker last finished a step while it held requests (0 when
    # it holds none). The I/O thread heartbeats even while the worker is wedged, so being
    # heard is not proof of progress: this is.
    stalled_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # The worker's `stats()` in its role's contract; the orchestrator's echo leaves it empty.
    stats: Stats = b""


class HelloRequired(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The orchestrator does not know this peer (it restarted, or declared the replica dead)."""

    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class StageRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: RequestId
    inputs: dict[str, torch.Tensor] = {}
    shm_inputs: dict[str, SharedTensorHandle] = {}
    # The role's request struct, encoded by its contract.
    body: Body = b""


class StageReply(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: RequestId
    outputs: dict[str, torch.Tensor] = {}
    shm_outputs: dict[str, SharedTensorHandle] = {}
    # The role's reply struct, encoded by its contract (empty for a reply of tensors alone).
    body: Body = b""
    finished: bool = False


class StageReplies(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The replies of one worker step: one message however many requests advanced."""

    replies: Annotated[list[StageReply], msgspec.Meta(max_length=65536)]


class PeerRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A replica's request for work by another role, routed and answered by the orchestrator."""

    request_id: RequestId
    role: Name
    inputs: dict[str, torch.Tensor] = {}
    body: Body = b""


class StageError(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Empty when the error is not about one request (an undecodable frame, for example).
    request_id: RequestId
    message: Annotated[str, msgspec.Meta(max_length=4096)]
    # Why, for a caller that may try again: "" (the stage refused or failed the request),
    # "replica_lost" (its replica died or left) or "no_replica" (none had room in time).
    code: Annotated[str, msgspec.Meta(max_length=32)] = ""


class Abort(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    request_id: RequestId


class Goodbye(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    replica_id: Name
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class Shutdown(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


# One-byte kinds. Stable wire values: never renumber, only add. 0xB0 is taken by the ticket
# that stands for a sealed message on the control socket (omni.transport.sealed_peers).
MESSAGE_KINDS: dict[int, type[msgspec.Struct]] = {
    0x01: Hello,
    0x02: Welcome,
    0x03: Heartbeat,
    0x04: HelloRequired,
    0x10: StageRequest,
    0x11: StageReply,
    0x12: StageError,
    0x13: Abort,
    0x14: StageReplies,
    0x15: PeerRequest,
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
    | StageReplies
    | PeerRequest
    | StageError
    | Abort
    | Goodbye
    | Shutdown
)


def stage_codec() -> MessageCodec:
    """The codec for the stage protocol."""
    return MessageCodec(MESSAGE_KINDS)
