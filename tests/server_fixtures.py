"""Shared pieces of the server tests: a tiny chat model, a live server on a free port."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from fixtures_models import make_tiny_checkpoint

from omni.server.config import ServeConfig

# Long enough that a stream can be cut off mid-answer; tiny enough to load in a second.
CONTEXT = 2048
# A small KV cache: a few MiB instead of the CPU default of 1 GiB per engine.
ENGINE_OPTIONS = {"num_kv_blocks": "512", "block_size": "16"}
MESSAGES = [{"role": "user", "content": "The capital of France is"}]
# No OCR or speech recognition stage: servers that test other things start faster, and media
# a model does not take is refused as before (tests/test_perception_serve.py runs them).
NO_PERCEPTION = {"ocr_replicas": 0, "asr_replicas": 0}
NO_PERCEPTION_FLAGS = ["--ocr-replicas", "0", "--asr-replicas", "0"]


def media_serve_config(
    folder: Path, model_name: str, encoder_role: str, single_process: bool = True
) -> ServeConfig:
    """A tiny multi-modal checkpoint served on the CPU: the LLM stage, its encoder stage
    (`vision` or `audio`), a small KV cache, and no speech stage."""
    return ServeConfig(
        **NO_PERCEPTION,
        model=str(folder),
        served_model_name=model_name,
        single_process=single_process,
        speech=False,
        devices={"llm": ("cpu",), encoder_role: ("cpu",)},
        engine_options={"num_kv_blocks": "128", "block_size": "8"},
    )


def tiny_chat_model(folder: Path) -> Path:
    return make_tiny_checkpoint("qwen2", folder, max_position_embeddings=CONTEXT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a thread; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def metric(server: str, name: str, labels: str = "") -> float:
    """The sum of `name`'s samples on the server's /metrics (those with exactly `labels`, when
    given)."""
    text = httpx.get(f"{server}/metrics", timeout=10).text
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{[^}]*\})?")
    return sum(float(m) for m in re.findall(rf"^{pattern} (\S+)$", text, re.MULTILINE))


def wait_for_metric(server: str, name: str, target: float, timeout_s: float = 15.0) -> None:
    """Until `name` on /metrics reaches `target` (the LLM stage reports its counters with its
    heartbeats, so they arrive a moment after the answer); fails naming the last value."""
    deadline = time.monotonic() + timeout_s
    while (value := metric(server, name)) < target:
        assert time.monotonic() < deadline, f"{name} is {value}, waited for {target}"
        time.sleep(0.1)


@contextmanager
def serve_process(
    command: list[str],
    log_path: Path,
    healthy_within_s: float,
    stop_within_s: float,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`omni serve` as a user starts it (its own session, output into `log_path`): yields its
    URL once /health answers 200, then stops it with SIGINT (SIGKILL if it takes longer than
    `stop_within_s`). `command` carries `--port PORT`."""
    import os
    import signal
    import subprocess

    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            deadline = time.monotonic() + healthy_within_s
            while True:
                if process.poll() is not None:
                    log.flush()
                    raise RuntimeError(f"omni serve exited: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"omni serve did not become healthy within {healthy_within_s:.0f} s"
                    )
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(stop_within_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
