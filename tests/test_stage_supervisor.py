"""A stage process killed mid-request: fast failure, restart, service again, nothing left over."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch
from omni.transport.shm import list_segments
from stage_helpers import SHM_PREFIX, ipc_endpoint, our_segments, running_router

from omni.supervision.streams import ReplicaLostError
from omni.supervision.supervisor import StageSpec, StageSupervisor, SupervisorConfig


def test_killed_stage_fails_its_request_restarts_and_serves_again() -> None:
    spec = StageSpec(
        role="echo", extra_args=("--shm-threshold-bytes", "1024", "--log-level", "WARNING")
    )
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        supervisor = StageSupervisor(router, [spec], SupervisorConfig(restart_delay_s=0.0)).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=60)
            page = torch.arange(2048, dtype=torch.float32)  # 8 KiB: replies go through /dev/shm
            stream = router.submit(
                "echo", {"page": page}, {"chunks": 50, "delay_s": 0.2}, request_id="doomed"
            )
            first = stream.next(timeout=10)
            assert set(first.handles) == {"page"}
            assert torch.equal(first.tensors["page"], page * 2 + 1)
            victim = supervisor.pids()["echo-0"]
            assert list_segments(SHM_PREFIX, pid=victim) != []  # the stage owns live segments

            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(
                ReplicaLostError,
                match=r"request doomed failed: stage 'echo' replica echo-0 \(pid \d+\) "
                r"was killed by SIGKILL",
            ):
                stream.result(timeout=10)
            assert time.monotonic() - killed_at < 5

            assert router.wait_for_replicas("echo", 1, timeout=60)
            [info] = router.replicas("echo")
            assert info.pid != victim and info.replica_id == "echo-0"
            assert list_segments(SHM_PREFIX, pid=victim) == []  # swept on restart
            [reply] = router.submit("echo", {"page": page}).result(timeout=10)
            assert torch.equal(reply.tensors["page"], page * 2 + 1)
            assert [(e.replica_id, e.pid, e.reason, e.restarted) for e in supervisor.events] == [
                ("echo-0", victim, "was killed by SIGKILL", True)
            ]
            assert supervisor.restarts == 1
            assert router.counters.replicas_lost == 1
            del first, reply
            gc.collect()
        finally:
            supervisor.stop()
    assert our_segments() == []
