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
from typing import Any

import torch
import zmq

from omni.supervision.replicas import ReplicaInfo
from omni.supervision.routing import (
    CONNECTION_CLOSED,
    PendingRequest,
    RouterConfig,
    RouterCounters,
    RoutingState,
)
from omni.supervision.streams import (
    AsyncReplyStream,
    NoReplicaError,
    ReplyStream,
    StageFailure,
)
from omni.transport.codec import ProtocolError
from omni.transport.messages import (
    Shutdown,
    StageRequest,
    stage_codec,
)
from omni.transport.sealed import BulkListener
from omni.transport.sealed_peers import SealedPeers
from omni.transport.shm import (
    SharedTensorHandle,
    SharedTensorReader,
    sweep_dead_owners,
)
from omni.transport.sockets import BoundRouter

logger = logging.getLogger(__name__)

# After a tcp connection closes, replicas are probed every tick for this long: the monitor's
# event can come before the ROUTER has let go of the connection, when a send still succeeds.
_PROBE_WINDOW_S = 1.0

# listener(info, reason, silent): silent means alive as far as we know but not heartbeating,
# or heartbeating while its worker is hung: either way, a process to kill.
LostListener = Callable[[ReplicaInfo, str, bool], None]


class StageRouter:
    """Routes stage requests to replicas; see the module docstring."""

    def __init__(self, config: RouterConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self._context = context or zmq.Context.instance()
        self._codec = stage_codec()
        self._reader = SharedTensorReader(prefix=config.shm_prefix)
        self._lock = threading.Lock()
        self._state = RoutingState(config, self._codec, self._reader, self._send_frames)
        self._outbox: deque[tuple[bytes, list[Any]]] = deque()
        self._lost_listeners: list[LostListener] = []
        self._closing = threading.Event()
        self._wake_endpoint = f"inproc://omni-router-wake-{id(self):x}"
        self._wake_lock = threading.Lock()
        self._bound: BoundRouter | None = None
        # Large messages of CURVE stages on other hosts, sealed beside the CURVE socket.
        self._sealed: SealedPeers | None = None
        self._bulk: BulkListener | None = None
        self._wake: zmq.Socket | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The bound endpoint (with the real port when the config asked for port 0 or *)."""
        if self._bound is None:
            raise RuntimeError("the router is not started")
        return self._bound.endpoint

    @property
    def remote_endpoint(self) -> str | None:
        """The tcp endpoint stages on other hosts join (real port), or None."""
        if self._bound is None:
            raise RuntimeError("the router is not started")
        return self._bound.remote_endpoint if self.config.remote_endpoint else None

    def allow_client(self, public_key: str) -> None:
        """Admit stages holding the CURVE `public_key` from now on (a Ray actor's)."""
        if self._bound is None:
            raise RuntimeError("the router is not started")
        self._bound.allow_client(public_key)

    def disallow_client(self, public_key: str) -> None:
        """Admit no new connection holding `public_key` (a stage that is gone for good)."""
        if self._bound is not None:
            self._bound.disallow_client(public_key)

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
            self.config.remote_endpoint,
        )
        remote = self._bound.remote_endpoint
        if self.config.curve is not None and remote is not None:
            self._start_sealed_bulk(remote)
        pull = self._context.socket(zmq.PULL)
        pull.bind(self._wake_endpoint)
        self._wake = self._context.socket(zmq.PUSH)
        self._wake.connect(self._wake_endpoint)
        self._thread = threading.Thread(
            target=self._io_main, args=(pull,), name="stage-router", daemon=True
        )
        self._thread.start()
        return self

    def _start_sealed_bulk(self, remote: str) -> None:
        """Listen for sealed bulk channels on the host the CURVE endpoint is bound to (never a
        wider interface), and offer one to each CURVE stage that asks in its HELLO."""
        host = remote.removeprefix("tcp://").rpartition(":")[0]
        self._sealed = SealedPeers()
        self._bulk = BulkListener(
            host,
            self._sealed.adopt,
            self._sealed.notify,
            port=self.config.bulk_port,
            max_message_bytes=self.config.sockets.max_message_bytes,
        )
        self._state.offer_bulk = self._bulk.offer
        logger.info("sealed bulk channels for CURVE stages on %s:%d", host, self._bulk.port)

    @property
    def bulk_port(self) -> int | None:
        """The port of the sealed bulk channels (None without CURVE on tcp)."""
        return self._bulk.port if self._bulk is not None else None

    @property
    def sealed_peers(self) -> SealedPeers | None:
        return self._sealed

    def close(self, shutdown_replicas: bool = False) -> None:
        """Stop routing; fail what is still in flight. Optionally ask replicas to exit."""
        if self._thread is None or self._closing.is_set():
            return
        if shutdown_replicas:
            with self._lock:
                for replica in self._state.replicas:
                    self._outbox.append(
                        (replica.identity, self._codec.encode(Shutdown(reason="router closed")))
                    )
        self._closing.set()
        self._poke()
        self._thread.join()
        with self._lock:
            for request in list(self._state.requests.values()):
                self._state.fail(
                    request, StageFailure(f"request {request.request_id} failed: the router closed")
                )
        if self._wake is not None:
            self._wake.close(linger=0)
        if self._bulk is not None:
            self._bulk.close()
        if self._sealed is not None:
            self._sealed.close(drain_s=self.config.sockets.linger_ms / 1000)
        if self._bound is not None:
            self._bound.close()
        self._reader.close()

    def __enter__(self) -> StageRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------------

    @property
    def counters(self) -> RouterCounters:
        """Replicas joined and lost, requests failed, protocol errors (for metrics)."""
        return self._state.counters

    def submit(
        self,
        role: str,
        inputs: Mapping[str, torch.Tensor] | None = None,
        body: bytes = b"",
        *,
        shm_inputs: Mapping[str, SharedTensorHandle] | None = None,
        request_id: str | None = None,
        prefer: str | None = None,
    ) -> ReplyStream:
        """Send a request to the least-loaded replica of `role` (or to `prefer`, a replica id,
        while it is not much busier); iterate the result for replies. `body` is the role's
        request struct, encoded by its contract.

        Tensors are sent without copying, so do not modify them until the request finishes.
        """
        request_id = request_id or uuid.uuid4().hex
        stream = ReplyStream(request_id, self.abort)
        self._enqueue(role, request_id, inputs, body, shm_inputs, stream, prefer)
        return stream

    def submit_async(
        self,
        role: str,
        inputs: Mapping[str, torch.Tensor] | None = None,
        body: bytes = b"",
        *,
        shm_inputs: Mapping[str, SharedTensorHandle] | None = None,
        request_id: str | None = None,
        prefer: str | None = None,
    ) -> AsyncReplyStream:
        """`submit` for asyncio callers; call it from inside the running event loop."""
        request_id = request_id or uuid.uuid4().hex
        stream = AsyncReplyStream(request_id, self.abort)
        self._enqueue(role, request_id, inputs, body, shm_inputs, stream, prefer)
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request: the replica is told, its shared-memory inputs are released."""
        with self._lock:
            request = self._state.requests.get(request_id)
            if request is not None:
                self._state.abort(request)
        self._poke()

    def load_snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """(requests waiting for a replica, by role; requests sent, by (role, replica id)),
        copied under the lock for metrics."""
        with self._lock:
            waiting = {role: len(queue) for role, queue in self._state.pending.items()}
            return waiting, dict(self._state.dispatched)

    def replica_ids(self, role: str) -> list[str]:
        """Ids of the live replicas of `role` (cheaper than `replicas` for every request)."""
        with self._lock:
            return [r.replica_id for r in self._state.replicas if r.role == role]

    def replicas(self, role: str | None = None) -> list[ReplicaInfo]:
        with self._lock:
            return [r.info() for r in self._state.replicas if role is None or r.role == role]

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
            replica = self._state.replicas.by_id(replica_id)
            if replica is not None:
                self._state.drop(replica, reason)
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
        body: bytes,
        shm_inputs: Mapping[str, SharedTensorHandle] | None,
        stream: ReplyStream | AsyncReplyStream,
        prefer: str | None,
    ) -> None:
        if self._thread is None or self._closing.is_set():
            raise RuntimeError("the stage router is not running")
        message = StageRequest(
            request_id=request_id,
            inputs=dict(inputs or {}),
            shm_inputs=dict(shm_inputs or {}),
            body=body,
        )
        frames = self._codec.encode(message)
        request = PendingRequest(
            request_id, role, frames, stream, dict(shm_inputs or {}), prefer=prefer
        )
        with self._lock:
            if request_id in self._state.requests:
                raise ValueError(f"request id {request_id!r} is already in flight")
            queued = sum(len(queue) for queue in self._state.pending.values())
            if queued >= self.config.max_pending:
                raise NoReplicaError(
                    f"request {request_id} refused: {queued} requests already wait for a replica "
                    f"(the limit is {self.config.max_pending})"
                )
            self._state.requests[request_id] = request
            self._state.pending.setdefault(role, deque()).append(request)
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
        if self._bound.disconnects is not None:
            poller.register(self._bound.disconnects, zmq.POLLIN)
        if self._sealed is not None:
            poller.register(self._sealed.fileno(), zmq.POLLIN)
        tick_ms = max(1, int(min(50.0, self.config.heartbeat_interval_s * 500)))
        # Until when to look for replicas whose connection closed (see `_probe_closed`).
        probe_until = 0.0
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(tick_ms))
                if self._bound.take_disconnects():
                    probe_until = time.monotonic() + _PROBE_WINDOW_S
                if wake in events:
                    with contextlib.suppress(zmq.Again):
                        while True:
                            wake.recv(zmq.NOBLOCK)
                if router in events:
                    self._receive_all(router)
                if self._sealed is not None:
                    self._poll_sealed(self._sealed)
                self._reader.release_deferred()  # replies whose tensors the caller dropped
                with self._lock:
                    self._flush_outbox(router)
                    if time.monotonic() < probe_until:
                        self._state.probe_connections()
                    self._state.check_liveness()
                    self._state.dispatch()
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
            if self._sealed is None:
                self._handle_frames(identity, frames[1:])
                continue
            for ready in self._sealed.receive(identity, frames[1:]):
                self._handle_frames(identity, ready)

    def _handle_frames(self, identity: bytes, frames: Sequence[Any]) -> None:
        try:
            message = self._codec.decode(frames)
        except ProtocolError as exc:
            self._state.counters.protocol_errors += 1
            logger.warning("dropped an undecodable message from a stage: %s", exc)
            return
        with self._lock:
            self._state.handle(identity, message)

    def _poll_sealed(self, sealed: SealedPeers) -> None:
        """Sealed messages that arrived, channels that closed (their replicas are dropped:
        what was in flight on them is lost), channels of replicas that are gone."""
        ready, closed = sealed.poll()
        for identity, frames in ready:
            self._handle_frames(identity, frames)
        assert self._bulk is not None
        with self._lock:
            for identity, channel in closed:
                self._bulk.revoke(identity)
                replica = self._state.replicas.by_identity(identity)
                if replica is not None:
                    # A peer that hung up is a stage that went away, as when its CURVE
                    # connection closes; anything else (a failed tag) is named.
                    hung_up = "closed the connection" in channel.reason
                    reason = f"lost its sealed bulk channel ({channel.reason})"
                    self._state.drop(replica, CONNECTION_CLOSED if hung_up else reason)
            live = {replica.identity for replica in self._state.replicas}
            for identity in self._bulk.peers():
                if identity not in live:
                    self._bulk.revoke(identity)
                    sealed.detach(identity, "its replica is gone")

    def _notify_lost(self) -> None:
        with self._lock:
            notices, self._state.notices = self._state.notices, []
        for info, reason, silent in notices:
            for listener in self._lost_listeners:
                try:
                    listener(info, reason, silent)
                except Exception:
                    logger.exception("replica-lost listener failed")

    def _flush_outbox(self, router: zmq.Socket) -> None:
        while self._outbox:
            identity, frames = self._outbox.popleft()
            self._send_frames(identity, frames)

    def _send_frames(self, identity: bytes, frames: Sequence[Any]) -> str:
        """Send without blocking (I/O thread only); see `routing.Send` for the results."""
        if self._sealed is not None:
            return self._sealed.send(
                identity, frames, lambda control: self._send_control(identity, control)
            )
        return self._send_control(identity, frames)

    def _send_control(self, identity: bytes, frames: Sequence[Any]) -> str:
        assert self._bound is not None
        try:
            self._bound.socket.send_multipart([identity, *frames], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return "busy"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return "unreachable"
            raise
        return "sent"
