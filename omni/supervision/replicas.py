"""The router's table of live stage replicas and its choice of the least-loaded one."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from omni.transport.messages import Hello


@dataclass(frozen=True)
class ReplicaInfo:
    """A snapshot of one live replica, safe to hand to other threads."""

    replica_id: str
    role: str
    model: str
    device: str
    capacity: int
    pid: int
    host_id: str
    shared_memory: bool
    load: int
    # Its latest heartbeat's stats, in its role's contract (empty for stages that report none).
    stats: bytes = b""


@dataclass(eq=False)
class Replica:
    """A replica as the router tracks it; mutated only under the router's lock."""

    identity: bytes
    hello: Hello
    shared_memory: bool
    last_seen: float = field(default_factory=time.monotonic)
    inflight: set[str] = field(default_factory=set)
    joined_seq: int = 0
    # When it was last sent a request (the table's dispatch count), for breaking ties.
    dispatch_seq: int = 0
    stats: bytes = b""
    # Its latest heartbeat's `stalled_s` (see `Heartbeat`).
    stalled_s: float = 0.0
    # Ids of the requests it asked of other roles that are still open.
    peer_calls: set[str] = field(default_factory=set)

    @property
    def replica_id(self) -> str:
        return self.hello.replica_id

    @property
    def role(self) -> str:
        return self.hello.role

    def has_room(self) -> bool:
        return len(self.inflight) < self.hello.capacity

    def describe(self) -> str:
        return f"stage {self.role!r} replica {self.replica_id} (pid {self.hello.pid})"

    def info(self) -> ReplicaInfo:
        hello = self.hello
        return ReplicaInfo(
            replica_id=hello.replica_id,
            role=hello.role,
            model=hello.model,
            device=hello.device,
            capacity=hello.capacity,
            pid=hello.pid,
            host_id=hello.host_id,
            shared_memory=self.shared_memory,
            load=len(self.inflight),
            stats=self.stats,
        )


# How much more outstanding work, as a fraction of its capacity, a preferred replica may have
# than the least loaded one and still be chosen.
PREFERENCE_SLACK = 0.25


def rendezvous(key: str, replica_ids: Sequence[str]) -> str | None:
    """The replica that `key` (a media item's hash) belongs to, by highest-random-weight
    hashing: every process computes the same answer, and a replica joining or leaving moves
    only the keys that were or become its own. None for fewer than two replicas."""
    if len(replica_ids) < 2:
        return None
    return max(
        replica_ids,
        key=lambda r: hashlib.blake2b(f"{key}/{r}".encode(), digest_size=8).digest(),
    )


class ReplicaTable:
    """Replicas by ZeroMQ identity and by replica id."""

    def __init__(self) -> None:
        self._by_identity: dict[bytes, Replica] = {}
        self._by_id: dict[str, Replica] = {}
        self._joins = 0
        self._dispatches = 0

    def __iter__(self) -> Iterator[Replica]:
        return iter(list(self._by_identity.values()))

    def by_identity(self, identity: bytes) -> Replica | None:
        return self._by_identity.get(identity)

    def by_id(self, replica_id: str) -> Replica | None:
        return self._by_id.get(replica_id)

    def add(self, replica: Replica) -> None:
        self._joins += 1
        replica.joined_seq = self._joins
        self._by_identity[replica.identity] = replica
        self._by_id[replica.replica_id] = replica

    def remove(self, replica: Replica) -> None:
        self._by_identity.pop(replica.identity, None)
        if self._by_id.get(replica.replica_id) is replica:
            del self._by_id[replica.replica_id]

    def note_dispatch(self, replica: Replica) -> None:
        """Record that `replica` was just sent a request (see `least_loaded`'s ties)."""
        self._dispatches += 1
        replica.dispatch_seq = self._dispatches

    def least_loaded(self, role: str, prefer: str | None = None) -> Replica | None:
        """The replica of `role` with the fewest outstanding requests, as a fraction of its
        capacity (equal capacities: plain least-outstanding-requests), that has room.

        Ties go to the replica sent a request least recently, then the longest-joined: an
        idle pool takes requests in turn instead of one replica taking every lone request
        (which would also leave the others' failures unnoticed until a burst).

        `prefer` names a replica to choose instead while it has room and at most
        `PREFERENCE_SLACK` of its capacity more outstanding work than the least loaded: its
        caches hold the request's media, which saves an encoder pass and a prefill, but not at
        the price of piling every such request onto one replica.
        """
        best: Replica | None = None
        best_key: tuple[float, int, int, int] | None = None
        for replica in self._by_identity.values():
            if replica.role != role or not replica.has_room():
                continue
            key = (
                len(replica.inflight) / replica.hello.capacity,
                len(replica.inflight),
                replica.dispatch_seq,
                replica.joined_seq,
            )
            if best_key is None or key < best_key:
                best, best_key = replica, key
        if best is None or prefer is None or best.replica_id == prefer:
            return best
        preferred = self._by_id.get(prefer)
        if preferred is None or preferred.role != role or not preferred.has_room():
            return best
        slack = PREFERENCE_SLACK * preferred.hello.capacity
        if len(preferred.inflight) - len(best.inflight) <= slack:
            return preferred
        return best
