"""Large messages of CURVE peers over their sealed channels, in the control stream's order.

One `SealedPeers` serves one ZeroMQ socket's owner (the router's I/O thread, keyed by peer
identity; a stage's I/O thread, keyed by link index). Sending: a message of at least
`threshold` bytes to a peer with a usable `SealedChannel` goes sealed on that channel, and a
ticket (one frame: `TICKET_KIND`, then the message id) goes on the CURVE socket in its place.
Receiving: every message from the CURVE socket passes through `receive`, which hands back what
is ready to decode in order; a ticket holds its peer's later control messages back until its
sealed message has arrived, so the peer's messages are decoded exactly in the order it sent
them however the two connections race. `poll` (when `fileno()` is readable) picks up channels
set up meanwhile, messages that arrived and channels that closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from omni.transport.sealed import (
    BULK_THRESHOLD,
    Frame,
    SealedChannel,
    frame_view,
    message_bytes,
)

logger = logging.getLogger(__name__)

# The kind byte of a ticket; the stage protocol's message kinds never use it (messages.py).
TICKET_KIND = 0xB0
_TICKET = struct.Struct("!BQ")
# Control messages held back behind one peer's tickets before the peer counts as broken.
MAX_HELD = 4096

Send = Callable[[Sequence[Frame]], str]


def is_ticket(frames: Sequence[Frame]) -> bool:
    if len(frames) != 1:
        return False
    view = frame_view(frames[0])
    return view.nbytes == _TICKET.size and view[0] == TICKET_KIND


class SealedPeers:
    """See the module docstring. Every method but `adopt` and `notify` runs on the owner's
    I/O thread."""

    def __init__(self, threshold: int = BULK_THRESHOLD) -> None:
        self.threshold = threshold
        self._channels: dict[Hashable, SealedChannel] = {}
        # Per peer: ticket ids and whole control messages, in arrival order, not yet handed out.
        self._held: dict[Hashable, deque[int | Sequence[Frame]]] = {}
        self._next_ticket: dict[Hashable, int] = {}
        self._arrivals: list[tuple[Hashable, SealedChannel]] = []
        self._arrivals_lock = threading.Lock()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.tickets_dropped = 0

    # -- channels -----------------------------------------------------------------------------

    def fileno(self) -> int:
        """Readable when `poll` has something to do."""
        return self._wake_read.fileno()

    def notify(self) -> None:
        """Wake the owner (any thread)."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_write.send(b"\x01")

    def adopt(self, peer: Hashable, channel: SealedChannel) -> None:
        """Hand over a channel set up on another thread (the listener's); `poll` attaches it."""
        with self._arrivals_lock:
            self._arrivals.append((peer, channel))
        self.notify()

    def attach(self, peer: Hashable, channel: SealedChannel) -> None:
        """Use `channel` for `peer` from now on (closing the one it replaces)."""
        old = self._channels.get(peer)
        if old is not None and old is not channel:
            self.detach(peer, "replaced by a new sealed channel")
        self._channels[peer] = channel
        self._next_ticket[peer] = 1

    def channel(self, peer: Hashable) -> SealedChannel | None:
        return self._channels.get(peer)

    def peers(self) -> list[Hashable]:
        return list(self._channels)

    def detach(self, peer: Hashable, reason: str) -> None:
        """Close `peer`'s channel; control messages held behind its unanswered tickets are lost
        (the owner treats the peer as reconnecting, which fails what they belonged to)."""
        channel = self._channels.pop(peer, None)
        self._next_ticket.pop(peer, None)
        held = self._held.pop(peer, None)
        if held:
            self.tickets_dropped += sum(isinstance(item, int) for item in held)
            logger.warning(
                "dropped %d messages from %s waiting on its sealed channel (%s)",
                len(held),
                _describe(peer),
                reason,
            )
        if channel is not None:
            channel.close(reason)

    def close(self, drain_s: float = 0.0) -> None:
        """Close every channel, giving what they still have to send `drain_s` to go out."""
        with self._arrivals_lock:
            arrivals, self._arrivals = self._arrivals, []
        for _, channel in arrivals:
            channel.close("shutting down")
        for channel in self._channels.values():
            channel.close("shutting down", drain_s=drain_s)
        for peer in list(self._channels):
            self.detach(peer, "shutting down")
        self._wake_read.close()
        self._wake_write.close()

    # -- sending ------------------------------------------------------------------------------

    def send(self, peer: Hashable, frames: Sequence[Frame], send_control: Send) -> str:
        """Send one message to `peer`: sealed with a ticket when large and a channel is up,
        else through `send_control` as is. Returns what `send_control` returned ("sent" when
        the message is on its way)."""
        channel = self._channels.get(peer)
        if channel is None or not channel.usable or message_bytes(frames) < self.threshold:
            return send_control(frames)
        if channel.busy():
            return "busy"
        result = send_control([_TICKET.pack(TICKET_KIND, channel.next_message_id())])
        if result == "sent":
            channel.send(frames)
        return result

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, peer: Hashable, frames: Sequence[Frame]) -> list[Sequence[Frame]]:
        """The messages of `peer` now ready to decode, in order, given one from the control
        socket (a ticket, or a message that may have to wait behind one)."""
        held = self._held.get(peer)
        if is_ticket(frames):
            _, message_id = _TICKET.unpack(frame_view(frames[0]))
            if peer not in self._channels:
                # Its channel may have been set up just now, with the wake still unread.
                self._attach_arrivals()
            if peer not in self._channels or message_id != self._next_ticket[peer]:
                self.tickets_dropped += 1
                logger.warning(
                    "%s sent a ticket for sealed message %d that no channel of it can carry",
                    _describe(peer),
                    message_id,
                )
                return []
            self._next_ticket[peer] = message_id + 1
            held = self._held.setdefault(peer, deque())
            held.append(message_id)
        elif held:
            held.append(frames)
        else:
            return [frames]
        if len(held) > MAX_HELD:
            self.detach(peer, f"more than {MAX_HELD} messages waited on its sealed channel")
            return []
        return self._release(peer)

    def _attach_arrivals(self) -> None:
        with self._arrivals_lock:
            arrivals, self._arrivals = self._arrivals, []
        for peer, channel in arrivals:
            self.attach(peer, channel)

    def _release(self, peer: Hashable) -> list[Sequence[Frame]]:
        held = self._held.get(peer)
        channel = self._channels.get(peer)
        ready: list[Sequence[Frame]] = []
        while held:
            head = held[0]
            if isinstance(head, int):
                frames = channel.take(head) if channel is not None else None
                if frames is None:
                    break
                ready.append(frames)
            else:
                ready.append(head)
            held.popleft()
        if not held:
            self._held.pop(peer, None)
        return ready

    def poll(
        self,
    ) -> tuple[list[tuple[Hashable, Sequence[Frame]]], list[tuple[Hashable, SealedChannel]]]:
        """(messages now ready, by peer, in order; peers whose channel closed, with it: its
        `reason` says why). A closed channel is detached here, after what it had delivered was
        handed out."""
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_read.recv(4096):
                pass
        self._attach_arrivals()
        ready: list[tuple[Hashable, Sequence[Frame]]] = []
        closed: list[tuple[Hashable, SealedChannel]] = []
        for peer, channel in list(self._channels.items()):
            ready.extend((peer, frames) for frames in self._release(peer))
            if channel.closed:
                closed.append((peer, channel))
                self.detach(peer, channel.reason)
        return ready, closed


def _describe(peer: Any) -> str:
    return f"peer {peer.hex() if isinstance(peer, bytes) else peer}"
