"""`omni serve --llm-replicas 2 --vision-replicas 2` under 64 concurrent image chats, half of
them repeats, each stage replica its own process.

- every answer equals transformers' greedy output for its image;
- each chat is exactly one LLM stage request (`omni:stage_requests_total{stage="llm"}`);
- a repeat makes no vision request: the vision stage is asked once per distinct image, by the
  LLM replica that the image's hash routes to (the repeat goes there too, and waits for the
  same encoder call or finds the image cached);
- both LLM replicas and both vision replicas take work.

And `--api-server-count 2`: two API processes share the port, and each serves on its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fixtures_vl import make_tiny_qwen2_5_vl, noise_image
from server_fixtures import NO_PERCEPTION_FLAGS, free_port, tiny_chat_model
from test_vl_engine import NEW_TOKENS, reference

from omni.multimodal import Qwen2VLPromptProcessor, prepare_qwen2_vl_prompt

MODEL = "tiny-vl"
DISTINCT = 32
QUESTION = "what is in this picture?"


def data_url(seed: int) -> str:
    buffer = io.BytesIO()
    noise_image(56 + 28 * (seed % 3), 56, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(url_or_image: object) -> list[dict]:
    if isinstance(url_or_image, str):
        part = {"type": "image_url", "image_url": {"url": url_or_image}}
    else:
        part = {"type": "image", "image": url_or_image}
    return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", MODEL, "--llm-replicas", "2", "--vision-replicas", "2",
        "--devices", "llm=cpu,vision=cpu", "--no-speech",
        *NO_PERCEPTION_FLAGS,
        "--option", "num_kv_blocks=512", "--option", "block_size=8",
        "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, lambda: httpx.get(f"{url}/health", timeout=10))
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0


def wait_until_up(process: subprocess.Popen[bytes], probe: Callable[[], httpx.Response]) -> None:
    """Until `probe` answers 200; fails if the server exits or takes over 300 s."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, "omni serve exited early"
        assert time.monotonic() < deadline, "omni serve did not come up"
        with contextlib.suppress(httpx.TransportError):
            if probe().status_code == 200:
                return
        time.sleep(0.2)


def stage_requests(url: str) -> dict[str, float]:
    """`omni:stage_requests_total` by replica id."""
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("omni:stage_requests_total{"):
            labels, _, value = line.rpartition(" ")
            replica = labels.split('replica="', 1)[1].split('"', 1)[0]
            found[replica] = float(value)
    return found


def test_64_concurrent_image_chats_on_two_llm_and_two_vision_replicas(
    folder: Path, server: str
) -> None:
    processor = Qwen2VLPromptProcessor.from_pretrained(str(folder))
    expected = []
    for seed in range(DISTINCT):
        image = noise_image(56 + 28 * (seed % 3), 56, seed)
        prompt = prepare_qwen2_vl_prompt(processor, messages=messages(image))
        tokens = reference(folder, prompt)
        expected.append(processor.tokenizer.decode(tokens, skip_special_tokens=True))
    before = stage_requests(server)

    async def ask_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)

        async def ask(seed: int) -> str:
            reply = await client.chat.completions.create(
                model=MODEL,
                messages=messages(data_url(seed)),  # type: ignore[arg-type]
                max_tokens=NEW_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return reply.choices[0].message.content or ""

        # Every image twice, the repeats interleaved with the first askings.
        seeds = [seed for seed in range(DISTINCT) for _ in range(2)]
        return list(await asyncio.gather(*(ask(seed) for seed in seeds)))

    answers = asyncio.run(ask_all())
    assert answers == [answer for answer in expected for _ in range(2)]

    sent = {
        replica: count - before.get(replica, 0.0)
        for replica, count in stage_requests(server).items()
    }
    llm = {r: n for r, n in sent.items() if r.startswith("llm-")}
    vision = {r: n for r, n in sent.items() if r.startswith("vision-")}
    assert sum(llm.values()) == 2 * DISTINCT
    assert sum(vision.values()) == DISTINCT
    assert sorted(llm) == ["llm-0", "llm-1"] and min(llm.values()) > 0
    assert sorted(vision) == ["vision-0", "vision-1"] and min(vision.values()) > 0


def test_two_api_processes_share_the_port_and_each_serves(tmp_path: Path) -> None:
    """`--api-server-count 2`: two API processes accept on one socket, and either one alone
    answers (the other stopped), through its own router joined by the same LLM replica."""
    folder = tiny_chat_model(tmp_path / "model")
    port = free_port()
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", "tiny", "--api-server-count", "2", "--devices", "llm=cpu",
        "--no-speech",
        *NO_PERCEPTION_FLAGS, "--option", "num_kv_blocks=256", "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0}
    try:
        wait_until_up(process, lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=10))
        [other] = [pid for pid, args in children(process.pid) if "--api-server-rank" in args]
        assert listening_socket(process.pid) == listening_socket(other) is not None
        expected = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
        for stopped, serving in ((process.pid, other), (other, process.pid)):
            os.kill(stopped, signal.SIGSTOP)
            try:
                # Each a new connection: only `serving` accepts while `stopped` is stopped.
                answers = [
                    httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
                    for _ in range(4)
                ]
            finally:
                os.kill(stopped, signal.SIGCONT)
            assert [a["choices"] for a in answers] == [expected["choices"]] * 4, serving
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0
    assert children(process.pid) == []


def children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                args = (entry / "cmdline").read_bytes().decode().split("\0")
                found.append((int(entry.name), args))
    return found


def listening_socket(pid: int) -> str | None:
    """The inode of the TCP listening socket open in `pid` (from /proc/net/tcp)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # TCP_LISTEN
            listening.add(fields[9])
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:[") and target[8:-1] in listening:
                return target[8:-1]
    return None


def test_encoders_colocated_in_the_llm_replicas_processes(folder: Path) -> None:
    """`--colocate-encoders --llm-replicas 2`: each LLM replica's process also runs a vision
    replica, and no vision process is started; image chats are answered as transformers
    answers them, each image encoded once. A SIGKILLed LLM process takes its vision replica
    along: both are restarted, in one process again, and serve."""
    processor = Qwen2VLPromptProcessor.from_pretrained(str(folder))
    seeds = [*range(8), *range(100, 104)]  # the last four after the kill
    expected = {}
    for seed in seeds:
        prompt = prepare_qwen2_vl_prompt(processor, messages=messages(noise_image(56, 56, seed)))
        tokens = reference(folder, prompt)
        expected[seed] = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    port = free_port()
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", MODEL, "--llm-replicas", "2", "--colocate-encoders",
        "--devices", "llm=cpu", "--no-speech",
        *NO_PERCEPTION_FLAGS, "--option", "num_kv_blocks=256",
        "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"

    def ask(seed: int) -> str:
        body = {
            "model": MODEL,
            "messages": messages(png_url(seed)),
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["message"]["content"])

    try:
        wait_until_up(process, lambda: httpx.get(f"{url}/health", timeout=10))
        stages = [args for _, args in children(process.pid) if "stage" in args]
        assert sorted(args[args.index("stage") + 1] for args in stages) == ["llm", "llm"]
        assert sorted(args[args.index("--colocate") + 1] for args in stages) == ["vision"] * 2
        assert {seed: ask(seed) for seed in range(8)} == {s: expected[s] for s in range(8)}
        # Heartbeats carry the counts (every second): eight distinct images, eight encodes.
        deadline = time.monotonic() + 30
        while sum(encoder_requests(url).values()) < 8:
            assert time.monotonic() < deadline, encoder_requests(url)
            time.sleep(0.2)
        encoded = encoder_requests(url)
        assert sorted(encoded) == ["vision-0", "vision-1"] and sum(encoded.values()) == 8
        [victim] = [
            pid
            for pid, args in children(process.pid)
            if "--colocate-replica-id" in args
            and args[args.index("--colocate-replica-id") + 1] == "vision-0"
        ]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while metric(url, "omni:stage_restarts_total") < 1 or live_replicas(url) != {
            "llm-0",
            "llm-1",
            "vision-0",
            "vision-1",
        }:
            assert time.monotonic() < deadline, "the killed process was not restarted"
            time.sleep(0.2)
        [restarted] = [
            args
            for pid, args in children(process.pid)
            if "--colocate-replica-id" in args
            and args[args.index("--colocate-replica-id") + 1] == "vision-0"
        ]
        assert restarted[restarted.index("stage") + 1] == "llm"
        after = range(100, 104)
        assert {seed: ask(seed) for seed in after} == {s: expected[s] for s in after}
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0
    assert children(process.pid) == []


def png_url(seed: int) -> str:
    buffer = io.BytesIO()
    noise_image(56, 56, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def encoder_requests(url: str) -> dict[str, float]:
    """`omni:encoder_requests_encoded_total` by replica id."""
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("omni:encoder_requests_encoded_total{"):
            labels, _, value = line.rpartition(" ")
            found[labels.split('replica="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def live_replicas(url: str) -> set[str]:
    """The replica ids the router routes to (`omni:stage_requests_running`)."""
    found = set()
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("omni:stage_requests_running{"):
            found.add(line.split('replica="', 1)[1].split('"', 1)[0])
    return found


def metric(url: str, name: str) -> float:
    """An unlabelled metric's value."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")
