"""Supervised stages never outlive the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from omni.transport.shm import list_segments
from stage_helpers import SHM_PREFIX, ipc_endpoint


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.split() == ["State:", "Z", "(zombie)"] for line in status)
    except FileNotFoundError:
        return True


def test_stages_exit_cleanly_when_their_server_is_killed() -> None:
    with ipc_endpoint() as endpoint:
        server_script = textwrap.dedent(
            f"""
            import sys, time, torch
            from omni.supervision.router import RouterConfig, StageRouter
            from omni.supervision.supervisor import StageSpec, StageSupervisor
            router = StageRouter(RouterConfig(
                endpoint={endpoint!r}, heartbeat_interval_s=0.05, heartbeat_timeout_s=1.0,
                shm_prefix={SHM_PREFIX!r})).start()
            args = ("--shm-threshold-bytes", "64", "--log-level", "WARNING")
            spec = StageSpec(role="echo", extra_args=args)
            supervisor = StageSupervisor(router, [spec]).start()
            assert router.wait_for_replicas("echo", 1, timeout=60)
            [reply] = router.submit("echo", {{"x": torch.ones(100)}}).result(timeout=10)
            assert list(reply.handles) == ["x"]  # the stage now owns a shared-memory segment
            print(supervisor.pids()["echo-0"], flush=True)
            time.sleep(120)
            """
        )
        stage_pid = 0
        server = subprocess.Popen(
            [sys.executable, "-c", server_script], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            stage_pid = int(server.stdout.readline())
            assert list_segments(SHM_PREFIX, pid=stage_pid) != []
            server.send_signal(signal.SIGKILL)  # no chance to clean up: the stage must notice
            server.wait(timeout=10)
            deadline = time.monotonic() + 10
            while not _gone(stage_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _gone(stage_pid)
            # It left through the clean path, so it unlinked its own segments on the way out.
            assert list_segments(SHM_PREFIX, pid=stage_pid) == []
        finally:
            server.kill()
            server.wait()
            if stage_pid and not _gone(stage_pid):
                os.kill(stage_pid, signal.SIGKILL)
