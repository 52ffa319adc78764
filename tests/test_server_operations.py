"""`omni serve` as its users run it: one API process, the LLM stage and two vision-encoder
replicas as separate supervised processes, driven over HTTP with the official `openai` client.

One server (tiny Qwen2.5-VL, `--vision-replicas 2`) serves every test here, in file order; the
test that kills a replica runs last. What they show:

- work reaches both vision replicas, and /metrics counts each replica's requests;
- 32 concurrent mixed requests (text, streamed text, images as data:, http and file URLs)
  answer exactly what each answers alone;
- a repeated image after different text skips the encoder (the LLM stage's encoder-output
  cache serves it: its metrics say so);
- a client that leaves mid-stream leaves no request running, no KV block held and no
  shared-memory segment held;
- every bad input gets a 4xx with OpenAI's error JSON, and /health answers after each;
- killing one vision replica (SIGKILL) fails no request: the LLM stage asks the other replica
  for the images the dead one held, every answer is what it is alone, and the supervisor
  starts the replica again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fixtures_vl import make_tiny_qwen2_5_vl, noise_image
from media_server import media_server
from PIL import Image
from server_fixtures import NO_PERCEPTION_FLAGS, free_port

from omni.cli import build_parser
from omni.commands.serve import serve_config
from omni.server.config import ServeConfig

MODEL = "tiny-vl"
TOKENS = 4
MAX_BODY = 1_000_000
HEADER = struct.Struct("<8sq")  # a segment's magic and its readers-left count
RUNNING = "omni:stage_requests_running"


def png(seed: int, width: int = 56, height: int = 56) -> bytes:
    buffer = io.BytesIO()
    noise_image(width, height, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(seed)).decode()


def image_message(
    url: str, text: str = "what is this", text_first: bool = False
) -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts[::-1] if text_first else parts}]


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, media: Path, web: str):
        self.process = process
        self.url = url
        self.media = media  # the allowed local media folder
        self.web = web  # the local HTTP media host (allowed)

    def client(self) -> openai.AsyncOpenAI:
        # No retries: a 503 must reach the test, not be hidden by a second attempt.
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stage_pids(self) -> dict[str, int]:
        """Replica id -> pid of the server's live stage processes (from /proc)."""
        pids = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self.process.pid:
                    continue
                args = (entry / "cmdline").read_bytes().split(b"\0")
                if b"--replica-id" in args:
                    pids[args[args.index(b"--replica-id") + 1].decode()] = int(entry.name)
        return pids

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))
    media = tmp_path_factory.mktemp("media")
    (media / "photo.png").write_bytes(png(7))
    port = free_port()
    with media_server(png(7)) as web:
        command = [
            sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
            "--served-model-name", MODEL, "--vision-replicas", "2",
            "--devices", "llm=cpu,vision=cpu", "--no-speech",
        *NO_PERCEPTION_FLAGS,
            "--option", "num_kv_blocks=256", "--option", "block_size=8",
            "--allowed-media-domains", "127.0.0.1", "--allowed-local-media-path", str(media),
            "--media-fetch-timeout", "3", "--max-body-bytes", str(MAX_BODY),
            "--log-level", "WARNING",
        ]  # fmt: skip
        process = subprocess.Popen(command)
        running = Server(process, f"http://127.0.0.1:{port}", media, web)
        try:
            deadline = time.monotonic() + 240
            while True:
                assert process.poll() is None, "omni serve exited early"
                assert time.monotonic() < deadline, "omni serve did not come up"
                with contextlib.suppress(httpx.TransportError):
                    if running.healthy():
                        break
                time.sleep(0.2)
            assert sorted(running.stage_pids()) == ["llm-0", "vision-0", "vision-1"]
            yield running
        finally:
            stages = running.stage_pids()
            process.send_signal(signal.SIGINT)
            code = process.wait(60)
    assert code == 0
    # Nothing the server or its stages made in /dev/shm outlives them.
    owners = {str(pid) for pid in [process.pid, *stages.values()]}
    left = [
        n for n in os.listdir("/dev/shm") if n.startswith("omni_") and n.split("_")[1] in owners
    ]
    assert left == []


async def chat(client: openai.AsyncOpenAI, messages: list[dict[str, Any]], stream: bool) -> str:
    if not stream:
        reply = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=TOKENS,
            temperature=0,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or ""
    pieces = []
    chunks = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


def test_work_reaches_both_vision_replicas(server: Server) -> None:
    async def burst() -> list[str]:
        client = server.client()
        return await asyncio.gather(
            *(chat(client, image_message(data_url(100 + k)), False) for k in range(6))
        )

    before = server.metrics()
    answers = asyncio.run(burst())
    assert all(answers)
    after = server.metrics()
    sent = {
        replica: after[f'omni:stage_requests_total{{replica="{replica}",stage="vision"}}']
        - before.get(f'omni:stage_requests_total{{replica="{replica}",stage="vision"}}', 0.0)
        for replica in ("vision-0", "vision-1")
    }
    assert sent["vision-0"] >= 1 and sent["vision-1"] >= 1, sent
    assert sum(sent.values()) == 6  # six new images, six encoder requests


def test_32_concurrent_mixed_requests_answer_as_they_do_alone(server: Server) -> None:
    texts = ["The capital of France is", "Two plus two is", "Name a colour", "Hello"]
    cases: list[tuple[list[dict[str, Any]], bool]] = []
    for k in range(32):
        kind = k % 4
        if kind == 0:
            cases.append(([{"role": "user", "content": texts[k // 4 % 4]}], False))
        elif kind == 1:
            cases.append(([{"role": "user", "content": texts[k // 4 % 4]}], True))
        elif kind == 2:
            cases.append((image_message(data_url(k // 4 % 3), f"image {k % 3}"), k % 8 == 2))
        else:
            urls = [f"{server.web}/image.png", f"file://{server.media}/photo.png", data_url(7)]
            cases.append((image_message(urls[k // 4 % 3], "describe"), False))

    async def alone() -> list[str]:
        client = server.client()
        return [await chat(client, messages, stream) for messages, stream in cases]

    async def together() -> list[str]:
        client = server.client()
        return await asyncio.gather(*(chat(client, m, s) for m, s in cases))

    expected = asyncio.run(alone())
    assert asyncio.run(together()) == expected
    # The image at the http URL, in the folder and inline is one image: one answer.
    assert expected[3] == expected[7] == expected[11]


def test_a_repeated_image_after_other_text_skips_the_encoder(server: Server) -> None:
    async def ask(text: str) -> str:
        # Text first: a different question means no prefix hit reaches the image.
        messages = image_message(data_url(900), text, text_first=True)
        return await chat(server.client(), messages, False)

    hits = "omni:llm_items_from_encoder_cache_total"
    asyncio.run(ask("first question"))
    before, hits_before = settled(server, hits)
    asyncio.run(ask("a different question"))
    # Stage counters come with heartbeats: wait for the one after the request.
    after, hits_after = settled(server, hits, until=lambda value: value > hits_before)
    assert hits_after == hits_before + 1
    vision_sent = [k for k in after if "stage_requests_total" in k and 'stage="vision"' in k]
    assert [after[k] for k in vision_sent] == [before[k] for k in vision_sent]


def settled(
    server: Server, name: str, until: Callable[[float], bool] = lambda value: True
) -> tuple[dict[str, float], float]:
    """The metrics, and `name` summed over its label sets, once that sum satisfies `until`
    and has held still across a heartbeat."""
    deadline = time.monotonic() + 30
    last = None
    while True:
        metrics = server.metrics()
        value = sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))
        if until(value) and value == last:
            return metrics, value
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        last = value
        time.sleep(1.1)


def _held_segments(pids: list[int]) -> list[str]:
    """Shared-memory segments of these processes still waiting for a reader."""
    held = []
    for name in os.listdir("/dev/shm"):
        parts = name.split("_")
        if len(parts) < 3 or not parts[1].isdigit() or int(parts[1]) not in pids:
            continue
        with contextlib.suppress(OSError), open(f"/dev/shm/{name}", "rb") as segment:
            _, readers = HEADER.unpack(segment.read(HEADER.size))
            if readers > 0:
                held.append(name)
    return held


def test_a_client_that_leaves_mid_stream_leaves_nothing_behind(server: Server) -> None:
    body = {
        "model": MODEL, "messages": image_message(data_url(31)), "max_tokens": 400,
        "temperature": 0, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    before = server.metrics()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                chunks.append(line)
            if len(chunks) == 3:
                break
    # The connection is closed: the server must abort the request and free everything.
    deadline = time.monotonic() + 20
    while True:
        metrics = server.metrics()
        idle = (
            metrics["omni:num_requests_running"] == 0
            and metrics['omni:llm_requests_running{replica="llm-0"}'] == 0
            and metrics['omni:llm_requests_waiting{replica="llm-0"}'] == 0
            and metrics['omni:kv_cache_blocks_used{replica="llm-0"}'] == 0
            and all(v == 0 for k, v in metrics.items() if k.startswith(RUNNING))
        )
        if idle:
            break
        assert time.monotonic() < deadline, {k: v for k, v in metrics.items() if "running" in k}
        time.sleep(0.25)
    aborted = 'omni:request_finished_total{finish_reason="abort"}'
    assert metrics[aborted] == before.get(aborted, 0.0) + 1
    assert metrics["omni:generation_tokens_total"] - before["omni:generation_tokens_total"] < 400
    assert _held_segments([server.process.pid, *server.stage_pids().values()]) == []


def _bad_requests(server: Server) -> list[tuple[str, bytes | dict[str, Any], int, str]]:
    """(case, body, status, words the message must hold)."""
    media = server.media
    (media / "escape.png").unlink(missing_ok=True)
    (media / "escape.png").symlink_to("/etc/hostname")

    def image(url: str) -> dict[str, Any]:
        return {"model": MODEL, "max_tokens": 2, "messages": image_message(url)}

    many = [{"type": "image_url", "image_url": {"url": data_url(1)}}] * 17
    blank = io.BytesIO()
    Image.new("L", (6000, 6000)).save(blank, format="PNG", optimize=True)
    huge = "data:image/png;base64," + base64.b64encode(blank.getvalue()).decode()
    sixteen = [{"type": "image_url", "image_url": {"url": huge}}] * 16
    return [
        (
            "nested 100,000 deep",
            b"[" * 100_000 + b"]" * 100_000,
            400,
            "nested more than 100 levels deep; the limit is 100",
        ),
        (
            "lone surrogate",
            b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "\\ud800"}]}',
            400,
            "messages[0].content is a string with a lone UTF-16 surrogate",
        ),
        (
            "sixteen 6000x6000 images",
            {"model": MODEL, "messages": [{"role": "user", "content": sixteen}]},
            400,
            "the limit is 160000000 pixels per request (max_request_pixels)",
        ),
        ("malformed JSON", b'{"model": "tiny-vl", "messages": [', 400, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, ""),
        ("messages of the wrong type", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        (
            "max_tokens of the wrong type",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"},
            400,
            "max_tokens",
        ),
        ("no messages", {"model": MODEL, "messages": []}, 400, "messages is empty"),
        (
            "bad role",
            {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
            400,
            "role",
        ),
        (
            "unknown model",
            {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
            404,
            "does not exist",
        ),
        (
            "unknown part type",
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video_url"}]}]},
            400,
            "'video_url' is not supported",
        ),
        (
            "too many items",
            {"model": MODEL, "messages": [{"role": "user", "content": many}]},
            400,
            "17 media items; the limit is 16",
        ),
        ("oversized body", b'{"x": "' + b"a" * MAX_BODY + b'"}', 413, "the limit is 1000000"),
        (
            "context too long",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
            400,
            "maximum context length",
        ),
        ("not a URL", image("not a url"), 400, "must be data:, http(s): or file: URLs"),
        ("ftp URL", image("ftp://127.0.0.1/a.png"), 400, "must be data:, http(s): or file:"),
        ("bad base64", image("data:image/png;base64,@@@@"), 400, "base64 data is invalid"),
        ("text data URL", image("data:text/plain;base64,aGk="), 400, "only image/* and audio/*"),
        ("not an image", image("data:image/png;base64,aGVsbG8="), 400, "messages[0].content[0]"),
        ("disallowed domain", image("http://example.com/cat.png"), 400, "not among the allowed"),
        ("redirect", image(f"{server.web}/redirect"), 400, "redirects are not followed"),
        ("missing remote", image(f"{server.web}/missing"), 400, "HTTP 404"),
        ("too big remote", image(f"{server.web}/big-declared"), 400, "the limit is"),
        ("path outside", image("file:///etc/hostname"), 400, "outside the allowed media folder"),
        ("dotdot", image(f"file://{media}/../x.png"), 400, "outside the allowed media folder"),
        ("symlink out", image(f"file://{media}/escape.png"), 400, "outside the allowed media"),
    ]


def test_every_bad_input_gets_a_4xx_and_health_answers_after(server: Server) -> None:
    for case, body, status, words in _bad_requests(server):
        if isinstance(body, bytes):
            reply = httpx.post(
                f"{server.url}/v1/chat/completions",
                content=body,
                headers={"content-type": "application/json"},
                timeout=30,
            )
        else:
            reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == status, (case, reply.text)
        error = reply.json()["error"]
        assert words in error["message"], (case, error)
        assert error["type"] and set(error) == {"message", "type", "param", "code"}, case
        assert server.healthy(), case


def test_killing_one_vision_replica_fails_no_request(server: Server) -> None:
    pids = server.stage_pids()
    victim = pids["vision-1"]
    key = 'omni:stage_requests_running{replica="vision-1",stage="vision"}'

    async def load() -> list[str | openai.APIStatusError]:
        client = server.client()

        async def one(seed: int) -> str | openai.APIStatusError:
            try:
                return await chat(client, image_message(data_url(seed), "and this?"), False)
            except openai.APIStatusError as exc:
                return exc

        tasks = [asyncio.ensure_future(one(500 + k)) for k in range(8)]
        # Frozen, vision-1 keeps what it is sent; kill it once it holds a request (well
        # within the heartbeat timeout, so the kill, not silence, is what the router sees).
        deadline = time.monotonic() + 30
        while server.metrics().get(key, 0.0) < 1:
            assert time.monotonic() < deadline, "vision-1 was never sent a request"
            await asyncio.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        return list(await asyncio.gather(*tasks))

    os.kill(victim, signal.SIGSTOP)
    try:
        results = asyncio.run(load())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    failed = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert failed == []

    # The supervisor starts vision-1 again; the rest answered as each answers alone.
    deadline = time.monotonic() + 120
    while server.stage_pids().get("vision-1") in (None, victim) or (
        server.metrics().get(key) is None
    ):
        assert time.monotonic() < deadline, "vision-1 was not restarted"
        time.sleep(0.2)
    assert server.metrics()["omni:stage_restarts_total"] == 1

    async def alone() -> list[str]:
        client = server.client()
        return [await chat(client, image_message(data_url(500 + k), "and this?"), False)
                for k in range(8)]  # fmt: skip

    assert results == asyncio.run(alone())


def test_scaling_flags_and_their_config_file_keys(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "vision-replicas: 3\naudio_replicas: 2\nspeech-replicas: 2\nimage-replicas: 2\n"
        "encoder-cache-mib: 64\nallowed-media-domains: [Images.Example.com]\n"
        "allowed-local-media-path: /srv/media\n"
    )
    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--vision-replicas", "2", "--llm-replicas", "2",
         "--allowed-media-domains", "a.com,b.org", "--devices", "vision=0,llm=1"]
    )  # fmt: skip
    config = serve_config(args)
    assert (config.llm_replicas, config.vision_replicas, config.audio_replicas) == (2, 2, 2)
    assert (config.image_replicas, config.speech_replicas, config.encoder_cache_mib) == (2, 2, 64)
    assert config.allowed_media_domains == ("a.com", "b.org")
    assert config.allowed_local_media_path == "/srv/media"
    assert config.devices == {"vision": ("cuda:0",), "llm": ("cuda:1",)}
    assert config.replicas("vision") == 2
    with pytest.raises(ValueError, match="vision_replicas is 0: a role with no local replica "
                       "is served by stages on other hosts, which need --stage-endpoint"):
        ServeConfig(vision_replicas=0)
    with pytest.raises(ValueError, match="vision_replicas is -1; it must be >= 0"):
        ServeConfig(vision_replicas=-1)
    with pytest.raises(ValueError, match="must be a host name"):
        ServeConfig(allowed_media_domains=("https://a.com",))
    assert json.dumps(ServeConfig().allowed_media_domains) == "[]"  # off by default
