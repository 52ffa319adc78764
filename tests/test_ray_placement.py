"""`omni serve --placement ray` on a local two-node Ray cluster, on the CPU.

The second node alone has the custom resource `stage_host`; `--llm-resources` and
`--vision-resources` ask for it, so Ray places both stage replicas there as actors, each of
which runs `omni stage` joining the router over TCP with a CURVE key pair it made:

- image chats equal transformers' greedy output;
- SIGKILL of the LLM replica's actor process: Ray restarts the actor, the replica joins again
  within 30 s, and chats succeed after it;
- after SIGINT of `omni serve`, no omni actor is alive in the cluster and the stages left
  nothing in /dev/shm.

Skipped without Ray (`pip install omni[ray]`); CI does not install it (see README).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_vl import make_tiny_qwen2_5_vl
from omni.transport.shm import list_segments
from server_fixtures import NO_PERCEPTION_FLAGS, free_port
from test_remote_stages import MODEL, chat_body, expected_answer
from test_server_replicas import wait_until_up

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, str]]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=2, resources={"stage_host": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, second.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


@dataclass(frozen=True)
class Actor:
    name: str
    node_id: str
    pid: int


def stage_actors() -> list[Actor]:
    """omni's live stage actors in the cluster. Ray's state API needs its dashboard (ray
    [default]); the GCS table under it does not."""
    from ray._private import state

    return [
        Actor(info["Name"], info["Address"]["NodeID"], info["Pid"])
        for info in state.actors().values()
        if info["ActorClassName"] == "StageActor" and info["State"] == "ALIVE"
    ]


def wait_health(url: str, status: int, timeout_s: float) -> float:
    """Seconds until /health answers `status`."""
    started = time.monotonic()
    while httpx.get(f"{url}/health", timeout=10).status_code != status:
        assert time.monotonic() - started < timeout_s, f"/health did not become {status}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_ray_places_stages_on_the_node_with_their_resources(
    cluster: tuple[Any, str], tmp_path: Path
) -> None:
    address, second_node = cluster[0].address, cluster[1]
    folder = make_tiny_qwen2_5_vl(tmp_path / "model")
    port = free_port()
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", MODEL, "--placement", "ray", "--ray-address", address,
        "--llm-resources", "stage_host=1,CPU=1", "--vision-resources", "stage_host=1,CPU=1",
        "--no-speech", "--option", "num_kv_blocks=512", "--option", "block_size=8",
        *NO_PERCEPTION_FLAGS,
    ]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, lambda: httpx.get(f"{url}/health", timeout=10))
        actors = stage_actors()
        assert sorted(actor.name for actor in actors) == ["llm-0", "vision-0"]
        assert {actor.node_id for actor in actors} == {second_node}

        expected = {seed: expected_answer(folder, seed) for seed in (0, 1)}
        for seed in (0, 1, 0):
            answer = httpx.post(f"{url}/v1/chat/completions", json=chat_body(seed), timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == expected[seed]

        [llm_actor] = [actor for actor in stage_actors() if actor.name == "llm-0"]
        os.kill(llm_actor.pid, signal.SIGKILL)
        wait_health(url, 503, timeout_s=30)
        back_after = wait_health(url, 200, timeout_s=30)
        print(f"the LLM replica was back {back_after:.1f} s after its actor's death was seen")
        [restarted] = [actor for actor in stage_actors() if actor.name == "llm-0"]
        assert restarted.pid != llm_actor.pid and restarted.node_id == second_node
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat_body(1), timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == expected[1]
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(120)
    text = log.read_text()
    assert code == 0, text
    assert "lost its Ray actor" in text
    assert stage_actors() == []
    stage_pids = {int(pid) for pid in re.findall(r"replica \S+ joined: pid (\d+)", text)}
    assert len(stage_pids) == 3, text  # llm-0 twice, vision-0 once
    assert [name for pid in stage_pids for name in list_segments(pid=pid)] == []
