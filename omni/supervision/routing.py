"""The router's state machine: replicas, requests and what each stage message does to them.

No threads and no sockets here: `StageRouter` calls in under its lock from its I/O thread (or
from callers, for submit/abort) and supplies `send`, which returns "sent", "busy" (the peer is
at its high-water mark) or "unreachable" (the peer is gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from omni.stages.runtime.config import host_id
from omni.supervision.replicas import Replica, ReplicaInfo, ReplicaTable
from omni.supervision.streams import (
    AsyncReplyStream,
    NoReplicaError,
    ReplicaLostError,
    Reply,
    ReplyStream,
    StageFailure,
    StageRequestError,
)
from omni.transport.codec import MessageCodec
from omni.transport.messages import (
    PROTOCOL_VERSION,
    Abort,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    PeerRequest,
    Shutdown,
    StageError,
    StageReplies,
    StageReply,
    StageRequest,
    Welcome,
)
from omni.transport.sealed import BulkOffer
from omni.transport.shm import DEFAULT_PREFIX, SharedTensorHandle, SharedTensorReader
from omni.transport.sockets import CurveKeys, SocketOptions, check_endpoint

logger = logging.getLogger(__name__)

Send = Callable[[bytes, Sequence[Any]], str]


# Why a replica on another host is dropped when its TCP connection (or its sealed bulk channel's)
# closes.
CONNECTION_CLOSED = "closed its connection (its process or host went away)"


@dataclass(frozen=True)
class RouterConfig:
    # ipc://PATH for stages on this host; tcp://HOST:PORT (with allow_tcp) for other nodes.
    endpoint: str
    allow_tcp: bool = False
    # A tcp://HOST:PORT bound beside a local `endpoint`, for stages on other hosts (`omni
    # serve --stage-endpoint`); `curve` then guards this one, and local stages stay on ipc.
    remote_endpoint: str | None = None
    # Replicas heartbeat this often; one silent for heartbeat_timeout_s is declared dead.
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    # A request waits this long for a replica with room before it fails.
    pending_timeout_s: float = 30.0
    max_pending: int = 10_000
    # A replica whose heartbeats report its worker stalled this long while holding requests is
    # hung (a wedged worker behind a live I/O thread): dropped and, when supervised, killed.
    stall_timeout_s: float = 60.0
    shared_memory: bool = True
    shm_prefix: str = DEFAULT_PREFIX
    sockets: SocketOptions = field(default_factory=SocketOptions)
    curve: CurveKeys | None = None
    # The port of the sealed bulk channels beside a CURVE tcp endpoint (0: any free one; it is
    # announced to each stage inside CURVE, but a firewall between hosts must let it through).
    bulk_port: int = 0

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint, binding=True, allow_tcp=self.allow_tcp)
        if not 0 <= self.bulk_port < 65536:
            raise ValueError(f"bulk_port is {self.bulk_port}; it must be a TCP port or 0")
        if self.remote_endpoint is not None:
            check_endpoint(self.remote_endpoint, binding=True, allow_tcp=True)
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s is {self.heartbeat_interval_s}; it must be > 0")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        if self.pending_timeout_s <= 0:
            raise ValueError(f"pending_timeout_s is {self.pending_timeout_s}; it must be > 0")
        if self.stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s is {self.stall_timeout_s}; it must be > 0")
        if self.max_pending < 1:
            raise ValueError(f"max_pending is {self.max_pending}; it must be >= 1")


@dataclass(eq=False)
class PendingRequest:
    """A request from submission until its last reply or failure. `stream` takes the replies
    of a caller's request; a replica's peer request has its `origin` instead, to which the
    replies are relayed."""

    request_id: str
    role: str
    frames: Sequence[Any]
    stream: ReplyStream | AsyncReplyStream | None
    shm_inputs: Mapping[str, SharedTensorHandle]
    queued_at: float = field(default_factory=time.monotonic)
    replica: Replica | None = None
    origin: Replica | None = None
    # A replica id to send it to while that replica is not much busier than the least loaded
    # (one whose caches hold the request's media items).
    prefer: str | None = None


@dataclass
class RouterCounters:
    replicas_joined: int = 0
    replicas_lost: int = 0
    requests_failed: int = 0
    protocol_errors: int = 0


class RoutingState:
    """Replicas and requests of one router; every method runs under the router's lock."""

    def __init__(
        self, config: RouterConfig, codec: MessageCodec, reader: SharedTensorReader, send: Send
    ) -> None:
        self.config = config
        self.counters = RouterCounters()
        self.replicas = ReplicaTable()
        self.requests: dict[str, PendingRequest] = {}
        self.pending: dict[str, deque[PendingRequest]] = {}
        # Requests sent, by (role, replica id); kept across a replica's restarts (a counter).
        self.dispatched: dict[tuple[str, str], int] = {}
        # Replicas dropped since the last look: (info, reason, silent), for lost-listeners.
        self.notices: list[tuple[ReplicaInfo, str, bool]] = []
        self._codec = codec
        self._reader = reader
        self._send = send
        self._host_id = host_id()
        # Set by the router when it has a sealed bulk listener (CURVE on tcp): the session a
        # replica that asks for one may open, handed over in its WELCOME.
        self.offer_bulk: Callable[[bytes], BulkOffer] | None = None

    def _send_message(self, identity: bytes, message: msgspec.Struct) -> None:
        self._send(identity, self._codec.encode(message))

    def handle(self, identity: bytes, message: msgspec.Struct) -> None:
        if isinstance(message, Hello):
            self._admit(identity, message)
            return
        replica = self.replicas.by_identity(identity)
        if replica is None:
            if not isinstance(message, Goodbye):
                self._send_message(identity, HelloRequired(reason="unknown replica; say HELLO"))
            return
        replica.last_seen = time.monotonic()
        if isinstance(message, Heartbeat):
            replica.stalled_s = message.stalled_s
            if message.stats:
                replica.stats = message.stats
            self._send_message(identity, Heartbeat(replica_id=replica.replica_id))
        elif isinstance(message, StageReply):
            self._on_reply(replica, message)
        elif isinstance(message, StageReplies):
            for reply in message.replies:
                self._on_reply(replica, reply)
        elif isinstance(message, PeerRequest):
            self._on_peer_request(replica, message)
        elif isinstance(message, Abort):
            self._withdraw(replica, message.request_id)
        elif isinstance(message, StageError):
            self._on_error(replica, message)
        elif isinstance(message, Goodbye):
            self.drop(replica, f"left ({message.reason})" if message.reason else "left")
        else:
            logger.warning("%s sent an unexpected %s", replica.describe(), type(message).__name__)

    def _admit(self, identity: bytes, hello: Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            logger.error(
                "replica %s speaks protocol %d, not %d",
                hello.replica_id,
                hello.protocol_version,
                PROTOCOL_VERSION,
            )
            self._send_message(
                identity,
                Shutdown(reason=f"protocol {hello.protocol_version} is not {PROTOCOL_VERSION}"),
            )
            return
        known = self.replicas.by_identity(identity)
        if known is not None and known.replica_id == hello.replica_id:
            known.hello = hello  # the replica lost sight of us and said HELLO again
        else:
            previous = self.replicas.by_id(hello.replica_id)
            if previous is not None and not self._gone(previous):
                # Another connection claims a live replica's id: a misconfigured second copy,
                # or a local process forging HELLOs. Displacing the live one would fail its
                # requests (and, repeated, make it flap); the newcomer waits instead, saying
                # HELLO again each beat until the id is free.
                message = (
                    f"replica id {hello.replica_id!r} belongs to a live replica "
                    f"(pid {previous.hello.pid}); this HELLO (pid {hello.pid}) is refused"
                )
                logger.warning("%s", message)
                self._send_message(identity, StageError(request_id="", message=message))
                return
            if known is not None:
                self.drop(known, f"renamed itself to {hello.replica_id}")
            if previous is not None:
                self.drop(previous, f"was replaced by a new process (pid {hello.pid})")
            shared = self.config.shared_memory and hello.host_id == self._host_id
            self.replicas.add(Replica(identity=identity, hello=hello, shared_memory=shared))
            self.counters.replicas_joined += 1
            logger.info(
                "stage %r replica %s joined: pid %d, device %s, capacity %d",
                hello.role,
                hello.replica_id,
                hello.pid,
                hello.device,
                hello.capacity,
            )
        replica = self.replicas.by_identity(identity)
        assert replica is not None
        replica.last_seen = time.monotonic()
        offer = self.offer_bulk(identity) if hello.sealed_bulk and self.offer_bulk else None
        welcome = Welcome(
            replica_id=hello.replica_id,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            heartbeat_timeout_s=self.config.heartbeat_timeout_s,
            shared_memory=replica.shared_memory,
            bulk_port=offer.port if offer else 0,
            bulk_session=offer.session_id if offer else b"",
            bulk_key=offer.key if offer else b"",
        )
        self._send_message(identity, welcome)

    def _gone(self, replica: Replica) -> bool:
        """Whether `replica`'s process is known to have exited: it runs on this host and its
        pid is free (a replacement may then take its id before its heartbeats time out)."""
        if replica.hello.host_id != self._host_id:
            return False
        try:
            os.kill(replica.hello.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, under another user
            return False
        return False

    def _on_peer_request(self, origin: Replica, message: PeerRequest) -> None:
        """Queue a replica's request for another role; its replies go back to `origin`."""
        request_id = message.request_id
        if request_id in self.requests:
            self._send_message(
                origin.identity,
                StageError(request_id=request_id, message=f"request id {request_id!r} is in use"),
            )
            return
        frames = self._codec.encode(
            StageRequest(request_id=request_id, inputs=message.inputs, body=message.body)
        )
        request = PendingRequest(request_id, message.role, frames, None, {}, origin=origin)
        self.requests[request_id] = request
        origin.peer_calls.add(request_id)
        self.pending.setdefault(message.role, deque()).append(request)

    def _withdraw(self, origin: Replica, request_id: str) -> None:
        """The replica that made a peer request no longer wants it."""
        request = self.requests.get(request_id)
        if request is not None and request.origin is origin:
            self.abort(request)

    def abort(self, request: PendingRequest) -> None:
        """Stop a request: its replica is told and its shared-memory inputs released."""
        self.requests.pop(request.request_id, None)
        if request.stream is not None:
            request.stream.done = True
        if request.origin is not None:
            request.origin.peer_calls.discard(request.request_id)
        self.release_inputs(request)
        if request.replica is None:
            with contextlib.suppress(ValueError):
                self.pending[request.role].remove(request)
        else:
            request.replica.inflight.discard(request.request_id)
            self._send_message(request.replica.identity, Abort(request_id=request.request_id))

    def _relay(self, request: PendingRequest, replica: Replica, reply: StageReply) -> None:
        """Pass a reply on to the replica that asked. Shared-memory handles go as they are
        when both replicas can map them; otherwise the tensors are mapped here and sent as
        frames."""
        origin = request.origin
        assert origin is not None
        if reply.shm_outputs and not (origin.shared_memory and replica.shared_memory):
            try:
                tensors = {**reply.outputs, **self._reader.copy_out(reply.shm_outputs)}
            except (OSError, ValueError) as exc:  # as in _on_reply: fail it, keep routing
                self.fail(
                    request,
                    StageFailure(f"request {request.request_id}: unreadable shared tensor: {exc}"),
                )
                return
            reply = StageReply(
                request_id=reply.request_id,
                outputs=tensors,
                body=reply.body,
                finished=reply.finished,
            )
        self._send_message(origin.identity, reply)
        if reply.finished:
            self.finish(request)

    def _on_reply(self, replica: Replica, reply: StageReply) -> None:
        request = self.requests.get(reply.request_id)
        if request is None or request.replica is not replica:
            for handle in reply.shm_outputs.values():  # a late reply to an aborted request
                self._reader.discard(handle)
            return
        if request.stream is None:
            self._relay(request, replica, reply)
            return
        tensors = dict(reply.outputs)
        try:
            for name, handle in reply.shm_outputs.items():
                tensors[name] = self._reader.open(handle, release_on_gc=True)
        except (OSError, ValueError) as exc:
            self.fail(
                request,
                StageFailure(f"request {request.request_id}: unreadable shared tensor: {exc}"),
            )
            return
        request.stream.deliver(
            Reply(
                request_id=reply.request_id,
                replica_id=replica.replica_id,
                tensors=tensors,
                body=bytes(reply.body),
                finished=reply.finished,
                handles=dict(reply.shm_outputs),
            )
        )
        if reply.finished:
            self.finish(request)

    def _on_error(self, replica: Replica, error: StageError) -> None:
        if not error.request_id:
            self.counters.protocol_errors += 1
            logger.warning("%s reported: %s", replica.describe(), error.message)
            return
        request = self.requests.get(error.request_id)
        if request is None or request.replica is not replica:
            return
        if error.code == "replica_lost":
            # The replica is going away (shutting down): not the request's fault, and another
            # replica may serve it.
            failure: StageFailure = ReplicaLostError(
                f"request {error.request_id} failed: {replica.describe()}: {error.message}"
            )
        else:
            failure = StageRequestError(
                f"{replica.describe()} failed request {error.request_id}: {error.message}",
                stage_message=error.message,
            )
        self.fail(request, failure)

    def dispatch(self) -> None:
        now = time.monotonic()
        for role, queue in self.pending.items():
            while queue:
                request = queue[0]
                replica = self.replicas.least_loaded(role, request.prefer)
                if replica is None:
                    break
                sent = self._send(replica.identity, request.frames)
                if sent == "unreachable":
                    self.drop(replica, "became unreachable")
                    continue
                if sent == "busy":
                    break  # the replica's queue is at its high-water mark: retry next tick
                queue.popleft()
                request.replica = replica
                request.frames = ()
                replica.inflight.add(request.request_id)
                self.replicas.note_dispatch(replica)
                key = (role, replica.replica_id)
                self.dispatched[key] = self.dispatched.get(key, 0) + 1
            while queue and now - queue[0].queued_at > self.config.pending_timeout_s:
                request = queue.popleft()
                live = len([r for r in self.replicas if r.role == role])
                self.fail(
                    request,
                    NoReplicaError(
                        f"request {request.request_id} waited {self.config.pending_timeout_s:g} s: "
                        f"no replica of stage {role!r} had room ({live} live)"
                    ),
                )

    def probe_connections(self) -> None:
        """A peer's connection closed: find whose by sending each replica a heartbeat; the
        router refuses to send to a connection that is gone, and that replica is dropped (its
        requests fail now rather than after `heartbeat_timeout_s`)."""
        for replica in list(self.replicas):
            beat = self._codec.encode(Heartbeat(replica_id=replica.replica_id))
            if self._send(replica.identity, beat) == "unreachable":
                self.drop(replica, CONNECTION_CLOSED)

    def check_liveness(self) -> None:
        now = time.monotonic()
        for replica in self.replicas:
            silent = now - replica.last_seen
            if silent > self.config.heartbeat_timeout_s:
                self.drop(
                    replica, f"stopped responding (no heartbeat for {silent:.1f} s)", silent=True
                )
            elif replica.inflight and replica.stalled_s > self.config.stall_timeout_s:
                self.drop(
                    replica,
                    f"is hung (its worker made no progress for {replica.stalled_s:.1f} s while "
                    f"holding requests; the limit is {self.config.stall_timeout_s:g} s)",
                    silent=True,
                )

    def drop(self, replica: Replica, reason: str, silent: bool = False) -> None:
        """Take `replica` out of routing and fail its requests."""
        self.replicas.remove(replica)
        self.counters.replicas_lost += 1
        logger.warning(
            "%s %s; failing %d requests", replica.describe(), reason, len(replica.inflight)
        )
        for request_id in sorted(replica.inflight):
            request = self.requests.get(request_id)
            if request is not None:
                self.fail(
                    request,
                    ReplicaLostError(f"request {request_id} failed: {replica.describe()} {reason}"),
                )
        replica.inflight.clear()
        # Its own peer requests have nobody left to answer.
        for request_id in sorted(replica.peer_calls):
            request = self.requests.get(request_id)
            if request is not None:
                self.abort(request)
        replica.peer_calls.clear()
        self.notices.append((replica.info(), reason, silent))

    def fail(self, request: PendingRequest, error: StageFailure) -> None:
        self.counters.requests_failed += 1
        self.release_inputs(request)
        if request.stream is not None:
            request.stream.deliver(error)
        elif request.origin is not None:
            code = (
                "replica_lost"
                if isinstance(error, ReplicaLostError)
                else "no_replica"
                if isinstance(error, NoReplicaError)
                else ""
            )
            message = error.stage_message if isinstance(error, StageRequestError) else str(error)
            self._send_message(
                request.origin.identity,
                StageError(request_id=request.request_id, message=message[:4000], code=code),
            )
        self.finish(request)

    def finish(self, request: PendingRequest) -> None:
        self.requests.pop(request.request_id, None)
        if request.replica is not None:
            request.replica.inflight.discard(request.request_id)
        if request.origin is not None:
            request.origin.peer_calls.discard(request.request_id)

    def release_inputs(self, request: PendingRequest) -> None:
        for handle in request.shm_inputs.values():
            with contextlib.suppress(OSError, ValueError):
                self._reader.discard(handle)
