"""Starting, watching and stopping ranks 1..N-1 of a tensor-parallel replica.

Rank 0 is the process that owns the engine (an LLM stage process, or the offline `LLM`'s).
It starts the other ranks as its own child processes (`python -m
omni.stages.llm.parallel.follower`; their settings on the command line as JSON, never
pickled), then all join one group through a file store in a private temporary folder.

A replica lives and dies whole:

* A follower that dies is seen by rank 0's watcher thread within `POLL_S`. It records why
  (`death`: the engine's next step fails naming the rank, and an LLM stage stops, failing its
  requests, and exits, so that the supervisor starts the replica again) and aborts the
  process groups, so that a collective rank 0 may be blocked in fails instead of waiting for
  its timeout.
* Rank 0 that dies takes the followers with it: their plan pipes end, each also watches its
  parent's pid, and a collective whose peer closed its sockets fails at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.model_runner import ModelRunner, resolve_device
from omni.stages.llm.parallel.group import TensorParallel, join_group
from omni.stages.llm.parallel.plan import PlanSender, Shutdown
from omni.stages.runtime.process import describe_exit

logger = logging.getLogger(__name__)

# How often rank 0 looks at its followers, and they at their parent.
POLL_S = 0.05
# How long the followers have to start and reach the group (imports on a loaded host).
STARTUP_TIMEOUT_S = 300.0
# How long a follower has to leave after a Shutdown plan before it is killed.
STOP_TIMEOUT_S = 10.0


# The store's folder under the temporary directory: omni-tp-<rank 0's pid>-<random>.
_FOLDER_PREFIX = "omni-tp-"


def _sweep_folders() -> None:
    """Removes the store folders of rank 0 processes that are gone (SIGKILLed ones)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(_FOLDER_PREFIX).split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def rank_devices(device: str, world_size: int) -> list[str]:
    """The device of each rank: a comma list names them one by one; `cpu` puts every rank on
    the CPU; `cuda` (or `auto` on a GPU host) means cuda:0..N-1 and `cuda:K` cuda:K..K+N-1."""
    if "," in device:
        devices = [d.strip() for d in device.split(",")]
        if len(devices) != world_size:
            raise ValueError(
                f"device {device!r} names {len(devices)} devices for tensor_parallel_size "
                f"{world_size}"
            )
        return devices
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cpu":
        return ["cpu"] * world_size
    first = target.index or 0
    return [f"{target.type}:{first + rank}" for rank in range(world_size)]


class FollowerRanks:
    """Ranks 1..N-1 of one replica, as child processes of rank 0 (this process)."""

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.world_size = config.tensor_parallel_size
        self.devices = rank_devices(config.device, self.world_size)
        _sweep_folders()
        self._folder = tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-")
        self.store_path = os.path.join(self._folder, "store")
        self.group: TensorParallel | None = None
        self.death: str | None = None
        self._stopping = threading.Event()
        self._processes: list[subprocess.Popen[bytes]] = []
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
        try:
            for rank in range(1, self.world_size):
                rank_config = dataclasses.replace(config, device=self.devices[rank])
                command = [
                    sys.executable, "-m", "omni.stages.llm.parallel.follower",
                    "--rank", str(rank),
                    "--world-size", str(self.world_size),
                    "--store", self.store_path,
                    "--model-path", model_path,
                    "--config", json.dumps(dataclasses.asdict(rank_config)),
                    "--parent-pid", str(os.getpid()),
                ]  # fmt: skip
                # stdin carries the step plans (plan.PlanSender); close_fds (the default)
                # keeps every other rank's pipe out of this one.
                process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE)
                self._processes.append(process)
        except BaseException:
            self.kill()
            raise
        # Rank 0's pipes to the followers' stdin, for the step plans.
        self.plans = PlanSender([p.stdin for p in self._processes if p.stdin is not None])

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def join(self, device: torch.device, expert_parallel: bool = False) -> TensorParallel:
        """Rank 0 joins the group once every follower has started; RuntimeError naming the
        rank if one exits first."""
        store = dist.FileStore(self.store_path, self.world_size)
        keys = [f"started/{rank}" for rank in range(1, self.world_size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not store.check(keys):
            self._raise_if_dead()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel ranks did not start within {STARTUP_TIMEOUT_S:.0f} s"
                )
            time.sleep(POLL_S)
        self.group = join_group(0, self.world_size, self.store_path, device, expert_parallel)
        if device.type == "cpu":
            # Gloo reads the store only while the groups form: the folder goes now rather
            # than at close, which a SIGKILLed rank 0 never reaches. (NCCL's monitor thread
            # may read it later; those folders are swept by the next rank 0, _sweep_folders.)
            shutil.rmtree(self._folder, ignore_errors=True)
        threading.Thread(target=self._watch, name="tp-ranks", daemon=True).start()
        return self.group

    def _first_death(self) -> str | None:
        for rank, process in enumerate(self._processes, start=1):
            code = process.poll()
            if code is not None:
                return f"tensor-parallel rank {rank} (pid {process.pid}) {describe_exit(code)}"
        return None

    def _raise_if_dead(self) -> None:
        death = self._first_death()
        if death is not None:
            raise RuntimeError(death)

    def wait_for_death(self, timeout_s: float) -> str | None:
        """Why a follower died, waiting up to `timeout_s` for one to be seen dead (rank 0's
        collective may fail a moment before the dead process is reaped); None if none did."""
        deadline = time.monotonic() + timeout_s
        while self.death is None:
            death = self._first_death()
            if death is not None or time.monotonic() >= deadline:
                return death
            time.sleep(POLL_S / 5)
        return self.death

    def _watch(self) -> None:
        while not self._stopping.wait(POLL_S):
            self.death = self._first_death()
            if self.death is not None:
                break
        if self.death is None:
            return
        logger.error("%s; the replica stops", self.death)
        self.abort()

    def abort(self) -> None:
        """Fails every collective in progress or to come on this rank's groups."""
        group = self.group
        if group is None:
            return
        for process_group in (group.device_group, group.host_group):
            if process_group is not None:
                with contextlib.suppress(Exception):
                    process_group.abort()

    def close(self) -> None:
        """Tells the followers to leave and waits for them (kills them if a rank has died)."""
        if self.death is not None:
            self.kill()
            return
        self._stopping.set()  # their exit is no death
        try:
            self.plans.send(Shutdown("the engine closed"))
        except OSError:  # a follower died meanwhile: end the rest
            self.kill()
            return
        self.stop()

    def stop(self) -> None:
        """Waits for the followers to leave (after a Shutdown plan), kills those that do not,
        and removes the store's folder."""
        self._stopping.set()
        for process in self._processes:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()  # a follower still reading sees the end
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._folder, ignore_errors=True)

    def kill(self) -> None:
        """Ends the followers at once (rank 0 is failing or its group is broken)."""
        self._stopping.set()
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        self.stop()


def start_replica(
    config: EngineConfig, model_path: str
) -> tuple[ModelRunner, FollowerRanks | None]:
    """Rank 0's model runner and, with tensor_parallel_size > 1, the other ranks it leads
    (started, joined, their shards loaded in step with this one's)."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, model_path), None
    ranks = FollowerRanks(config, model_path)
    config = dataclasses.replace(config, device=ranks.devices[0])
    try:
        group = ranks.join(resolve_device(config.device), config.enable_expert_parallel)
        return ModelRunner(config, model_path, group, ranks.plans), ranks
    except BaseException:
        ranks.kill()
        raise
