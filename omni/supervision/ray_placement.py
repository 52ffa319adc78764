"""`omni serve --placement ray`: every stage replica a Ray actor, on any node that has room.

Ray does placement and restarts; it is not the data path. Each replica is a `StageActor`
placed with its role's resources (`--llm-resources GPU=1,CPU=4`; a GPU each by default). The
actor makes a CURVE key pair on its node (the secret never leaves it, nor touches its disk),
and starts the very `omni stage ROLE --connect tcp://HEAD:PORT` process a person would start by
hand, which joins the router over ZeroMQ like any remote stage, once the router has put the
actor's public key on its allow-list.

A replica's death is seen three ways: the stage process exits (the actor's `wait` returns its
code), the actor or its node dies (Ray raises `RayActorError`), or the router hears no
heartbeat (it drops the replica and this module kills the actor). The router fails the
replica's requests at once and Ray starts the actor again, on any node that fits; a stage that
exits with `EXIT_BAD_CONFIG` (a flag it cannot serve, a key refused) is not restarted.

Ray is optional (`pip install omni[ray]`): nothing here imports it until a Ray placement is
asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omni.stages.runtime.process import describe_exit
from omni.supervision.replicas import ReplicaInfo
from omni.supervision.router import StageRouter
from omni.supervision.supervisor import (
    StageEvent,
    StageSpec,
    SupervisorConfig,
    stage_arguments,
    stage_environment,
)
from omni.transport.key_folder import key_pair_text
from omni.transport.sockets import generate_curve_keypair

logger = logging.getLogger(__name__)

# How long stop() lets a stage answer SIGTERM (GOODBYE, shared memory unlinked) before the
# actor is killed regardless.
_STOP_TIMEOUT_S = 15.0
# How often to ask again whether Ray has placed a restarting actor.
_REPLACE_POLL_S = 0.2


def import_ray() -> Any:
    """The `ray` module, or a ValueError saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ValueError(
            "--placement ray needs Ray: pip install 'omni[ray]' (on every node of the cluster)"
        ) from None
    return ray


def connect(address: str | None) -> str:
    """Join the Ray cluster at `address` ("auto": the one this node belongs to; None: start a
    local one); returns this node's IP, where remote stages reach the router."""
    ray = import_ray()
    if not ray.is_initialized():
        # A namespace of our own: two servers on one cluster never see each other's actors.
        ray.init(
            address=address, namespace=f"omni-{uuid.uuid4().hex[:8]}", include_dashboard=False
        )
    return str(ray.util.get_node_ip_address())


def disconnect() -> None:
    """Leave the cluster (and stop it, when `connect(None)` started it here)."""
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()


def actor_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """Ray's actor options for a replica needing `resources` (CPU, GPU and custom names)."""
    custom = dict(resources)
    return {
        "num_cpus": custom.pop("CPU", 1.0),
        "num_gpus": custom.pop("GPU", 0.0),
        "resources": custom,
    }


def actor_device(resources: Mapping[str, float]) -> str:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave the actor, so its first is cuda:0.
    return "cuda:0" if resources.get("GPU", 0.0) > 0 else "cpu"


class StageActor:
    """One stage replica on a Ray node: an `omni stage` process this actor starts and watches.

    Methods run on the actor's threads (it is created with max_concurrency > 1), so `stop`
    can end a stage that `wait` is blocked on."""

    def __init__(self) -> None:
        self._public, self._secret = generate_curve_keypair()
        self._process: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()

    def public_key(self) -> str:
        """This actor's CURVE public key, for the router's allow-list."""
        return self._public

    def start(self, arguments: Sequence[str], server_key: str) -> int:
        """Start `omni ARGUMENTS` with this actor's keys; returns the stage's pid.

        The key pair reaches the stage through a pipe it inherits (`--client-key /dev/fd/N`),
        so no secret is ever written to the node's disk, where a killed actor would leave it.
        """
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, key_pair_text(self._public, self._secret).encode("ascii"))
        finally:
            os.close(write_end)
        command = [
            sys.executable, "-m", "omni.cli", *arguments,
            "--server-key", server_key, "--client-key", f"/dev/fd/{read_end}",
            # The stage exits when this actor's process is gone (killed, or its node lost).
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(command, pass_fds=(read_end,),
                                             env=stage_environment())
        finally:
            os.close(read_end)
        self._started.set()
        return self._process.pid

    def wait(self) -> int:
        """Until the stage exits; its exit code."""
        self._started.wait()
        assert self._process is not None
        return self._process.wait()

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the stage (its clean path), SIGKILL it after `timeout_s`; its exit code."""
        process = self._process
        code = None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                code = process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        return code


@dataclass(eq=False)
class _Placed:
    replica_id: str
    spec: StageSpec
    resources: Mapping[str, float]
    actor: Any = None
    pid: int = 0
    # The key its current actor holds on the router's allow-list.
    public_key: str = ""
    deaths: deque[float] = field(default_factory=deque)
    thread: threading.Thread | None = None


class RayStageSupervisor:
    """Places and keeps every replica of `specs` as a Ray actor (see the module docstring).
    `connect()` must have run first; `stop()` leaves the cluster again."""

    def __init__(
        self,
        router: StageRouter,
        specs: list[StageSpec],
        resources: Mapping[str, Mapping[str, float]],
        config: SupervisorConfig | None = None,
    ) -> None:
        if router.remote_endpoint is None or router.config.curve is None:
            raise ValueError("Ray placement needs a router with a tcp endpoint and CURVE keys")
        self.router = router
        self.config = config or SupervisorConfig()
        self.events: list[StageEvent] = []
        self._ray = import_ray()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._placed: dict[str, _Placed] = {}
        for spec in specs:
            if spec.colocated_role or spec.devices_per_replica > 1:
                raise ValueError(
                    f"stage {spec.role!r}: Ray placement runs one replica per actor (no "
                    "colocated encoders, no tensor parallelism yet)"
                )
            for index in range(spec.replicas):
                replica_id = f"{spec.role}-{index}"
                role_resources = resources.get(spec.role) or {"GPU": 1.0}
                self._placed[replica_id] = _Placed(replica_id, spec, role_resources)
        router.add_lost_listener(self._on_replica_lost)

    @property
    def restarts(self) -> int:
        return sum(1 for event in self.events if event.restarted)

    def actor_pids(self) -> dict[str, int]:
        """The stage process pid of each replica, as its actor last reported it."""
        with self._lock:
            return {p.replica_id: p.pid for p in self._placed.values() if p.pid}

    def start(self) -> RayStageSupervisor:
        actor_class = self._ray.remote(StageActor)
        for placed in self._placed.values():
            placed.actor = actor_class.options(
                name=placed.replica_id,
                # Ray restarts a dead actor on any node that fits; the keeper restarts it too
                # when only its stage exited.
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=4,
                **actor_options(placed.resources),
            ).remote()
            placed.thread = threading.Thread(
                target=self._keep, args=(placed,), name=f"ray-{placed.replica_id}", daemon=True
            )
            placed.thread.start()
            logger.info(
                "placing stage %s on Ray with %s", placed.replica_id, dict(placed.resources)
            )
        return self

    def stop(self) -> None:
        """Stop every stage cleanly (SIGTERM through its actor), kill the actors for good and
        leave the cluster."""
        self._stopping.set()
        ray = self._ray
        stopping = {
            placed.replica_id: placed.actor.stop.remote(_STOP_TIMEOUT_S)
            for placed in self._placed.values()
            if placed.actor is not None
        }
        for replica_id, ref in stopping.items():
            try:
                ray.get(ref, timeout=_STOP_TIMEOUT_S + 5)
            except Exception as exc:  # a dead actor has nothing left to stop
                logger.info("stage %s: %s", replica_id, type(exc).__name__)
        for placed in self._placed.values():
            if placed.actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(placed.actor, no_restart=True)
        for placed in self._placed.values():
            if placed.thread is not None:
                placed.thread.join(5)

    # -- internals ----------------------------------------------------------------------------

    def _keep(self, placed: _Placed) -> None:
        """One replica's life on Ray: admit its key, start its stage, wait for its end, let
        Ray place it again; until stop()."""
        ray = self._ray
        server_key = self.router.config.curve.public_key  # type: ignore[union-attr]
        endpoint = self.router.remote_endpoint
        assert endpoint is not None
        arguments = stage_arguments(
            placed.spec, placed.replica_id, actor_device(placed.resources), self.router, endpoint
        )
        while not self._stopping.is_set():
            code: int | None = None
            try:
                public_key = self._public_key(placed)
                # A restarted actor has a new key pair: its predecessor's is admitted no more.
                if placed.public_key and placed.public_key != public_key:
                    self.router.disallow_client(placed.public_key)
                placed.public_key = public_key
                self.router.allow_client(public_key)
                pid = ray.get(placed.actor.start.remote(arguments, server_key))
                with self._lock:
                    placed.pid = pid
                logger.info("stage %s started on Ray (pid %d)", placed.replica_id, pid)
                code = ray.get(placed.actor.wait.remote())
                reason = describe_exit(code)
            except ray.exceptions.RayActorError as exc:
                reason = f"lost its Ray actor ({type(exc).__name__})"
            if self._stopping.is_set():
                return
            if not self._handle_death(placed, reason, code):
                return

    def _public_key(self, placed: _Placed) -> str:
        """The actor's public key, once Ray has (re)placed it: a node with room may take a
        while, and until then calls fail with ActorUnavailableError (not a new death)."""
        ray = self._ray
        while True:
            try:
                return str(ray.get(placed.actor.public_key.remote()))
            except ray.exceptions.ActorUnavailableError:
                if self._stopping.wait(_REPLACE_POLL_S):
                    raise

    def _handle_death(self, placed: _Placed, reason: str, code: int | None) -> bool:
        """Fail its requests, count it; True when it is to be placed again."""
        self.router.fail_replica(placed.replica_id, reason)
        restart = self.config.may_restart(placed.deaths, time.monotonic(), code)
        self.events.append(StageEvent(placed.replica_id, placed.pid, reason, restart))
        logger.error(
            "stage %s (pid %d) %s; %s",
            placed.replica_id,
            placed.pid,
            reason,
            "Ray places it again" if restart else "not restarting (bad configuration or "
            "restarts spent)",
        )
        # Its actor is alive when only the stage exited: kill it so that Ray starts it afresh
        # (on any node that fits); a dead actor Ray restarts by itself.
        with contextlib.suppress(Exception):
            self._ray.kill(placed.actor, no_restart=not restart)
        return restart

    def _on_replica_lost(self, info: ReplicaInfo, reason: str, silent: bool) -> None:
        """A replica that stopped heartbeating (or hung) is killed through Ray."""
        placed = self._placed.get(info.replica_id)
        if silent and placed is not None and placed.pid == info.pid and placed.actor is not None:
            logger.error("stage %s is silent; killing its Ray actor", info.replica_id)
            with contextlib.suppress(Exception):
                self._ray.kill(placed.actor, no_restart=False)
