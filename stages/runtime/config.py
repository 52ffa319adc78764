"""Configuration of one stage replica (`omni stage ROLE --connect ADDR ...`)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from functools import cache

from omni.transport.shm import DEFAULT_PREFIX
from omni.transport.sockets import CurveKeys, SocketOptions, check_endpoint


@cache
def host_id() -> str:
    """Hostname plus boot id: equal exactly for processes that can share /dev/shm."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}:{boot}"


@dataclass(frozen=True)
class StageConfig:
    role: str
    # The orchestrator's ROUTER endpoint: ipc://PATH on this host, tcp://HOST:PORT across nodes.
    connect: str
    # The routers of the server's other API processes (`--api-server-count`), joined alike.
    also_connect: tuple[str, ...] = ()
    model: str = ""
    device: str = "cpu"
    # Requests this replica works on at once; the router sends no more than this.
    capacity: int = 8
    # Stable across restarts of the same replica so the router can tell a restart from a newcomer.
    replica_id: str = ""
    # Until the orchestrator's WELCOME says otherwise (it dictates the real interval).
    heartbeat_interval_s: float = 1.0
    # With no word from the orchestrator for this long, assume it restarted and say HELLO again.
    server_timeout_s: float = 10.0
    # Reply tensors at least this large go through shared memory when the orchestrator is on
    # this host; below it a ZeroMQ frame is as fast and needs no cleanup.
    shm_threshold_bytes: int = 1024 * 1024
    shm_prefix: str = DEFAULT_PREFIX
    shm_max_bytes: int = 4 * 1024**3
    # False: behave as a stage on another host would, sharing no /dev/shm with the server
    # (its HELLO names a host of its own, so tensors travel as frames both ways).
    shared_memory: bool = True
    sockets: SocketOptions = field(default_factory=SocketOptions)
    curve: CurveKeys | None = None
    # Supervised stages exit when the process that started them is gone (no orphans).
    parent_pid: int | None = None

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("a stage needs a role (for example 'vision' or 'llm')")
        for endpoint in self.endpoints:
            check_endpoint(endpoint, binding=False)
        if len(self.endpoints) > 64:
            raise ValueError(f"a stage joins at most 64 routers, not {len(self.endpoints)}")
        if self.capacity < 1:
            raise ValueError(f"capacity is {self.capacity}; it must be >= 1")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s is {self.heartbeat_interval_s}; it must be > 0")
        if self.server_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"server_timeout_s ({self.server_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )
        if self.shm_threshold_bytes < 1:
            raise ValueError(f"shm_threshold_bytes is {self.shm_threshold_bytes}; it must be >= 1")
        if self.curve is not None and not self.curve.server_key:
            raise ValueError("CURVE keys for a stage need the server's public key")

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every router this replica joins; replies go back to the one that sent the request,
        peer calls to the first."""
        return (self.connect, *self.also_connect)

    @property
    def host_id(self) -> str:
        """The host identity this replica's HELLO gives (see `host_id()`)."""
        return host_id() if self.shared_memory else f"{host_id()}:no-shared-memory:{os.getpid()}"

    @property
    def effective_replica_id(self) -> str:
        return self.replica_id or f"{self.role}-{socket.gethostname()}-{os.getpid()}"
