"""Stage processes started, watched and restarted by the API process.

`StageSupervisor` runs each replica as `python -m omni.cli stage ROLE --connect ENDPOINT ...`.
A monitor thread notices a replica's exit within `poll_interval_s`; the router notices one that
is alive but silent (missed heartbeats) and the supervisor kills it. Either way the replica's
in-flight requests fail at once with a clear error, what it left in /dev/shm is swept, the
event is counted and logged, and the replica is started again (with a restart budget, so a
stage that cannot start does not spin forever).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from omni.stages.runtime.process import EXIT_BAD_CONFIG, describe_exit
from omni.supervision.replicas import ReplicaInfo
from omni.supervision.router import StageRouter
from omni.transport.shm import sweep_dead_owners, sweep_owner

logger = logging.getLogger(__name__)

# What a stage process's environment holds unless the operator set it. Stages share the
# machine's cores with one another (an OCR or speech stage beside the LLM) and with whatever
# else runs there. libgomp (torch's OpenMP on CPU) has a thread that finishes its share of an op
# spin 300,000 turns (milliseconds) waiting for the next one, holding a core that its partner,
# or the next stage, may need; on the 2-core machine under other users' load that made CPU
# decoding 3x and OCR-then-LLM pages 3x slower. 10,000 turns still bridge the gaps between the
# ops of one forward pass (speech recognition on an idle machine as fast as with the default),
# and release the core soon after. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) is faster still
# under load but costs the speech stage a quarter of its speed on an idle machine.
# benchmarks/wait_policy.py measures the three side by side (docs/benchmarks.md, perception).
STAGE_ENVIRONMENT_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}


def stage_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a stage process starts with: `base` (default: this process's) plus
    `STAGE_ENVIRONMENT_DEFAULTS` where `base` sets no OpenMP wait behaviour of its own."""
    environment = dict(os.environ if base is None else base)
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & environment.keys():
        environment.update(STAGE_ENVIRONMENT_DEFAULTS)
    return environment


@dataclass(frozen=True)
class StageSpec:
    """How many replicas of one role to run, and where."""

    role: str
    replicas: int = 1
    # Replica i runs on devices[i % len(devices)], or with several devices a replica (the
    # ranks of a tensor-parallel LLM replica) on the next devices_per_replica of them.
    devices: tuple[str, ...] = ("cpu",)
    devices_per_replica: int = 1
    model: str = ""
    capacity: int = 8
    # Modules to import in the stage process so that its worker is registered.
    worker_modules: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    # A role whose replica i runs inside this role's replica i process, on its device
    # (`omni stage --colocate`): an encoder beside the LLM on one GPU.
    colocated_role: str = ""
    colocated_model: str = ""

    def __post_init__(self) -> None:
        if not self.role:
            raise ValueError("a stage spec needs a role")
        if self.replicas < 1:
            raise ValueError(f"stage {self.role!r}: replicas is {self.replicas}; it must be >= 1")
        if not self.devices:
            raise ValueError(f"stage {self.role!r}: name at least one device")
        if self.capacity < 1:
            raise ValueError(f"stage {self.role!r}: capacity is {self.capacity}; it must be >= 1")
        if self.devices_per_replica < 1:
            raise ValueError(
                f"stage {self.role!r}: devices_per_replica is {self.devices_per_replica}; "
                "it must be >= 1"
            )

    def replica_device(self, index: int) -> str:
        """Replica `index`'s device, or its ranks' devices as a comma list."""
        return replica_device(self.devices, index, self.devices_per_replica)


def replica_device(devices: Sequence[str], index: int, per_replica: int = 1) -> str:
    """Replica `index`'s share of `devices`, round robin: one device, or `per_replica` of them
    as a comma list (cuda:2,cuda:3 for replica 1 of two ranks each)."""
    first = index * per_replica
    return ",".join(devices[(first + rank) % len(devices)] for rank in range(per_replica))


def stage_arguments(
    spec: StageSpec,
    replica_id: str,
    device: str,
    router: StageRouter,
    endpoint: str,
    colocated_id: str = "",
) -> list[str]:
    """`omni stage ...` arguments (after `omni`) for one replica of `spec` joining `router` at
    `endpoint` (its local one, or its tcp one for a replica placed on another node)."""
    command = [
        "stage", spec.role,
        "--connect", endpoint,
        "--replica-id", replica_id,
        "--device", device,
        "--capacity", str(spec.capacity),
        "--heartbeat-interval", str(router.config.heartbeat_interval_s),
        "--shm-prefix", router.config.shm_prefix,
    ]  # fmt: skip
    if spec.model:
        command += ["--model", spec.model]
    if colocated_id:
        command += [
            "--colocate", spec.colocated_role,
            "--colocate-replica-id", colocated_id,
            "--colocate-capacity", str(spec.capacity),
        ]  # fmt: skip
        if spec.colocated_model:
            command += ["--colocate-model", spec.colocated_model]
    for module in spec.worker_modules:
        command += ["--worker-module", module]
    return command + list(spec.extra_args)


@dataclass(frozen=True)
class SupervisorConfig:
    restart: bool = True
    # A replica that dies more than max_restarts times within restart_window_s stays down.
    max_restarts: int = 5
    restart_window_s: float = 300.0
    restart_delay_s: float = 0.2
    poll_interval_s: float = 0.05
    # SIGTERM first; SIGKILL whatever has not exited this long after.
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts is {self.max_restarts}; it must be >= 0")
        for name in ("restart_window_s", "poll_interval_s", "stop_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be > 0")
        if self.restart_delay_s < 0:
            raise ValueError(f"restart_delay_s is {self.restart_delay_s}; it must be >= 0")


    def may_restart(self, deaths: deque[float], now: float, code: int | None) -> bool:
        """Count a death at `now` in `deaths` (a replica's recent ones) and say whether to
        start it again: not after a bad configuration (exit code 2: it would fail the same
        way), nor past max_restarts within restart_window_s."""
        deaths.append(now)
        while deaths and now - deaths[0] > self.restart_window_s:
            deaths.popleft()
        return (
            self.restart and code != EXIT_BAD_CONFIG and len(deaths) <= self.max_restarts
        )


@dataclass(frozen=True)
class StageEvent:
    """One death of a supervised replica."""

    replica_id: str
    pid: int
    reason: str
    restarted: bool


@dataclass(eq=False)
class _Child:
    replica_id: str
    spec: StageSpec
    device: str
    colocated_id: str = ""  # the replica its process also runs, if any
    process: subprocess.Popen[bytes] | None = None
    start_at: float = 0.0
    deaths: deque[float] = field(default_factory=deque)


    @property
    def replica_ids(self) -> tuple[str, ...]:
        """The replicas its process runs."""
        return (self.replica_id, self.colocated_id) if self.colocated_id else (self.replica_id,)


class StageSupervisor:
    """Runs stage replicas as child processes of this one; see the module docstring."""

    def __init__(
        self,
        router: StageRouter,
        specs: list[StageSpec],
        config: SupervisorConfig | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.router = router
        self.config = config or SupervisorConfig()
        self.events: list[StageEvent] = []
        self._env = dict(env) if env is not None else None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._children: dict[str, _Child] = {}
        for spec in specs:
            for index in range(spec.replicas):
                replica_id = f"{spec.role}-{index}"
                if replica_id in self._children:
                    raise ValueError(f"stage {spec.role!r} is listed twice")
                device = spec.replica_device(index)
                colocated = f"{spec.colocated_role}-{index}" if spec.colocated_role else ""
                self._children[replica_id] = _Child(replica_id, spec, device, colocated)
        self._thread: threading.Thread | None = None
        router.add_lost_listener(self._on_replica_lost)

    @property
    def restarts(self) -> int:
        return sum(1 for event in self.events if event.restarted)

    def pids(self) -> dict[str, int]:
        """Live child pids by replica id."""
        with self._lock:
            pids = {}
            for child in self._children.values():
                if child.process is not None and child.process.poll() is None:
                    for replica_id in child.replica_ids:
                        pids[replica_id] = child.process.pid
            return pids

    def start(self) -> StageSupervisor:
        swept = sweep_dead_owners(self.router.config.shm_prefix)
        if swept:
            logger.info("removed %d shared-memory segments of dead stages", len(swept))
        with self._lock:
            for child in self._children.values():
                self._spawn(child)
        self._thread = threading.Thread(target=self._monitor, name="stage-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """SIGTERM every replica, SIGKILL stragglers, and sweep their shared memory."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            running = [child for child in self._children.values() if child.process is not None]
            for child in running:
                assert child.process is not None
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
            deadline = time.monotonic() + self.config.stop_timeout_s
            for child in running:
                assert child.process is not None
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("stage %s ignored SIGTERM; killing it", child.replica_id)
                    child.process.kill()
                    child.process.wait()
                sweep_owner(child.process.pid, self.router.config.shm_prefix)
                self.router.forget_shm_owner(child.process.pid)
                child.process = None

    def __enter__(self) -> StageSupervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _command(self, child: _Child) -> list[str]:
        arguments = stage_arguments(
            child.spec,
            child.replica_id,
            child.device,
            self.router,
            self.router.endpoint,
            child.colocated_id,
        )
        return [sys.executable, "-m", "omni.cli", *arguments, "--parent-pid", str(os.getpid())]

    def _spawn(self, child: _Child) -> None:
        child.process = subprocess.Popen(self._command(child), env=stage_environment(self._env))
        logger.info(
            "started stage %s (pid %d) on %s", child.replica_id, child.process.pid, child.device
        )

    def _monitor(self) -> None:
        while not self._stopping.wait(self.config.poll_interval_s):
            with self._lock:
                for child in self._children.values():
                    self._check(child)

    def _check(self, child: _Child) -> None:
        now = time.monotonic()
        if child.process is None:
            if child.start_at and now >= child.start_at:
                child.start_at = 0.0
                self._spawn(child)
            return
        code = child.process.poll()
        if code is None:
            return
        pid = child.process.pid
        reason = describe_exit(code)
        child.process = None
        # Fail its requests first: callers should hear about the death before anything else.
        for replica_id in child.replica_ids:
            self.router.fail_replica(replica_id, reason)
        self.router.forget_shm_owner(pid)
        swept = sweep_owner(pid, self.router.config.shm_prefix)
        restart = self.config.may_restart(child.deaths, now, code)
        self.events.append(StageEvent(child.replica_id, pid, reason, restart))
        logger.error(
            "stage %s (pid %d) %s; swept %d shared-memory segments; %s",
            child.replica_id, pid, reason, len(swept),
            "restarting" if restart else "not restarting (bad configuration or restarts spent)",
        )  # fmt: skip
        if restart:
            child.start_at = now + self.config.restart_delay_s

    def _on_replica_lost(self, info: ReplicaInfo, reason: str, silent: bool) -> None:
        """A live but silent replica is stuck: kill it so that the monitor restarts it."""
        if not silent:
            return
        with self._lock:
            child = next(
                (c for c in self._children.values() if info.replica_id in c.replica_ids), None
            )
            if child is not None and child.process is not None and child.process.pid == info.pid:
                logger.error("stage %s is silent; killing pid %d", info.replica_id, info.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
