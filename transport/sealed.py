"""An AES-256-GCM sealed TCP channel for the large messages of a CURVE-keyed stage link.

Why it exists: ZeroMQ's CURVE encrypts every frame with XSalsa20-Poly1305 (libsodium), which on
the 2-core CPU machine takes about 25 ms for one 18 MB embedding page, three times the whole
transfer over a plain socket (docs/benchmarks.md, issue 15). AES-256-GCM with AES-NI/VAES does
the same bytes in 2 to 8 ms there. So a stage link keyed with CURVE keeps CURVE for its
handshake and every control message, and carries messages over `BULK_THRESHOLD` bytes on this
channel instead, sealed with a session key that only ever travelled inside the CURVE channel.

How one channel is set up and used:

- The router's WELCOME (CURVE-encrypted, to a peer whose CURVE key the router admitted) offers a
  `BulkOffer`: the port of a `BulkListener` bound on the host of the router's CURVE endpoint, a
  random 16-byte session id and a random 32-byte session key, fresh for every stage connection.
- The stage connects to that port and sends the session id and a proof record sealed with the
  key; the router answers with a proof of its own. A connection that does not open a known,
  unused session's proof within `HANDSHAKE_TIMEOUT_S` is closed and logged; a session admits one
  connection, ever, so a recorded handshake cannot be replayed.
- Every record is `[16-byte GCM tag][ciphertext]`. Its nonce is a 4-byte direction (so the two
  directions never share a nonce under the one key) and an 8-byte record counter that both sides
  count themselves and never read from the wire: a replayed, reordered, dropped or injected
  record fails its tag. The additional data binds the message id and the record's place in it.
- A message is a small clear frame count, a header record (message id, frame lengths), then each
  frame's bytes in records of at most `CHUNK_BYTES`. The receiver allocates each frame once,
  reads each record's ciphertext straight into it and decrypts it there in place; the sender
  encrypts record k+1 while the kernel moves record k, so on a real network the cipher's cost
  hides behind the transfer (on loopback the transfer is CPU copies too: docs/benchmarks.md).
- Message ids count up from 1 in each direction; the receiver takes them only in that order. A
  record that fails its tag drops its message, is logged, and closes the channel (a stream that
  was tampered with cannot be trusted further); the process stays up and its owner sets up a new
  channel (see `omni.transport.sealed_peers`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

logger = logging.getLogger(__name__)

# Messages at least this large (all frames together) take the sealed channel.
BULK_THRESHOLD = 1024 * 1024
# Plaintext bytes per record: large enough that per-record costs vanish, small enough that the
# receiver decrypts one record while the next is on the wire and that a record stays in a core's
# L2 between its copy and its cipher. Measured on the 2-core machine (docs/benchmarks.md): 2 MiB
# beat 256 KiB, 1, 4 and 8 MiB.
CHUNK_BYTES = 2 * 1024 * 1024
KEY_BYTES = 32
SESSION_ID_BYTES = 16
TAG_BYTES = 16
HANDSHAKE_TIMEOUT_S = 2.0
# Frames per message; the stage codec allows 1024 tensor frames plus its header.
MAX_FRAMES = 1025
# Messages queued to be sealed and sent before `send` reports busy: the stage sockets' own
# send high-water mark (SocketOptions.send_hwm), so a channel refuses no more than ZeroMQ would.
MAX_QUEUED = 1000
# Messages received whole but not yet claimed by their ticket: beyond this the receiver stops
# reading, and TCP pushes back on the sender, until the owner catches up with its tickets.
MAX_UNCLAIMED = 64

_CLIENT_TO_SERVER = b"\x00\x00\x00\x01"
_SERVER_TO_CLIENT = b"\x00\x00\x00\x02"
_HELLO = b"omni sealed bulk: client proof"
_WELCOME = b"omni sealed bulk: server proof"
_COUNT = struct.Struct("!I")
_MESSAGE_ID = struct.Struct("!Q")
_RECORD_AAD = struct.Struct("!QII")

Frame = Any  # bytes, bytearray, memoryview or zmq.Frame


class SealedChannelError(ConnectionError):
    """The sealed channel cannot go on (a failed tag, a closed connection, a bad header)."""


@dataclass(frozen=True)
class BulkOffer:
    """What the router's WELCOME hands a stage over CURVE: where and how to open the channel."""

    port: int
    session_id: bytes
    key: bytes

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"bulk port {self.port} is not a TCP port")
        if len(self.session_id) != SESSION_ID_BYTES or len(self.key) != KEY_BYTES:
            raise ValueError(
                f"a bulk offer needs a {SESSION_ID_BYTES}-byte session id and a {KEY_BYTES}-byte "
                "key"
            )


class RecordCipher:
    """One direction's record cipher: the key, its nonce prefix and its record counter."""

    def __init__(self, key: bytes, direction: bytes, counter: int = 0) -> None:
        self._algorithm = algorithms.AES(key)
        self._direction = direction
        self._counter = counter

    def _nonce(self) -> bytes:
        nonce = self._direction + self._counter.to_bytes(8, "big")
        self._counter += 1
        return nonce

    def seal_into(self, plain: memoryview, aad: bytes, record: memoryview) -> memoryview:
        """Seal `plain` into `record` ([tag][ciphertext]); returns the used part of `record`."""
        encryptor = Cipher(self._algorithm, modes.GCM(self._nonce())).encryptor()
        encryptor.authenticate_additional_data(aad)
        size = plain.nbytes
        encryptor.update_into(plain, record[TAG_BYTES : TAG_BYTES + size])
        encryptor.finalize()
        record[:TAG_BYTES] = encryptor.tag
        return record[: TAG_BYTES + size]

    def open_into(self, record: memoryview, aad: bytes, plain: memoryview) -> None:
        """Verify and decrypt `record` into `plain`; InvalidTag when it does not open."""
        self.open_in_place(bytes(record[:TAG_BYTES]), record[TAG_BYTES:], aad, plain)

    def open_in_place(
        self, tag: bytes, sealed: memoryview, aad: bytes, plain: memoryview | None = None
    ) -> None:
        """Verify and decrypt `sealed` (the ciphertext after `tag`) into `plain`, by default
        over itself; InvalidTag when it does not open (its bytes are then garbage)."""
        decryptor = Cipher(self._algorithm, modes.GCM(self._nonce())).decryptor()
        decryptor.authenticate_additional_data(aad)
        decryptor.update_into(sealed, sealed if plain is None else plain)
        decryptor.finalize_with_tag(tag)


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; SealedChannelError (a ConnectionError) if the peer closes first."""
    while view.nbytes:
        count = sock.recv_into(view)
        if count == 0:
            raise SealedChannelError("the peer closed the connection")
        view = view[count:]


def frame_view(frame: Frame) -> memoryview:
    """A flat byte view of one frame of any kind a socket hands out or takes."""
    buffer = getattr(frame, "buffer", None)  # a zmq.Frame
    view = buffer if isinstance(buffer, memoryview) else memoryview(frame)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def message_bytes(frames: Sequence[Frame]) -> int:
    """All frames' bytes together (what `BULK_THRESHOLD` is compared with)."""
    return sum(frame_view(frame).nbytes for frame in frames)


def _proof(sealer: RecordCipher, text: bytes, session_id: bytes) -> bytes:
    plain = memoryview(text + session_id)
    record = memoryview(bytearray(TAG_BYTES + plain.nbytes))
    return bytes(sealer.seal_into(plain, session_id, record))


def _check_proof(sealer: RecordCipher, sock: socket.socket, text: bytes, session_id: bytes) -> bool:
    record = memoryview(bytearray(TAG_BYTES + len(text) + SESSION_ID_BYTES))
    recv_exactly(sock, record)
    plain = memoryview(bytearray(len(text) + SESSION_ID_BYTES))
    try:
        sealer.open_into(record, session_id, plain)
    except InvalidTag:
        return False
    return bytes(plain) == text + session_id


class SealedChannel:
    """One authenticated TCP connection carrying sealed messages both ways.

    A sender thread seals and writes what `send` queues; a receiver thread reads, verifies and
    decrypts whole messages, which `take` hands out by message id. `notify` is called (from those
    threads) whenever a message arrived or the channel closed.
    """

    def __init__(
        self,
        key: bytes,
        *,
        initiator: bool,
        notify: Callable[[], None],
        max_message_bytes: int,
        name: str,
        session_id: bytes,
        records_opened: int = 0,
    ) -> None:
        self.name = name
        self.session_id = session_id
        outgoing, incoming = (
            (_CLIENT_TO_SERVER, _SERVER_TO_CLIENT)
            if initiator
            else (_SERVER_TO_CLIENT, _CLIENT_TO_SERVER)
        )
        self._seal = RecordCipher(key, outgoing)
        self._open = RecordCipher(key, incoming, records_opened)
        self._notify = notify
        self._max_message_bytes = max_message_bytes
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._claimed = threading.Condition(self._lock)
        self._outbox: queue.Queue[tuple[int, Sequence[Frame]] | None] = queue.Queue()
        self._arrived: dict[int, list[memoryview]] = {}
        self._next_send_id = 1
        self._next_receive_id = 1
        self.ready = threading.Event()
        self.closed = False
        self._torn_down = False
        self.reason = ""
        self.messages_sent = 0
        self.messages_received = 0
        self._threads: list[threading.Thread] = []

    # -- setting up ---------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        host: str,
        offer: BulkOffer,
        *,
        notify: Callable[[], None],
        max_message_bytes: int,
    ) -> SealedChannel:
        """The stage's side: connect and prove the key on a thread of its own (a firewalled
        port must not stall the caller); `ready` is set once the router has proved it too."""
        channel = cls(
            offer.key,
            initiator=True,
            notify=notify,
            max_message_bytes=max_message_bytes,
            name=f"{host}:{offer.port}",
            session_id=offer.session_id,
        )
        channel._start(lambda: channel._dial(host, offer))
        return channel

    @classmethod
    def accepted(
        cls,
        sock: socket.socket,
        key: bytes,
        *,
        notify: Callable[[], None],
        max_message_bytes: int,
        name: str,
        session_id: bytes,
        adopt: Callable[[SealedChannel], None],
    ) -> SealedChannel:
        """The router's side, for a connection whose proof `BulkListener` checked: `adopt` gets
        the channel before the router's own proof goes out, so its owner knows the channel
        before the stage, having read that proof, can send a ticket for it."""
        channel = cls(
            key,
            initiator=False,
            notify=notify,
            max_message_bytes=max_message_bytes,
            name=name,
            session_id=session_id,
            # The listener opened the stage's proof, record 0 of its direction.
            records_opened=1,
        )
        adopt(channel)
        channel._start(lambda: channel._answer(sock))
        return channel

    def _answer(self, sock: socket.socket) -> socket.socket:
        try:
            sock.sendall(_proof(self._seal, _WELCOME, self.session_id))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def _dial(self, host: str, offer: BulkOffer) -> socket.socket:
        sock = socket.create_connection((host, offer.port), timeout=HANDSHAKE_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(offer.session_id + _proof(self._seal, _HELLO, offer.session_id))
            if not _check_proof(self._open, sock, _WELCOME, offer.session_id):
                raise SealedChannelError("the router's proof does not open with the session key")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def _start(self, dial: Callable[[], socket.socket]) -> None:
        receiver = threading.Thread(
            target=self._receive_loop, args=(dial,), name=f"sealed-recv {self.name}", daemon=True
        )
        sender = threading.Thread(
            target=self._send_loop, name=f"sealed-send {self.name}", daemon=True
        )
        self._threads = [receiver, sender]
        receiver.start()
        sender.start()

    # -- the owner's side ---------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Both sides proved the key and the channel has not closed."""
        return self.ready.is_set() and not self.closed

    def busy(self) -> bool:
        """Whether `send` should wait: the queue of messages to seal is full."""
        return self._outbox.qsize() >= MAX_QUEUED

    def next_message_id(self) -> int:
        """The id the next `send` gets (what the control channel's ticket names)."""
        return self._next_send_id

    def send(self, frames: Sequence[Frame]) -> int:
        """Queue `frames` (kept alive, not copied: do not modify them) to go sealed; its id.

        Never raises: a channel that closed meanwhile (its reader saw a bad tag, say) drops
        the message, and its owner learns of the closing from `closed` (SealedPeers.poll)."""
        message_id = self._next_send_id
        self._next_send_id += 1
        if not self.closed:
            self._outbox.put((message_id, frames))
        return message_id

    def take(self, message_id: int) -> list[memoryview] | None:
        """The frames of message `message_id` once it arrived whole and verified, else None."""
        with self._lock:
            frames = self._arrived.pop(message_id, None)
            if frames is not None:
                self._claimed.notify()
            return frames

    def close(self, reason: str = "closed", drain_s: float = 0.0) -> None:
        """Stop both threads and close the connection; idempotent. With `drain_s`, messages
        already queued get that long to go out first (a stage's last replies)."""
        deadline = time.monotonic() + drain_s
        while self.usable and self._outbox.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.001)
        self._fail(reason)
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
            sock = self._sock
        for thread in self._threads:
            # Only a running thread is joined: a thread not yet started (its starter is
            # between the two `start` calls while the other thread already closes the channel)
            # cannot be joined, and finds the channel closed when it does start.
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(timeout=HANDSHAKE_TIMEOUT_S + 1)
        with self._lock:
            # The receiver may have connected meanwhile (it closes what it opens after this).
            sock = self._sock
        if sock is not None:
            sock.close()

    def _fail(self, reason: str) -> None:
        """Mark the channel closed and stop its I/O (any thread); `close` releases the socket."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.reason = reason
            sock = self._sock
            self._claimed.notify_all()
        self._outbox.put(None)
        self.ready.set()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._notify()

    # -- the threads --------------------------------------------------------------------------

    def _send_loop(self) -> None:
        self.ready.wait()
        if self.closed:
            return
        record = memoryview(bytearray(TAG_BYTES + max(CHUNK_BYTES, 8 + 8 * MAX_FRAMES)))
        try:
            while True:
                item = self._outbox.get()
                if item is None or self.closed:
                    return
                self._write_message(*item, record)
                self.messages_sent += 1
                self._outbox.task_done()
        except (OSError, ValueError) as exc:
            self._fail(f"sending failed: {exc}")

    def _write_message(self, message_id: int, frames: Sequence[Frame], record: memoryview) -> None:
        sock = self._sock
        assert sock is not None
        views = [frame_view(frame) for frame in frames]
        if not 0 < len(views) <= MAX_FRAMES:
            raise ValueError(f"a sealed message has 1 to {MAX_FRAMES} frames, not {len(views)}")
        count = _COUNT.pack(len(views))
        header = np.empty(1 + len(views), dtype=">u8")
        header[0] = message_id
        header[1:] = [view.nbytes for view in views]
        sock.sendall(count)
        sock.sendall(self._seal.seal_into(memoryview(header.tobytes()), b"H" + count, record))
        for index, view in enumerate(views):
            for number, start in enumerate(range(0, view.nbytes, CHUNK_BYTES)):
                aad = _RECORD_AAD.pack(message_id, index, number)
                sock.sendall(self._seal.seal_into(view[start : start + CHUNK_BYTES], aad, record))

    def _receive_loop(self, dial: Callable[[], socket.socket]) -> None:
        try:
            sock = dial()
        except (OSError, SealedChannelError) as exc:
            self._fail(f"could not open the sealed channel: {exc}")
            self.ready.set()
            return
        with self._lock:
            if self.closed:
                sock.close()
                self.ready.set()
                return
            self._sock = sock
        self.ready.set()
        record = memoryview(bytearray(TAG_BYTES + CHUNK_BYTES))
        try:
            while True:
                with self._lock:
                    # Backpressure: read no further while the owner is this far behind.
                    while len(self._arrived) >= MAX_UNCLAIMED and not self.closed:
                        self._claimed.wait()
                    if self.closed:
                        return
                message_id, frames = self._read_message(record)
                with self._lock:
                    self._arrived[message_id] = frames
                self.messages_received += 1
                self._notify()
        except InvalidTag:
            logger.warning(
                "dropped a sealed message from %s: a record failed its authentication tag "
                "(tampered with, replayed or out of order); closing the sealed channel",
                self.name,
            )
            self._fail("a record failed its authentication tag")
        except (OSError, SealedChannelError, ValueError) as exc:
            if not self.closed:
                # A peer that hangs up is ordinary (a stage leaving); anything else is not.
                level = logging.INFO if "closed the connection" in str(exc) else logging.WARNING
                logger.log(level, "sealed channel %s closed: %s", self.name, exc)
            self._fail(str(exc))

    def _read_message(self, record: memoryview) -> tuple[int, list[memoryview]]:
        sock = self._sock
        assert sock is not None
        count_bytes = bytearray(_COUNT.size)
        recv_exactly(sock, memoryview(count_bytes))
        (count,) = _COUNT.unpack(count_bytes)
        if not 0 < count <= MAX_FRAMES:
            raise SealedChannelError(f"a sealed message announced {count} frames")
        header = memoryview(bytearray(8 * (1 + count)))
        header_record = record[: TAG_BYTES + header.nbytes]
        recv_exactly(sock, header_record)
        self._open.open_into(header_record, b"H" + bytes(count_bytes), header)
        fields = np.frombuffer(header, dtype=">u8")
        message_id, lengths = int(fields[0]), [int(size) for size in fields[1:]]
        if message_id != self._next_receive_id:
            raise SealedChannelError(
                f"message {message_id} came where {self._next_receive_id} was due"
            )
        if sum(lengths) > self._max_message_bytes:
            raise SealedChannelError(
                f"a sealed message of {sum(lengths)} bytes exceeds the limit of "
                f"{self._max_message_bytes}"
            )
        self._next_receive_id += 1
        frames = []
        tag = record[:TAG_BYTES]
        for index, size in enumerate(lengths):
            # Not zero-filled: the socket writes every byte before anyone reads it.
            frame = memoryview(np.empty(size, dtype=np.uint8))  # type: ignore[arg-type]
            for number, start in enumerate(range(0, size, CHUNK_BYTES)):
                # The ciphertext lands in the frame itself and is decrypted over itself while
                # it is still in cache: no second buffer, one pass less over memory. Nobody
                # sees the frame unless every record of the message opened.
                part = frame[start : start + CHUNK_BYTES]
                recv_exactly(sock, tag)
                recv_exactly(sock, part)
                aad = _RECORD_AAD.pack(message_id, index, number)
                self._open.open_in_place(bytes(tag), part, aad)
            frames.append(frame)
        return message_id, frames


class BulkListener:
    """The router's listening socket for sealed channels, bound beside its CURVE endpoint.

    `offer(peer)` makes (or repeats, while it is unused or in use) a session for one CURVE peer;
    `adopt(peer, channel)` is called from the accepting thread with each channel whose stage
    proved the session's key. Anything else that connects is closed and logged.
    """

    def __init__(
        self,
        host: str,
        adopt: Callable[[Any, SealedChannel], None],
        notify: Callable[[], None],
        *,
        port: int = 0,
        max_message_bytes: int,
    ) -> None:
        self._adopt = adopt
        self._notify = notify
        self._max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        # session id -> (peer, key); and peer -> its current offer.
        self._sessions: dict[bytes, tuple[Any, bytes]] = {}
        self._offers: dict[Any, BulkOffer] = {}
        self._used: set[bytes] = set()
        self.refused = 0
        self._listener = socket.create_server((host.strip("[]"), port))
        self.port: int = self._listener.getsockname()[1]
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name="sealed-accept", daemon=True)
        self._thread.start()

    def offer(self, peer: Any) -> BulkOffer:
        """The session `peer` (a CURVE-authenticated connection) may open; the same one again
        until `revoke(peer)`."""
        with self._lock:
            current = self._offers.get(peer)
            if current is None:
                current = BulkOffer(
                    self.port, secrets.token_bytes(SESSION_ID_BYTES), secrets.token_bytes(KEY_BYTES)
                )
                self._offers[peer] = current
                self._sessions[current.session_id] = (peer, current.key)
            return current

    def revoke(self, peer: Any) -> None:
        """Forget `peer`'s session: its next WELCOME offers a fresh one."""
        with self._lock:
            offer = self._offers.pop(peer, None)
            if offer is not None:
                self._sessions.pop(offer.session_id, None)

    def peers(self) -> list[Any]:
        with self._lock:
            return list(self._offers)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=HANDSHAKE_TIMEOUT_S + 1)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, address = self._listener.accept()
            except OSError:
                return
            try:
                self._admit(sock, f"{address[0]}:{address[1]}")
            except Exception:
                logger.exception("sealed channel setup from %s failed", address)
                sock.close()

    def _admit(self, sock: socket.socket, name: str) -> None:
        """Keep `sock` as a channel if its first bytes prove a session's key, else close it.

        One at a time, each bounded by `HANDSHAKE_TIMEOUT_S`: a peer that stalls delays the
        next stage's channel by that much at worst, never the CURVE control channel."""
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        reason = ""
        try:
            session_id = bytearray(SESSION_ID_BYTES)
            recv_exactly(sock, memoryview(session_id))
            with self._lock:
                known = self._sessions.get(bytes(session_id))
                fresh = bytes(session_id) not in self._used
            if known is None or not fresh:
                reason = "an unknown or already used session"
            else:
                peer, key = known
                opener = RecordCipher(key, _CLIENT_TO_SERVER)
                if not _check_proof(opener, sock, _HELLO, bytes(session_id)):
                    reason = "a proof that does not open with the session key"
        except (OSError, SealedChannelError) as exc:
            reason = f"no proof ({exc})"
        if reason:
            self.refused += 1
            logger.warning("refused a sealed bulk connection from %s: %s", name, reason)
            sock.close()
            return
        with self._lock:
            if bytes(session_id) in self._used or self._sessions.get(bytes(session_id)) is None:
                sock.close()
                return
            self._used.add(bytes(session_id))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        SealedChannel.accepted(
            sock,
            key,
            notify=self._notify,
            max_message_bytes=self._max_message_bytes,
            name=name,
            session_id=bytes(session_id),
            adopt=lambda channel: self._adopt(peer, channel),
        )
