"""A stage replica's links to its orchestrators: one DEALER per API process, on one I/O thread.

`omni serve --api-server-count N` runs N API processes, each with its own router; a replica
joins all of them and serves each as if it were the only one. Per link the thread says HELLO
until WELCOMEd, heartbeats, and says HELLO again when that orchestrator goes quiet or asks.
Incoming messages are decoded and handed on with the index of the link they came from, so that
the replies go back the same way; link 0 also carries the replica's peer calls.

The busy loop sends its frames over an inproc PUSH socket, each message preceded by one frame
holding its link's index (`ALL_LINKS` for every link); an empty frame asks the thread to flush
and exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgspec
import zmq
from omni.stages.runtime.config import StageConfig
from omni.transport.codec import ProtocolError
from omni.transport.messages import (
    Abort,
    Heartbeat,
    Hello,
    HelloRequired,
    Shutdown,
    StageError,
    StageReplies,
    StageReply,
    StageRequest,
    Welcome,
    stage_codec,
)
from omni.transport.sealed import BulkOffer, SealedChannel
from omni.transport.sealed_peers import SealedPeers
from omni.transport.sockets import connect_dealer
from zmq.utils.monitor import recv_monitor_message

logger = logging.getLogger(__name__)

ALL_LINKS = 255
# What a tcp link's monitor reports: the server refused our key, or spoke another mechanism.
_HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
CLOSE = b""
# What the busy loop is handed: work for this stage, or answers to its peer calls.
Inbound: TypeAlias = StageRequest | Abort | StageReply | StageError


@dataclass
class _Link:
    endpoint: str
    dealer: zmq.Socket
    # Reports failed handshakes on tcp (a server that refuses this stage's key).
    handshakes: zmq.Socket | None = None
    welcomed: bool = False
    last_heard: float = field(default_factory=time.monotonic)
    backlog: deque[Sequence[zmq.Frame]] = field(default_factory=deque)
    # The session of the sealed bulk channel this link last lost: a WELCOME still offering it
    # (sent before the router saw the loss) is not taken up again.
    lost_session: bytes = b""


class RouterLinks:
    """The I/O thread's side of a replica (see the module docstring)."""

    def __init__(
        self,
        config: StageConfig,
        context: zmq.Context,
        out_endpoint: str,
        deliver: Callable[[int, Inbound], None],
        heartbeat: Callable[[], Heartbeat],
        hello: Callable[[], Hello],
        stop: Callable[[str], None],
    ) -> None:
        self.config = config
        self._context = context
        self._out_endpoint = out_endpoint
        self._deliver = deliver
        self._heartbeat = heartbeat
        self._hello = hello
        self._stop = stop
        self._codec = stage_codec()
        self.protocol_errors = 0
        # Set from link 0's WELCOME: whether replies may use shared memory, and the interval.
        self.shared_memory = False
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.all_welcomed = threading.Event()
        # Set when a server refused this stage's CURVE key: no retry can succeed.
        self.refused_by = ""
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self._links: list[_Link] = []
        # Large messages on CURVE links travel sealed beside the CURVE socket (keyed by link).
        self._sealed = SealedPeers()

    def run(self) -> None:
        """The thread's body: connect, then serve until the close marker."""
        links = self._links
        try:
            for endpoint in self.config.endpoints:
                dealer = connect_dealer(
                    self._context, endpoint, self.config.sockets, self.config.curve
                )
                handshakes = None
                if endpoint.startswith("tcp://"):
                    handshakes = dealer.get_monitor_socket(_HANDSHAKE_FAILURES)
                links.append(_Link(endpoint, dealer, handshakes))
            pull = self._context.socket(zmq.PULL)
            pull.bind(self._out_endpoint)
        except BaseException as exc:
            self.failure = exc
            self.ready.set()
            for link in links:
                _close(link)
            raise
        self.ready.set()
        try:
            self._loop(links, pull)
        except Exception as exc:
            logger.exception("stage I/O thread failed; the stage exits")
            self._stop(f"I/O failed: {type(exc).__name__}: {exc}")
            # Keep taking what the busy loop sends until its close marker, so it never blocks
            # on a socket nobody reads.
            while True:
                frames = pull.recv_multipart(copy=False)
                if len(frames) == 1 and len(frames[0]) == 0:
                    break
            raise
        finally:
            pull.close(linger=0)
            self._sealed.close(drain_s=self.config.sockets.linger_ms / 1000)
            for link in links:
                _close(link)

    def _loop(self, links: list[_Link], pull: zmq.Socket) -> None:
        closing = False
        next_beat = 0.0
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(self._sealed.fileno(), zmq.POLLIN)
        while True:
            for link in links:
                writable = zmq.POLLOUT if link.backlog and link.welcomed else 0
                poller.register(link.dealer, zmq.POLLIN | writable)
                if link.handshakes is not None:
                    poller.register(link.handshakes, zmq.POLLIN)
            wait_ms = max(0.0, next_beat - time.monotonic()) * 1000
            events = dict(poller.poll(0 if closing else int(wait_ms)))
            if events.get(pull):
                closing = self._take_outgoing(pull, links)
            if events.get(self._sealed.fileno()):
                self._poll_sealed(links)
            for index, link in enumerate(links):
                if link.handshakes is not None and events.get(link.handshakes):
                    self._handshake_failed(link)
                if events.get(link.dealer, 0) & zmq.POLLIN:
                    link.last_heard = time.monotonic()
                    self._receive(index, link)
                # An orchestrator drops what a replica it has not WELCOMEd sends (it answers
                # HelloRequired), so messages wait until it has: a peer call made while link
                # 0 is still joining, say, once another API process gave this replica work.
                if link.welcomed:
                    self._flush(index, link)
            if closing:
                # Give queued replies and the GOODBYE their chance before the sockets close.
                deadline = time.monotonic() + self.config.sockets.linger_ms / 1000
                while any(link.backlog for link in links) and time.monotonic() < deadline:
                    for index, link in enumerate(links):
                        self._flush(index, link)
                    time.sleep(0.001)
                return
            now = time.monotonic()
            for link in links:
                if link.welcomed and now - link.last_heard > self.config.server_timeout_s:
                    logger.warning(
                        "no word from %s for %.1f s; saying HELLO again",
                        link.endpoint,
                        now - link.last_heard,
                    )
                    link.welcomed = False
                    self.all_welcomed.clear()
            if now >= next_beat:
                for link in links:
                    self._beat(link)
                next_beat = now + self.heartbeat_interval_s
                if self.config.parent_pid is not None and os.getppid() != self.config.parent_pid:
                    self._stop("parent process exited")

    def _flush(self, index: int, link: _Link) -> None:
        while link.backlog:
            sent = self._sealed.send(index, link.backlog[0], lambda frames: _send_now(link, frames))
            if sent != "sent":
                return  # high-water mark reached: wait for POLLOUT
            link.backlog.popleft()

    def _poll_sealed(self, links: list[_Link]) -> None:
        ready, closed = self._sealed.poll()
        for index, frames in ready:
            self._decode_and_handle(int(index), links[int(index)], frames)
        for index, channel in closed:
            link = links[int(index)]
            logger.warning(
                "the sealed bulk channel to %s closed (%s); saying HELLO again",
                link.endpoint,
                channel.reason,
            )
            link.lost_session = channel.session_id
            link.welcomed = False
            self.all_welcomed.clear()
            self._beat(link)

    def _take_bulk_offer(self, index: int, link: _Link, welcome: Welcome) -> None:
        """Open the sealed bulk channel a WELCOME offers (over CURVE, on tcp only), unless it
        is the one already open or one this link lost."""
        if not welcome.bulk_port or self.config.curve is None:
            return
        if not link.endpoint.startswith("tcp://") or welcome.bulk_session == link.lost_session:
            return
        current = self._sealed.channel(index)
        if current is not None and current.session_id == welcome.bulk_session:
            return
        try:
            offer = BulkOffer(welcome.bulk_port, welcome.bulk_session, welcome.bulk_key)
        except ValueError as exc:
            logger.warning("ignored a bad sealed bulk offer from %s: %s", link.endpoint, exc)
            return
        host = link.endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
        channel = SealedChannel.connect(
            host,
            offer,
            notify=self._sealed.notify,
            max_message_bytes=self.config.sockets.max_message_bytes,
        )
        self._sealed.attach(index, channel)
        logger.info("opening a sealed bulk channel to %s:%d", host, offer.port)

    def _handshake_failed(self, link: _Link) -> None:
        assert link.handshakes is not None
        while True:
            try:
                event = recv_monitor_message(link.handshakes, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                # The server's authenticator said no: this key is not on its allow-list. That
                # will not change by trying again, so the stage stops with the reason.
                key = self.config.curve.public_key if self.config.curve else "(none)"
                self.refused_by = link.endpoint
                logger.error(
                    "%s refused this stage: its CURVE client key %s is not on the server's "
                    "allow-list (the server's --stage-keys folder, clients/*.key)",
                    link.endpoint,
                    key,
                )
                self._stop(f"refused by {link.endpoint}: CURVE key not allowed")
            else:
                logger.warning(
                    "handshake with %s failed (event %s): does the server use CURVE keys? "
                    "Stages of a server with --stage-keys need --server-key and --client-key",
                    link.endpoint,
                    event["event"],
                )

    def _take_outgoing(self, pull: zmq.Socket, links: list[_Link]) -> bool:
        """Queue what the busy loop sent on its links; True at the close marker."""
        while True:
            try:
                frames = pull.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
            if len(frames) == 1 and len(frames[0]) == 0:
                return True
            target = frames[0].bytes[0]
            for index, link in enumerate(links):
                if target in (index, ALL_LINKS):
                    link.backlog.append(frames[1:])

    def _beat(self, link: _Link) -> None:
        message = self._heartbeat() if link.welcomed else self._hello()
        # Dropped when the orchestrator is unreachable: the next beat says it again.
        with contextlib.suppress(zmq.Again):
            link.dealer.send_multipart(self._codec.encode(message), flags=zmq.NOBLOCK)

    def _receive(self, index: int, link: _Link) -> None:
        while True:
            try:
                frames = link.dealer.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            for ready in self._sealed.receive(index, frames):
                self._decode_and_handle(index, link, ready)

    def _decode_and_handle(self, index: int, link: _Link, frames: Sequence[zmq.Frame]) -> None:
        try:
            message = self._codec.decode(frames)
        except ProtocolError as exc:
            self.protocol_errors += 1
            logger.warning("dropped an undecodable message: %s", exc)
            _reply_now(
                link,
                self._codec.encode(
                    StageError(request_id="", message=f"undecodable message: {exc}")
                ),
            )
            return
        self._handle(index, link, message)

    def _handle(self, index: int, link: _Link, message: msgspec.Struct) -> None:
        if isinstance(message, StageRequest | Abort | StageReply | StageError):
            # A StageReply or StageError from the orchestrator answers a peer call.
            if isinstance(message, StageError) and not message.request_id:
                logger.warning("%s reported: %s", link.endpoint, message.message)
            else:
                self._deliver(index, message)
        elif isinstance(message, StageReplies):
            for reply in message.replies:
                self._deliver(index, reply)
        elif isinstance(message, Welcome):
            if index == 0:
                self.shared_memory = message.shared_memory
                self.heartbeat_interval_s = message.heartbeat_interval_s
            link.welcomed = True
            self._take_bulk_offer(index, link, message)
            logger.info(
                "replica %s joined %s (shared memory: %s)",
                message.replica_id,
                link.endpoint,
                message.shared_memory,
            )
            if all(other.welcomed for other in self._links):
                self.all_welcomed.set()
        elif isinstance(message, HelloRequired):
            link.welcomed = False
            self.all_welcomed.clear()
            self._beat(link)
        elif isinstance(message, Shutdown):
            reason = message.reason
            self._stop(f"orchestrator asked: {reason}" if reason else "orchestrator asked")
        elif not isinstance(message, Heartbeat):
            error = StageError(request_id="", message=f"unexpected {type(message).__name__}")
            _reply_now(link, self._codec.encode(error))


def _close(link: _Link) -> None:
    if link.handshakes is not None:
        link.dealer.disable_monitor()
        link.handshakes.close(linger=0)
    link.dealer.close()


def _send_now(link: _Link, frames: Sequence[Any]) -> str:
    try:
        link.dealer.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
    except zmq.Again:
        return "busy"
    return "sent"


def _reply_now(link: _Link, frames: list[bytes | bytearray | memoryview]) -> None:
    with contextlib.suppress(zmq.Again):
        link.dealer.send_multipart(frames, flags=zmq.NOBLOCK)
