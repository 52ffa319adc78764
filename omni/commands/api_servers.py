"""`omni serve --api-server-count N`: N API processes on one port, as vLLM's flag has it.

Parsing, templating, tokenizing and streaming answers cost the API process CPU per request; at
high concurrency one process is the bottleneck. This process binds the listening socket, makes
a folder for the routers' ipc endpoints, and starts API processes 1..N-1 as `omni serve` with
the same arguments plus the socket's descriptor, its rank and the folder. Every process accepts
on the one socket (the kernel hands each connection to one of them) and has its own router;
this one (rank 0) also supervises the stages, whose replicas join every router. When this one
stops, so do the others.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Connections the kernel queues before the processes accept them (a load test opens hundreds).
LISTEN_BACKLOG = 4096
STOP_TIMEOUT_S = 30.0


def serve_with_api_servers(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], int]
) -> int:
    """Serve with `args.api_server_count` API processes; `run` serves as one of them."""
    from omni.commands.serve import serve_config

    folder = tempfile.mkdtemp(prefix="omni-", dir="/tmp")
    try:
        args = copy.copy(args)
        args.api_server_dir = folder
        args.api_server_rank = 0
        try:
            config = serve_config(args)
        except ValueError as exc:
            print(f"omni serve: error: {exc}", file=sys.stderr)
            return 2
        try:
            listener = socket.create_server((config.host, config.port), backlog=LISTEN_BACKLOG)
        except OSError as exc:
            print(
                f"omni serve: error: cannot listen on {config.host}:{config.port}: {exc}",
                file=sys.stderr,
            )
            return 2
        with listener:
            listener.set_inheritable(True)
            args.api_server_fd = listener.fileno()
            children = [
                _start(rank, folder, listener.fileno())
                for rank in range(1, config.api_server_count)
            ]
            try:
                return run(args)
            finally:
                _stop(children)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start(rank: int, folder: str, fd: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "omni.cli", *sys.argv[1:],
        "--api-server-rank", str(rank), "--api-server-dir", folder, "--api-server-fd", str(fd),
    ]  # fmt: skip
    process = subprocess.Popen(command, pass_fds=(fd,), preexec_fn=_die_with_parent)
    logger.info("started API process %d (pid %d)", rank, process.pid)
    return process


def _die_with_parent() -> None:
    """In the child: SIGTERM when the first API process dies, however it dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("API process %d ignored SIGTERM; killing it", child.pid)
            child.kill()
            child.wait()
