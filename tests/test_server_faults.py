"""Issue 14's faults, reproduced against `omni serve` as operators run it: one API process with
an LLM stage and a vision stage as supervised processes (tiny Qwen2.5-VL on the CPU).

- a request head over the header limit gets 431 and its connection closes, while /health keeps
  answering within 100 ms;
- connections that send no complete request head within the header timeout are closed (one
  silent, and slow-loris ones that send a byte at a time);
- sixteen 6000x6000 PNGs (tiny files) are refused from their headers within 100 ms by the
  per-request pixel budget, and the API process does not grow;
- /health is 503 naming the stage role that has no live replica, then 200 once it is back;
- SIGTERM (what systemd, Docker and Kubernetes send) stops everything within 10 s and leaves no
  process, no /dev/shm segment and no /tmp/omni-* folder. This one runs last.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures_vl import make_tiny_qwen2_5_vl
from PIL import Image
from server_fixtures import NO_PERCEPTION_FLAGS, free_port

from omni.multimodal.chat import load_tokenizer_with_template

MODEL = "tiny-vl"
KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT_S = 2.0
MAX_HEADER_BYTES = 64 * 1024


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int, folder: Path) -> None:
        self.process = process
        self.folder = folder
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def children(self) -> dict[int, list[bytes]]:
        """pid -> argv of every live process whose parent is the server."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
        return found

    def stage_pid(self, replica_id: str) -> int | None:
        for pid, argv in self.children().items():
            if (
                b"--replica-id" in argv
                and argv[argv.index(b"--replica-id") + 1] == replica_id.encode()
            ):
                return pid
        return None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.process.poll() is None, "omni serve exited"
        with contextlib.suppress(httpx.TransportError):
            if server.health().status_code == 200:
                return
        assert time.monotonic() < deadline, "omni serve did not become healthy"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))
    port = free_port()
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", MODEL, "--devices", "llm=cpu,vision=cpu", "--no-speech",
        *NO_PERCEPTION_FLAGS,
        "--option", "num_kv_blocks=128", "--option", "block_size=8", "--api-key", KEY,
        "--header-timeout", str(HEADER_TIMEOUT_S), "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    running = Server(process, port, folder)
    try:
        wait_healthy(running, 240)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(60)


def _timed_health(server: Server, client: httpx.Client) -> float:
    started = time.perf_counter()
    assert client.get(f"{server.url}/health").status_code == 200
    return time.perf_counter() - started


def test_a_header_over_the_limit_gets_431_and_health_stays_fast(server: Server) -> None:
    flood = socket.create_connection(("127.0.0.1", server.port))
    flood.settimeout(10)
    sent = 0
    refused = threading.Event()
    answer = bytearray()

    def send_flood() -> None:
        # The reproduction: a header that never ends, a MiB at a time (400 in the issue; the
        # server must give up long before 64 of them).
        nonlocal sent
        flood.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        with contextlib.suppress(OSError):
            for _ in range(64):
                flood.sendall(chunk)
                sent += 1
        refused.set()

    sender = threading.Thread(target=send_flood)
    sender.start()
    latencies = []
    with httpx.Client(timeout=10) as client:
        _timed_health(server, client)  # a warm connection, as a load balancer keeps
        while not refused.is_set():
            latencies.append(_timed_health(server, client))
    sender.join(30)
    with contextlib.suppress(OSError):
        while chunk := flood.recv(65536):
            answer += chunk
    flood.close()
    assert sent < 64, "the server took 64 MiB of one header"
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), bytes(answer)
    assert b"the limit is 65536 bytes (--max-header-bytes)" in answer
    assert max(latencies, default=0.0) < 0.1, latencies


def _closed_within(connection: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """(whether the server closed `connection` within `timeout` s, what it sent first)."""
    connection.settimeout(timeout)
    received = b""
    try:
        while chunk := connection.recv(4096):
            received += chunk
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        pass
    return True, received


def test_connections_without_a_complete_head_are_closed_after_the_header_timeout(
    server: Server,
) -> None:
    silent = socket.create_connection(("127.0.0.1", server.port))
    lorises = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    opened = time.monotonic()
    for loris in lorises:
        loris.sendall(b"G")
    # A byte at a time, every 0.25 s: never a whole head, never idle for long.
    for byte in b"ET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ":
        time.sleep(0.25)
        if time.monotonic() - opened > HEADER_TIMEOUT_S + 1:
            break
        for loris in lorises:
            with contextlib.suppress(OSError):
                loris.sendall(bytes([byte]))
    for connection in (silent, *lorises):
        closed, received = _closed_within(connection, HEADER_TIMEOUT_S + 2)
        connection.close()
        assert closed, "the connection was left open"
        assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received
    assert time.monotonic() - opened < HEADER_TIMEOUT_S + 4
    assert server.health().status_code == 200


def _big_blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_sixteen_huge_images_are_refused_from_their_headers(server: Server) -> None:
    png = _big_blank_png()
    assert len(png) < 100_000  # 36 megapixels each, in a few tens of KB
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(16)]
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
    before = server.rss_bytes()
    elapsed = []
    with httpx.Client(timeout=30, headers=AUTH) as client:
        for _ in range(3):  # the best of three: the bound is the server's work, not the machine's
            started = time.perf_counter()
            reply = client.post(f"{server.url}/v1/chat/completions", json=body)
            elapsed.append(time.perf_counter() - started)
            assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["message"] == (
        "messages[0].content[4] (6000x6000 pixels) brings the request's images to 180000000 "
        "pixels; the limit is 160000000 pixels per request (max_request_pixels)"
    )
    assert error["param"] == "messages[0].content[4]"
    assert min(elapsed) < 0.1, elapsed
    assert server.rss_bytes() - before < 100 * 1024 * 1024
    assert server.health().status_code == 200


def test_text_spelling_special_tokens_is_plain_text(server: Server) -> None:
    # What `vllm bench serve --dataset-name random-mm` hit: random prompt text that spells
    # "<|image_pad|>" was an image placeholder with no image behind it (a 400).
    text = "<|vision_start|><|image_pad|><|vision_end|> then <|im_end|>"
    tokenizer = load_tokenizer_with_template(str(server.folder))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "\ue000"}], tokenize=False, add_generation_prompt=True
    )
    before, after = rendered.split("\ue000")
    expected = (
        tokenizer(before)["input_ids"]
        + tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        + tokenizer(after, add_special_tokens=False)["input_ids"]
    )
    png = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(png, format="PNG")
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()},
    }
    with httpx.Client(timeout=60, headers=AUTH) as client:
        for content in (text, [image, {"type": "text", "text": text}]):
            body = {
                "model": MODEL,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": content}],
            }
            reply = client.post(f"{server.url}/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            if isinstance(content, str):
                assert reply.json()["usage"]["prompt_tokens"] == len(expected)


def test_health_names_a_role_without_a_live_replica(server: Server) -> None:
    victim = server.stage_pid("vision-0")
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (health := server.health()).status_code == 200:
        assert time.monotonic() < deadline, "/health stayed 200 with no vision replica"
        time.sleep(0.02)
    assert health.status_code == 503
    assert health.json()["error"] == {
        "message": "no live replica of stage 'vision'",
        "type": "service_unavailable",
        "param": None,
        "code": None,
    }
    wait_healthy(server, 120)  # the supervisor starts it again
    assert server.stage_pid("vision-0") not in (None, victim)


def test_sigterm_stops_everything_and_leaves_nothing(server: Server) -> None:
    children = server.children()
    stages = [pid for pid, argv in children.items() if b"--replica-id" in argv]
    assert len(stages) == 2
    [connect] = {argv[argv.index(b"--connect") + 1].decode() for pid, argv in children.items()
                 if b"--connect" in argv}  # fmt: skip
    ipc_folder = Path(connect.removeprefix("ipc://")).parent
    assert ipc_folder.name.startswith("omni-") and ipc_folder.exists()
    owners = {str(pid) for pid in [server.process.pid, *stages]}

    server.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = server.process.wait(10)
    assert time.monotonic() - started < 10
    assert code == 0
    deadline = time.monotonic() + 2  # reaped children may take a moment to leave /proc
    while any(Path(f"/proc/{pid}").exists() for pid in children):
        assert time.monotonic() < deadline, "a child process outlived the server"
        time.sleep(0.05)
    left = [
        n for n in os.listdir("/dev/shm") if n.startswith("omni_") and n.split("_")[1] in owners
    ]
    assert left == []
    assert not ipc_folder.exists()
