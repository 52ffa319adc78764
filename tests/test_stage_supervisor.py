"""A stage killed or frozen mid-request: fast failure, restart, service again, no leftovers."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch
from omni.stages.contracts.echo import CONTRACT as ECHO
from omni.stages.contracts.echo import EchoParams
from omni.transport.shm import list_segments
from stage_helpers import SHM_PREFIX, ipc_endpoint, our_segments, running_router

from omni.supervision.streams import ReplicaLostError
from omni.supervision.supervisor import (
    StageSpec,
    StageSupervisor,
    SupervisorConfig,
    stage_environment,
)


def test_stage_threads_spin_briefly_unless_the_operator_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMNI_TEST_MARK", "1")
    started = stage_environment()
    assert started["GOMP_SPINCOUNT"] == "10000" and started["OMNI_TEST_MARK"] == "1"
    assert "OMP_WAIT_POLICY" not in started
    assert stage_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert stage_environment({"GOMP_SPINCOUNT": "5"}) == {"GOMP_SPINCOUNT": "5"}


def test_dead_or_silent_stage_fails_its_request_restarts_and_serves_again() -> None:
    spec = StageSpec(
        role="echo", extra_args=("--shm-threshold-bytes", "1024", "--log-level", "WARNING")
    )
    # A 1 s heartbeat timeout: generous for a busy 2-core machine, still well under 5 s.
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=1.0) as router:
        supervisor = StageSupervisor(router, [spec], SupervisorConfig(restart_delay_s=0.0)).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=60)
            page = torch.arange(2048, dtype=torch.float32)  # 8 KiB: replies go through /dev/shm
            body = ECHO.encode(EchoParams(chunks=50, delay_s=0.2))
            stream = router.submit("echo", {"page": page}, body, request_id="doomed")
            first = stream.next(timeout=10)
            assert set(first.handles) == {"page"}
            assert torch.equal(first.tensors["page"], page * 2 + 1)
            victim = supervisor.pids()["echo-0"]
            with open(f"/proc/{victim}/environ", "rb") as environ:
                started = environ.read().split(b"\0")
                for name, value in stage_environment().items():
                    if "OMP" in name:
                        assert f"{name}={value}".encode() in started
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

            # A stage that is alive but silent (stopped, so no heartbeats) is caught the same way.
            frozen = info.pid
            os.kill(frozen, signal.SIGSTOP)
            stopped_at = time.monotonic()
            with pytest.raises(ReplicaLostError, match=r"echo-0 \(pid \d+\) stopped responding"):
                router.submit("echo", {"page": page}, request_id="stuck").result(timeout=10)
            assert time.monotonic() - stopped_at < 5
            assert router.wait_for_replicas("echo", 1, timeout=60)
            assert router.replicas("echo")[0].pid not in (victim, frozen)
            [reply] = router.submit("echo", {"page": page}).result(timeout=10)
            assert torch.equal(reply.tensors["page"], page * 2 + 1)
            assert [(e.pid, e.reason) for e in supervisor.events] == [
                (victim, "was killed by SIGKILL"),
                (frozen, "was killed by SIGKILL"),  # by the supervisor, once the router gave up
            ]
            del reply
            gc.collect()
        finally:
            supervisor.stop()
    assert our_segments() == []
