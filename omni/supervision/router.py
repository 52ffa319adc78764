"""The orchestrator's side of the stage protocol: one ROUTER, many replicas, many requests.

`StageRouter` binds the endpoint every replica connects to, admits replicas as they say HELLO,
sends each request to the least-loaded live replica of its role and streams the replies back
(`ReplyStream` for threads, `AsyncReplyStream` for asyncio). A replica that leaves, goes silent
past `heartbeat_timeout_s` or is reported dead by the supervisor is taken out of routing at
once, and every request it held fails with `ReplicaLostError` naming the replica and the cause.

Threads: one I/O thread owns the ROUTER socket; callers (HTTP handlers, the supervisor) touch
shared state under one lock and wake the I/O thread through an inproc socket.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch
import zmq

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
from omni.transport.codec import ProtocolError
from omni.transport.messages import (
    PROTOCOL_VERSION,
    Abort,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    Shutdown,
    StageError,
    StageReply,
    StageRequest,
    Welcome,
    stage_codec,
)
from omni.transport.shm import (
    DEFAULT_PREFIX,
    SharedTensorHandle,
    SharedTensorReader,
    sweep_dead_owners,
)
from omni.transport.sockets import BoundRouter, CurveKeys, SocketOptions, check_endpoint

logger = logging.getLogger(__name__)

# listener(info, reason, silent): silent means alive as far as we know but not heartbeating.
LostListener = Callable[[ReplicaInfo, str, bool], None]


@dataclass(frozen=True)
class RouterConfig:
    # ipc://PATH for stages on this host; tcp://HOST:PORT (with allow_tcp) for other nodes.
    endpoint: str
    allow_tcp: bool = False
    # Replicas heartbeat this often; one silent for heartbeat_timeout_s is declared dead.
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    # A request waits this long for a replica with room before it fails.
    pending_timeout_s: float = 30.0
    max_pending: int = 10_000
    shared_memory: bool = True
    shm_prefix: str = DEFAULT_PREFIX
    sockets: SocketOptions = field(default_factory=SocketOptions)
    curve: CurveKeys | None = None

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint, binding=True, allow_tcp=self.allow_tcp)
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s is {self.heartbeat_interval_s}; it must be > 0")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                f"heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        if self.pending_timeout_s <= 0:
            raise ValueError(f"pending_timeout_s is {self.pending_timeout_s}; it must be > 0")
        if self.max_pending < 1:
            raise ValueError(f"max_pending is {self.max_pending}; it must be >= 1")


@dataclass(eq=False)
class _Request:
    request_id: str
    role: str
    frames: Sequence[Any]
    stream: ReplyStream | AsyncReplyStream
    shm_inputs: Mapping[str, SharedTensorHandle]
    queued_at: float = field(default_factory=time.monotonic)
    replica: Replica | None = None


@dataclass
class RouterCounters:
    replicas_joined: int = 0
    replicas_lost: int = 0
    requests_failed: int = 0
    protocol_errors: int = 0


class StageRouter:
    """Routes stage requests to replicas; see the module docstring."""

    def __init__(self, config: RouterConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.counters = RouterCounters()
        self._context = context or zmq.Context.instance()
        self._codec = stage_codec()
        self._reader = SharedTensorReader(prefix=config.shm_prefix)
        self._lock = threading.Lock()
        self._replicas = ReplicaTable()
        self._requests: dict[str, _Request] = {}
        self._pending: dict[str, deque[_Request]] = {}
        self._outbox: deque[tuple[bytes, list[Any]]] = deque()
        self._lost_listeners: list[LostListener] = []
        self._notices: list[tuple[ReplicaInfo, str, bool]] = []
        self._closing = threading.Event()
        self._wake_endpoint = f"inproc://omni-router-wake-{id(self):x}"
        self._wake_lock = threading.Lock()
        self._bound: BoundRouter | None = None
        self._wake: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._host_id = host_id()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The bound endpoint (with the real port when the config asked for port 0 or *)."""
        if self._bound is None:
            raise RuntimeError("the router is not started")
        return self._bound.endpoint

    def start(self) -> StageRouter:
        swept = sweep_dead_owners(self.config.shm_prefix)
        if swept:
            logger.info("removed %d shared-memory segments left by dead processes", len(swept))
        self._bound = BoundRouter(
            self._context,
            self.config.endpoint,
            self.config.sockets,
            self.config.curve,
            self.config.allow_tcp,
        )
        pull = self._context.socket(zmq.PULL)
        pull.bind(self._wake_endpoint)
        self._wake = self._context.socket(zmq.PUSH)
        self._wake.connect(self._wake_endpoint)
        self._thread = threading.Thread(
            target=self._io_main, args=(pull,), name="stage-router", daemon=True
        )
        self._thread.start()
        return self

    def close(self, shutdown_replicas: bool = False) -> None:
        """Stop routing; fail what is still in flight. Optionally ask replicas to exit."""
        if self._thread is None or self._closing.is_set():
            return
        if shutdown_replicas:
            with self._lock:
                for replica in self._replicas:
                    self._outbox.append(
                        (replica.identity, self._codec.encode(Shutdown(reason="router closed")))
                    )
        self._closing.set()
        self._poke()
        self._thread.join()
        with self._lock:
            for request in list(self._requests.values()):
                self._fail(
                    request, StageFailure(f"request {request.request_id} failed: the router closed")
                )
        if self._wake is not None:
            self._wake.close(linger=0)
        if self._bound is not None:
            self._bound.close()
        self._reader.close()

    def __enter__(self) -> StageRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------------

    def submit(
        self,
        role: str,
        inputs: Mapping[str, torch.Tensor] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        shm_inputs: Mapping[str, SharedTensorHandle] | None = None,
        request_id: str | None = None,
    ) -> ReplyStream:
        """Send a request to the least-loaded replica of `role`; iterate the result for replies.

        Tensors are sent without copying, so do not modify them until the request finishes.
        """
        request_id = request_id or uuid.uuid4().hex
        stream = ReplyStream(request_id, self.abort)
        self._enqueue(role, request_id, inputs, params, shm_inputs, stream)
        return stream

    def submit_async(
        self,
        role: str,
        inputs: Mapping[str, torch.Tensor] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        shm_inputs: Mapping[str, SharedTensorHandle] | None = None,
        request_id: str | None = None,
    ) -> AsyncReplyStream:
        """`submit` for asyncio callers; call it from inside the running event loop."""
        request_id = request_id or uuid.uuid4().hex
        stream = AsyncReplyStream(request_id, self.abort)
        self._enqueue(role, request_id, inputs, params, shm_inputs, stream)
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request: the replica is told, its shared-memory inputs are released."""
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is None:
                return
            request.stream.done = True
            self._release_inputs(request)
            if request.replica is None:
                with contextlib.suppress(ValueError):
                    self._pending[request.role].remove(request)
            else:
                request.replica.inflight.discard(request_id)
                self._outbox.append(
                    (request.replica.identity, self._codec.encode(Abort(request_id=request_id)))
                )
        self._poke()

    def replicas(self, role: str | None = None) -> list[ReplicaInfo]:
        with self._lock:
            return [r.info() for r in self._replicas if role is None or r.role == role]

    def wait_for_replicas(self, role: str, count: int = 1, timeout: float = 30.0) -> bool:
        """Block until `role` has at least `count` live replicas; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.replicas(role)) >= count:
                return True
            time.sleep(0.01)
        return len(self.replicas(role)) >= count

    def add_lost_listener(self, listener: LostListener) -> None:
        """Call `listener(info, reason, silent)` (I/O thread) whenever a replica is dropped."""
        self._lost_listeners.append(listener)

    def fail_replica(self, replica_id: str, reason: str) -> bool:
        """Take a replica out of routing now (its process died); False if it was not live."""
        with self._lock:
            replica = self._replicas.by_id(replica_id)
            if replica is not None:
                self._drop(replica, reason)
        self._poke()
        return replica is not None

    def forget_shm_owner(self, pid: int) -> None:
        """Drop cached mappings of a dead process's shared memory."""
        self._reader.forget_owner(pid)

    # -- caller-side helpers ------------------------------------------------------------------

    def _enqueue(
        self,
        role: str,
        request_id: str,
        inputs: Mapping[str, torch.Tensor] | None,
        params: Mapping[str, Any] | None,
        shm_inputs: Mapping[str, SharedTensorHandle] | None,
        stream: ReplyStream | AsyncReplyStream,
    ) -> None:
        if self._thread is None or self._closing.is_set():
            raise RuntimeError("the stage router is not running")
        message = StageRequest(
            request_id=request_id,
            inputs=dict(inputs or {}),
            shm_inputs=dict(shm_inputs or {}),
            params=dict(params or {}),
        )
        frames = self._codec.encode(message)
        request = _Request(request_id, role, frames, stream, dict(shm_inputs or {}))
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in flight")
            queued = sum(len(queue) for queue in self._pending.values())
            if queued >= self.config.max_pending:
                raise NoReplicaError(
                    f"request {request_id} refused: {queued} requests already wait for a replica "
                    f"(the limit is {self.config.max_pending})"
                )
            self._requests[request_id] = request
            self._pending.setdefault(role, deque()).append(request)
        self._poke()

    def _poke(self) -> None:
        if self._wake is None:
            return
        with self._wake_lock, contextlib.suppress(zmq.ZMQError):
            self._wake.send(b"", flags=zmq.NOBLOCK)

    # -- I/O thread ---------------------------------------------------------------------------

    def _io_main(self, wake: zmq.Socket) -> None:
        assert self._bound is not None
        router = self._bound.socket
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        tick_ms = max(1, int(min(50.0, self.config.heartbeat_interval_s * 500)))
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(tick_ms))
                if wake in events:
                    with contextlib.suppress(zmq.Again):
                        while True:
                            wake.recv(zmq.NOBLOCK)
                if router in events:
                    self._receive_all(router)
                with self._lock:
                    self._flush_outbox(router)
                    self._check_liveness()
                    self._dispatch(router)
                self._notify_lost()
            with self._lock:
                self._flush_outbox(router)  # a closing SHUTDOWN, if any
        finally:
            wake.close(linger=0)

    def _receive_all(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0].bytes
            try:
                message = self._codec.decode(frames[1:])
            except ProtocolError as exc:
                self.counters.protocol_errors += 1
                logger.warning("dropped an undecodable message from a stage: %s", exc)
                continue
            with self._lock:
                self._handle(router, identity, message)

    def _handle(self, router: zmq.Socket, identity: bytes, message: msgspec.Struct) -> None:
        if isinstance(message, Hello):
            self._admit(router, identity, message)
            return
        replica = self._replicas.by_identity(identity)
        if replica is None:
            if not isinstance(message, Goodbye):
                self._send(router, identity, HelloRequired(reason="unknown replica; say HELLO"))
            return
        replica.last_seen = time.monotonic()
        if isinstance(message, Heartbeat):
            self._send(router, identity, Heartbeat(replica_id=replica.replica_id))
        elif isinstance(message, StageReply):
            self._on_reply(replica, message)
        elif isinstance(message, StageError):
            self._on_error(replica, message)
        elif isinstance(message, Goodbye):
            self._drop(replica, f"left ({message.reason})" if message.reason else "left")
        else:
            logger.warning("%s sent an unexpected %s", replica.describe(), type(message).__name__)

    def _admit(self, router: zmq.Socket, identity: bytes, hello: Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            logger.error(
                "replica %s speaks protocol %d, not %d",
                hello.replica_id,
                hello.protocol_version,
                PROTOCOL_VERSION,
            )
            self._send(
                router,
                identity,
                Shutdown(reason=f"protocol {hello.protocol_version} is not {PROTOCOL_VERSION}"),
            )
            return
        known = self._replicas.by_identity(identity)
        if known is not None and known.replica_id == hello.replica_id:
            known.hello = hello  # the replica lost sight of us and said HELLO again
        else:
            if known is not None:
                self._drop(known, f"renamed itself to {hello.replica_id}")
            previous = self._replicas.by_id(hello.replica_id)
            if previous is not None:
                self._drop(previous, f"was replaced by a new process (pid {hello.pid})")
            shared = self.config.shared_memory and hello.host_id == self._host_id
            self._replicas.add(Replica(identity=identity, hello=hello, shared_memory=shared))
            self.counters.replicas_joined += 1
            logger.info(
                "stage %r replica %s joined: pid %d, device %s, capacity %d",
                hello.role,
                hello.replica_id,
                hello.pid,
                hello.device,
                hello.capacity,
            )
        replica = self._replicas.by_identity(identity)
        assert replica is not None
        replica.last_seen = time.monotonic()
        welcome = Welcome(
            replica_id=hello.replica_id,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            heartbeat_timeout_s=self.config.heartbeat_timeout_s,
            shared_memory=replica.shared_memory,
        )
        self._send(router, identity, welcome)

    def _on_reply(self, replica: Replica, reply: StageReply) -> None:
        request = self._requests.get(reply.request_id)
        if request is None or request.replica is not replica:
            for handle in reply.shm_outputs.values():  # a late reply to an aborted request
                self._reader.discard(handle)
            return
        tensors = dict(reply.outputs)
        try:
            for name, handle in reply.shm_outputs.items():
                tensors[name] = self._reader.open(handle, release_on_gc=True)
        except (OSError, ValueError) as exc:
            self._fail(
                request,
                StageFailure(f"request {request.request_id}: unreadable shared tensor: {exc}"),
            )
            return
        request.stream.deliver(
            Reply(
                request_id=reply.request_id,
                replica_id=replica.replica_id,
                tensors=tensors,
                data=reply.data,
                finished=reply.finished,
                handles=dict(reply.shm_outputs),
            )
        )
        if reply.finished:
            self._finish(request)

    def _on_error(self, replica: Replica, error: StageError) -> None:
        if not error.request_id:
            self.counters.protocol_errors += 1
            logger.warning("%s reported: %s", replica.describe(), error.message)
            return
        request = self._requests.get(error.request_id)
        if request is not None and request.replica is replica:
            self._fail(
                request,
                StageRequestError(
                    f"{replica.describe()} failed request {error.request_id}: {error.message}"
                ),
            )

    def _dispatch(self, router: zmq.Socket) -> None:
        now = time.monotonic()
        for role, queue in self._pending.items():
            while queue:
                replica = self._replicas.least_loaded(role)
                if replica is None:
                    break
                request = queue[0]
                sent = self._send_frames(router, replica.identity, request.frames)
                if sent == "unreachable":
                    self._drop(replica, "became unreachable")
                    continue
                if sent == "busy":
                    break  # the replica's queue is at its high-water mark: retry next tick
                queue.popleft()
                request.replica = replica
                request.frames = ()
                replica.inflight.add(request.request_id)
            while queue and now - queue[0].queued_at > self.config.pending_timeout_s:
                request = queue.popleft()
                live = len([r for r in self._replicas if r.role == role])
                self._fail(
                    request,
                    NoReplicaError(
                        f"request {request.request_id} waited {self.config.pending_timeout_s:g} s: "
                        f"no replica of stage {role!r} had room ({live} live)"
                    ),
                )

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for replica in self._replicas:
            silent = now - replica.last_seen
            if silent > self.config.heartbeat_timeout_s:
                self._drop(
                    replica, f"stopped responding (no heartbeat for {silent:.1f} s)", silent=True
                )

    def _drop(self, replica: Replica, reason: str, silent: bool = False) -> None:
        """Take `replica` out of routing and fail its requests (caller holds the lock)."""
        self._replicas.remove(replica)
        self.counters.replicas_lost += 1
        logger.warning(
            "%s %s; failing %d requests", replica.describe(), reason, len(replica.inflight)
        )
        for request_id in sorted(replica.inflight):
            request = self._requests.get(request_id)
            if request is not None:
                self._fail(
                    request,
                    ReplicaLostError(f"request {request_id} failed: {replica.describe()} {reason}"),
                )
        replica.inflight.clear()
        self._notices.append((replica.info(), reason, silent))

    def _fail(self, request: _Request, error: StageFailure) -> None:
        self.counters.requests_failed += 1
        self._release_inputs(request)
        request.stream.deliver(error)
        self._finish(request)

    def _finish(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        if request.replica is not None:
            request.replica.inflight.discard(request.request_id)

    def _release_inputs(self, request: _Request) -> None:
        for handle in request.shm_inputs.values():
            with contextlib.suppress(OSError, ValueError):
                self._reader.discard(handle)

    def _notify_lost(self) -> None:
        with self._lock:
            notices, self._notices = self._notices, []
        for info, reason, silent in notices:
            for listener in self._lost_listeners:
                try:
                    listener(info, reason, silent)
                except Exception:
                    logger.exception("replica-lost listener failed")

    def _flush_outbox(self, router: zmq.Socket) -> None:
        while self._outbox:
            identity, frames = self._outbox.popleft()
            self._send_frames(router, identity, frames)

    def _send(self, router: zmq.Socket, identity: bytes, message: msgspec.Struct) -> None:
        self._send_frames(router, identity, self._codec.encode(message))

    def _send_frames(self, router: zmq.Socket, identity: bytes, frames: Sequence[Any]) -> str:
        try:
            router.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return "busy"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return "unreachable"
            raise
        return "sent"
