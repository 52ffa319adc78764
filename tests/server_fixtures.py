"""Shared pieces of the server tests: a tiny chat model, a live server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fixtures_models import make_tiny_checkpoint

# Long enough that a stream can be cut off mid-answer; tiny enough to load in a second.
CONTEXT = 2048
# A small KV cache: a few MiB instead of the CPU default of 1 GiB per engine.
ENGINE_OPTIONS = {"num_kv_blocks": "512", "block_size": "16"}
MESSAGES = [{"role": "user", "content": "The capital of France is"}]


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
