"""A tensor-parallel LLM stage (two gloo ranks on the CPU) under the supervisor: a SIGKILLed
rank of either kind fails the replica's requests within 5 s and no rank outlives its replica;
the supervisor starts the whole replica again, which then serves the offline tokens."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from fixtures_models import make_tiny_checkpoint
from omni.stages.contracts import llm
from stage_helpers import ipc_endpoint, running_router

from omni import LLM, SamplingParams
from omni.multimodal.requests import llm_request
from omni.supervision.router import StageRouter
from omni.supervision.streams import StageFailure
from omni.supervision.supervisor import StageSpec, StageSupervisor, SupervisorConfig

PROMPT = [5, 9, 13, 2, 7]
SHORT = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# Long enough to be in flight when a rank is killed after its first token.
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _tokens(router: StageRouter) -> list[int]:
    replies = router.submit("llm", *llm_request(PROMPT, SHORT)).result(timeout=60)
    updates = [llm.CONTRACT.decode_reply(reply.body) for reply in replies]
    return [token for update in updates for token in update.token_ids_delta]


def _restarted(router: StageRouter, old_pid: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        live = router.replicas("llm")
        if live and live[0].pid != old_pid:
            return live[0].pid
        time.sleep(0.1)
    raise AssertionError("the replica was not started again")


def test_a_killed_rank_takes_its_replica_down_and_the_supervisor_restarts_it(
    tmp_path: Path,
) -> None:
    path = make_tiny_checkpoint("qwen2", tmp_path / "qwen2")
    expected = LLM(str(path), device="cpu", num_kv_blocks=64).generate(
        [PROMPT], SHORT, use_tqdm=False
    )[0].outputs[0].token_ids
    spec = StageSpec(
        role="llm",
        model=str(path),
        devices=("cpu",),
        devices_per_replica=2,
        extra_args=(
            "--tensor-parallel-size", "2", "--option", "num_kv_blocks=64",
            "--log-level", "WARNING",
        ),
    )  # fmt: skip
    # A 2 s heartbeat timeout: generous for a busy 2-core machine, still well under 5 s.
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=2.0) as router:
        # One restart is enough to show: the second death ends the test's replica for good.
        supervisor = StageSupervisor(
            router, [spec], SupervisorConfig(restart_delay_s=0.0, max_restarts=1)
        )
        supervisor.start()
        try:
            assert router.wait_for_replicas("llm", 1, timeout=120)
            [replica] = router.replicas("llm")
            assert replica.device == "cpu,cpu"
            assert _tokens(router) == expected

            # A follower dies mid-request: rank 0 fails the request, leaves, and is restarted.
            [follower] = _children(replica.pid)
            stream = router.submit("llm", *llm_request(PROMPT, LONG), request_id="doomed")
            stream.next(timeout=60)
            os.kill(follower, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(
                StageFailure, match=rf"tensor-parallel rank 1 \(pid {follower}\) was killed by "
                "SIGKILL",
            ):  # fmt: skip
                stream.result(timeout=10)
            assert time.monotonic() - killed_at < 5
            rank0 = _restarted(router, replica.pid)
            assert _tokens(router) == expected

            # Rank 0 dies mid-request: the request fails, and its follower goes with it.
            [follower] = _children(rank0)
            stream = router.submit("llm", *llm_request(PROMPT, LONG), request_id="orphaned")
            stream.next(timeout=60)
            os.kill(rank0, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(StageFailure, match=rf"\(pid {rank0}\) was killed by SIGKILL"):
                stream.result(timeout=10)
            assert time.monotonic() - killed_at < 5
            while _alive(follower) and time.monotonic() - killed_at < 5:
                time.sleep(0.05)
            assert not _alive(follower)
            deadline = time.monotonic() + 10
            while len(supervisor.events) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [(e.reason, e.restarted) for e in supervisor.events] == [
                ("exited with code 1", True),  # rank 0 leaving after its follower's death
                ("was killed by SIGKILL", False),  # max_restarts=1: not started again
            ]
        finally:
            supervisor.stop()
