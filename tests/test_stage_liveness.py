"""Issue 14's liveness faults: a wedged worker behind a heartbeating I/O thread is declared hung
(its requests fail, it is restarted), and a HELLO that reuses a live replica's id cannot
displace that replica."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import zmq
from omni.stages.contracts.echo import CONTRACT as ECHO
from omni.stages.contracts.echo import EchoParams
from omni.stages.runtime.config import host_id
from omni.transport.messages import Hello, StageError, Welcome, stage_codec
from stage_helpers import echo_runtime, ipc_endpoint, our_segments, running_router

from omni.supervision.streams import ReplicaLostError
from omni.supervision.supervisor import StageSpec, StageSupervisor, SupervisorConfig

STALL_TIMEOUT_S = 1.0


def test_heartbeats_report_how_long_the_worker_has_stalled() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=30) as router:
        runtime = echo_runtime(endpoint).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=10)
            assert runtime._heartbeat().stalled_s == 0.0  # idle: holds nothing
            stream = router.submit(
                "echo", {"x": torch.ones(1)}, ECHO.encode(EchoParams(delay_s=1.5))
            )
            deadline = time.monotonic() + 10
            while runtime._heartbeat().load == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.5)
            # Mid-step (the worker sleeps 1.5 s in it): the loop has not gone round since.
            assert runtime._heartbeat().stalled_s >= 0.5
            stream.result(timeout=10)
            assert runtime._heartbeat().stalled_s == 0.0
        finally:
            runtime.stop()
            runtime.join(10)


def test_a_wedged_worker_is_declared_hung_its_requests_fail_and_it_is_restarted() -> None:
    spec = StageSpec(role="echo", extra_args=("--log-level", "WARNING"))
    # Heartbeats keep coming (a 30 s heartbeat timeout never fires): only the stall can tell.
    with (
        ipc_endpoint() as endpoint,
        running_router(
            endpoint, heartbeat_timeout_s=30.0, stall_timeout_s=STALL_TIMEOUT_S
        ) as router,
    ):
        supervisor = StageSupervisor(router, [spec], SupervisorConfig(restart_delay_s=0.0)).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=60)
            victim = supervisor.pids()["echo-0"]
            hang = ECHO.encode(EchoParams(hang=True))
            stream = router.submit("echo", {"x": torch.ones(1)}, hang, request_id="wedged")
            started = time.monotonic()
            with pytest.raises(
                ReplicaLostError,
                match=r"request wedged failed: stage 'echo' replica echo-0 \(pid \d+\) is hung "
                r"\(its worker made no progress for 1\.\d s while holding requests; the limit "
                r"is 1 s\)",
            ):
                stream.result(timeout=30)
            # The stall timeout, plus a heartbeat or two and the router's tick.
            assert time.monotonic() - started < STALL_TIMEOUT_S + 2.0

            assert router.wait_for_replicas("echo", 1, timeout=60)
            [info] = router.replicas("echo")
            assert info.pid != victim
            [reply] = router.submit("echo", {"x": torch.ones(1)}).result(timeout=10)
            assert reply.tensors["x"].tolist() == [3.0]
            assert [(e.pid, e.reason, e.restarted) for e in supervisor.events] == [
                (victim, "was killed by SIGKILL", True)  # by the supervisor, once declared hung
            ]
        finally:
            supervisor.stop()
    assert our_segments() == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_hello_reusing_a_live_replicas_id_is_refused_and_displaces_nothing() -> None:
    codec = stage_codec()
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        runtime = echo_runtime(endpoint).start()
        forger: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        forger.connect(endpoint)
        try:
            assert router.wait_for_replicas("echo", 1, timeout=10)
            slow = ECHO.encode(EchoParams(chunks=3, delay_s=0.3))
            stream = router.submit("echo", {"x": torch.ones(1)}, slow, request_id="held")
            first = stream.next(timeout=10)
            # Same id, another process (this one, alive) on another connection: three times.
            forged = Hello(replica_id="echo-0", role="echo", capacity=1, pid=os.getpid())
            for _ in range(3):
                forger.send_multipart(codec.encode(forged))
                answer = codec.decode(forger.recv_multipart())
                assert isinstance(answer, StageError)
                assert answer.message == (
                    f"replica id 'echo-0' belongs to a live replica (pid {os.getpid()}); this "
                    f"HELLO (pid {os.getpid()}) is refused"
                )
            # The held request finishes on the replica that had it; nothing was lost.
            rest = stream.result(timeout=10)
            assert [r.replica_id for r in (first, *rest)] == ["echo-0"] * 3
            assert (router.counters.replicas_lost, router.counters.requests_failed) == (0, 0)
            assert router.counters.replicas_joined == 1
        finally:
            forger.close(linger=0)
            runtime.stop()
            runtime.join(10)


def test_a_hello_may_take_the_id_of_a_replica_whose_process_is_gone() -> None:
    codec = stage_codec()
    context = zmq.Context.instance()
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=30) as router:
        old: zmq.Socket = context.socket(zmq.DEALER)
        new: zmq.Socket = context.socket(zmq.DEALER)
        old.connect(endpoint)
        new.connect(endpoint)
        try:
            # The first process exited (on this host) before its heartbeats timed out.
            here = host_id()
            gone = Hello(replica_id="x-0", role="x", capacity=1, pid=_dead_pid(), host_id=here)
            old.send_multipart(codec.encode(gone))
            assert isinstance(codec.decode(old.recv_multipart()), Welcome)
            hello = Hello(replica_id="x-0", role="x", capacity=1, pid=os.getpid(), host_id=here)
            new.send_multipart(codec.encode(hello))
            assert isinstance(codec.decode(new.recv_multipart()), Welcome)
            assert [info.pid for info in router.replicas("x")] == [os.getpid()]
        finally:
            old.close(linger=0)
            new.close(linger=0)
