"""Stages that join a live server over TCP with CURVE keys, as stages on other hosts do.

`omni serve` runs a tiny Qwen2.5-VL with `--llm-replicas 0 --vision-replicas 0` and
`--stage-endpoint tcp://127.0.0.1:PORT --stage-keys DIR`, so it starts no stage of its own.
`omni stage llm` and `omni stage vision` then run as separate processes, each with its own HOME
and working folder and `--no-shared-memory` (a host identity of their own, so every tensor
travels as frames, as between two hosts):

- /health is 503 naming both roles until they join, then 200; the stages count in /metrics;
- image chats equal transformers' greedy output, and the stages leave nothing in /dev/shm;
- a stage whose client key is not on the server's list is refused, both sides log it, and it
  exits with code 2 (a bad configuration: restarting it cannot help);
- SIGKILL of the LLM stage fails its in-flight stream at once (its TCP connection closes; no
  waiting for missed heartbeats) with a 503 naming it, and a new LLM stage takes over;
- SIGTERM takes a stage out cleanly (exit 0, /health 503 again).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq.auth
from fixtures_vl import make_tiny_qwen2_5_vl, noise_image
from omni.transport.key_folder import load_server_keys, load_stage_keys
from omni.transport.shm import list_segments
from server_fixtures import NO_PERCEPTION_FLAGS, free_port
from test_server_replicas import data_url, messages, wait_until_up
from test_vl_engine import NEW_TOKENS, reference

from omni.cli import main
from omni.multimodal import Qwen2VLPromptProcessor, prepare_qwen2_vl_prompt
from omni.server.config import ServeConfig
from omni.server.flag_values import parse_resources

MODEL = "tiny-vl"


def test_keys_generate_writes_a_server_pair_and_client_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "generate", str(keys), "--client", "gpu-1", "--client", "gpu-2"]) == 0
    written = sorted(Path(line).relative_to(keys).as_posix() for line in
                     capsys.readouterr().out.split())  # fmt: skip
    assert written == [
        "clients/gpu-1.key", "clients/gpu-1.key_secret", "clients/gpu-2.key",
        "clients/gpu-2.key_secret", "server.key", "server.key_secret",
    ]  # fmt: skip
    for secret in ("server.key_secret", "clients/gpu-1.key_secret"):
        assert (keys / secret).stat().st_mode & 0o777 == 0o600
    server = load_server_keys(keys)
    stage = load_stage_keys(str(keys / "server.key"), keys / "clients" / "gpu-2.key_secret")
    assert stage.server_key == server.public_key
    clients = {zmq.auth.load_certificate(str(keys / f"clients/gpu-{i}.key"))[0].decode()
               for i in (1, 2)}  # fmt: skip
    assert set(server.authorized_clients) == clients and stage.public_key in clients
    # A new client joins the list; the server's pair and an existing client's are kept.
    server_pair = (keys / "server.key_secret").read_bytes()
    assert main(["keys", "generate", str(keys), "--client", "gpu-3"]) == 0
    assert (keys / "server.key_secret").read_bytes() == server_pair
    assert len(load_server_keys(keys).authorized_clients) == 3
    capsys.readouterr()
    assert main(["keys", "generate", str(keys), "--client", "gpu-1"]) == 2
    assert "already holds keys for ['gpu-1']; pick other names" in capsys.readouterr().err
    assert main(["keys", "generate", str(keys), "--client", "../up"]) == 2
    assert "client name '../up': use letters, digits" in capsys.readouterr().err


def test_a_tcp_stage_endpoint_needs_keys_and_zero_replicas_need_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tcp://127.0.0.1:5555 needs CURVE keys: --stage-keys"):
        ServeConfig(stage_endpoint="tcp://127.0.0.1:5555")
    assert ServeConfig(
        stage_endpoint="tcp://127.0.0.1:5555", insecure_stage_endpoint=True
    ).insecure_stage_endpoint
    with pytest.raises(ValueError, match="name the interface to bind, not a wildcard"):
        ServeConfig(stage_endpoint="tcp://*:5555", stage_keys=str(tmp_path))
    with pytest.raises(ValueError, match="must be tcp://HOST:PORT"):
        ServeConfig(stage_endpoint="ipc:///tmp/x.sock", stage_keys=str(tmp_path))
    with pytest.raises(ValueError, match=r"llm_replicas is 0: .* need --stage-endpoint"):
        ServeConfig(llm_replicas=0)
    with pytest.raises(ValueError, match="vision_replicas is -1; it must be >= 0"):
        ServeConfig(vision_replicas=-1)
    with pytest.raises(ValueError, match="stage_keys and insecure_stage_endpoint need a stage"):
        ServeConfig(stage_keys=str(tmp_path))
    # The command line refuses it before loading anything.
    assert main(["serve", "--stage-endpoint", "tcp://127.0.0.1:5555"]) == 2


def test_ray_placement_settings_are_checked_before_anything_starts() -> None:
    config = ServeConfig(placement="ray", llm_resources={"GPU": 1, "CPU": 4, "big_mem": 1})
    assert config.resources("llm") == {"GPU": 1.0, "CPU": 4.0, "big_mem": 1.0}
    assert config.resources("vision") == {"GPU": 1.0}  # a GPU each by default
    # Ray brings its own keys: a tcp endpoint needs no --stage-keys there.
    assert ServeConfig(placement="ray", stage_endpoint="tcp://10.0.0.1:5555").on_ray
    assert parse_resources("llm_resources", "GPU=0.5,CPU=2") == {"GPU": 0.5, "CPU": 2.0}
    with pytest.raises(ValueError, match="llm_resources 'GPU' must look like GPU=1,CPU=4"):
        parse_resources("llm_resources", "GPU")
    with pytest.raises(ValueError, match="vision_resources: GPU='x' is not a number"):
        ServeConfig(placement="ray", vision_resources={"GPU": "x"})
    with pytest.raises(ValueError, match="llm_resources needs placement 'ray'"):
        ServeConfig(llm_resources={"GPU": 1})
    with pytest.raises(ValueError, match="placement 'cloud' is not one of"):
        ServeConfig(placement="cloud")
    with pytest.raises(ValueError, match="placement 'ray' does not go with single_process"):
        ServeConfig(placement="ray", single_process=True)
    with pytest.raises(ValueError, match="placement 'ray' does not go with devices"):
        ServeConfig(placement="ray", devices={"llm": ("cuda:0",)})


@dataclass
class Stage:
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Deployment:
    folder: Path
    keys: Path
    url: str
    stage_endpoint: str
    server: subprocess.Popen[bytes]
    server_log: Path
    root: Path
    stages: list[Stage] = field(default_factory=list)

    def start_stage(self, role: str, replica_id: str, client_key: Path) -> Stage:
        """`omni stage ROLE` as on another host: its own HOME and cwd, no shared memory."""
        home = self.root / replica_id
        home.mkdir()
        log = home / "stage.log"
        command = [
            sys.executable, "-m", "omni.cli", "stage", role,
            "--connect", self.stage_endpoint, "--model", str(self.folder),
            "--server-key", str(self.keys / "server.key"), "--client-key", str(client_key),
            "--replica-id", replica_id, "--no-shared-memory", "--capacity", "16",
        ]  # fmt: skip
        if role == "llm":
            command += ["--option", "num_kv_blocks=512", "--option", "block_size=8"]
        env = {**os.environ, "HOME": str(home)}
        with log.open("wb") as out:
            process = subprocess.Popen(command, cwd=home, env=env, stdout=out, stderr=out)
        stage = Stage(process, log)
        self.stages.append(stage)
        return stage

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def wait_health(self, status: int, timeout_s: float = 120) -> httpx.Response:
        deadline = time.monotonic() + timeout_s
        while (health := self.health()).status_code != status:
            assert time.monotonic() < deadline, f"/health stayed {health.status_code}"
            assert self.server.poll() is None, "omni serve exited"
            time.sleep(0.1)
        return health

    def chat(self, seed: int) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=chat_body(seed), timeout=60)


def chat_body(seed: int) -> dict[str, Any]:
    """A greedy image chat about `data_url(seed)`."""
    return {
        "model": MODEL, "messages": messages(data_url(seed)), "max_tokens": NEW_TOKENS,
        "temperature": 0, "ignore_eos": True,
    }  # fmt: skip


def expected_answer(folder: Path, seed: int) -> str:
    """transformers' greedy answer to `chat_body(seed)`."""
    processor = Qwen2VLPromptProcessor.from_pretrained(str(folder))
    image = noise_image(56 + 28 * (seed % 3), 56, seed)
    prompt = prepare_qwen2_vl_prompt(processor, messages=messages(image))
    return str(processor.tokenizer.decode(reference(folder, prompt), skip_special_tokens=True))


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    folder = make_tiny_qwen2_5_vl(tmp_path / "model")
    keys = tmp_path / "keys"
    assert main(["keys", "generate", str(keys), "--client", "llm-host",
                 "--client", "vision-host"]) == 0  # fmt: skip
    port, stage_port = free_port(), free_port()
    stage_endpoint = f"tcp://127.0.0.1:{stage_port}"
    server_log = tmp_path / "serve.log"
    config = tmp_path / "serve.yaml"
    config.write_text("startup-timeout-s: 1\n")
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", MODEL, "--llm-replicas", "0", "--vision-replicas", "0",
        "--stage-endpoint", stage_endpoint, "--stage-keys", str(keys), "--no-speech",
        # After this long with a role no stage serves, the log names it (see the test).
        "--config", str(config),
        *NO_PERCEPTION_FLAGS,
    ]  # fmt: skip
    with server_log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    found = Deployment(folder, keys, url, stage_endpoint, server, server_log, tmp_path)
    try:
        # Up (it answers) but not ready: 503 until the stages join.
        wait_until_up(server, lambda: httpx.get(f"{url}/v1/models", timeout=10))
        yield found
    finally:
        for stage in found.stages:
            if stage.process.poll() is None:
                stage.process.kill()
            stage.process.wait()
        server.send_signal(signal.SIGINT)
        code = server.wait(60)
        assert code == 0, server_log.read_text()


def test_remote_stages_join_over_curve_and_serve_image_chats(deployment: Deployment) -> None:
    d = deployment
    health = d.health()
    assert health.status_code == 503
    assert health.json()["error"]["message"] == "no live replica of stage 'llm', 'vision'"
    # Past the startup timeout, the log says what is missing and how to start it.
    missing = (
        f"no stage of 'llm', 'vision' has joined {d.stage_endpoint} within 1 s; start one on "
        f"a stage host: omni stage ROLE --connect {d.stage_endpoint} --model MODEL"
    )
    deadline = time.monotonic() + 60
    while missing not in d.server_log.read_text():
        assert time.monotonic() < deadline, d.server_log.read_text()
        time.sleep(0.1)

    # A stage with a well-formed key pair the server does not list, started beside the two
    # good ones: refused, and both sides say so.
    intruder_keys = d.root / "other-keys"
    assert main(["keys", "generate", str(intruder_keys), "--client", "intruder"]) == 0
    intruder = d.start_stage("vision", "vision-x", intruder_keys / "clients/intruder.key_secret")
    clients = d.keys / "clients"
    llm = d.start_stage("llm", "remote-llm-0", clients / "llm-host.key_secret")
    vision = d.start_stage("vision", "remote-vision-0", clients / "vision-host.key_secret")
    assert intruder.process.wait(120) == 2, intruder.text()
    intruder_key = load_stage_keys(
        str(d.keys / "server.key"), intruder_keys / "clients/intruder.key_secret"
    ).public_key
    assert (
        f"refused a stage connection: CURVE client key {intruder_key} is not on the allow-list"
        in d.server_log.read_text()
    )
    assert f"refused this stage: its CURVE client key {intruder_key}" in intruder.text()
    d.wait_health(200)
    assert "vision-x" not in httpx.get(f"{d.url}/metrics", timeout=10).text
    for stage in (llm, vision):
        assert "(shared memory: False)" in stage.text()

    seeds = [0, 1, 2, 0]
    answers = [d.chat(seed) for seed in seeds]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    expected = {seed: expected_answer(d.folder, seed) for seed in set(seeds)}
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [
        expected[seed] for seed in seeds
    ]
    metrics = httpx.get(f"{d.url}/metrics", timeout=10).text
    assert 'omni:stage_requests_total{replica="remote-llm-0",stage="llm"} 4.0' in metrics
    assert 'omni:stage_requests_total{replica="remote-vision-0",stage="vision"} 3.0' in metrics
    for stage in (llm, vision):
        assert list_segments(pid=stage.process.pid) == []

    # SIGKILL of the LLM stage mid-stream: its connection closes and the stream fails at once.
    body = {
        "model": MODEL, "messages": messages(data_url(5)), "max_tokens": 400,
        "temperature": 0, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    events = []
    # The bound: within 5 s of the kill (without the closed connection being noticed
    # it would take the heartbeat timeout, 5 s, plus up to a heartbeat interval).
    with httpx.stream(
        "POST", f"{d.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=5)
    ) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                break
        llm.process.send_signal(signal.SIGKILL)
        events = [json.loads(line[6:]) for line in lines
                  if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    errors = [event["error"] for event in events if "error" in event]
    assert len(errors) == 1, events
    assert errors[0]["type"] == "service_unavailable"
    assert (
        f"stage 'llm' replica remote-llm-0 (pid {llm.process.pid}) closed its connection"
        in errors[0]["message"]
    )
    health = d.wait_health(503)
    assert health.json()["error"]["message"] == "no live replica of stage 'llm'"

    # A new LLM stage takes over, with the same client key.
    successor = d.start_stage("llm", "remote-llm-1", clients / "llm-host.key_secret")
    d.wait_health(200)
    answer = d.chat(1)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == expected[1]

    # SIGTERM: the stage says GOODBYE and exits 0; the server is not ready without it.
    successor.process.send_signal(signal.SIGTERM)
    assert successor.process.wait(30) == 0, successor.text()
    assert d.wait_health(503, timeout_s=10).json()["error"]["message"] == (
        "no live replica of stage 'llm'"
    )
    assert "stage 'llm' replica remote-llm-1" in d.server_log.read_text()
