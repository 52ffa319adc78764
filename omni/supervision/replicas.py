"""The router's table of live stage replicas and its choice of the least-loaded one."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
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
    # The numbers of its latest heartbeat (empty for stages that report none).
    stats: Mapping[str, float] = field(default_factory=dict)


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
    stats: dict[str, float] = field(default_factory=dict)

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
            stats=dict(self.stats),
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

    def least_loaded(self, role: str) -> Replica | None:
        """The replica of `role` with the fewest outstanding requests, as a fraction of its
        capacity (equal capacities: plain least-outstanding-requests), that has room.

        Ties go to the replica sent a request least recently, then the longest-joined: an
        idle pool takes requests in turn instead of one replica taking every lone request
        (which would also leave the others' failures unnoticed until a burst).
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
        return best
