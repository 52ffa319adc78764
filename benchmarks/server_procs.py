"""Process control for benchmark drivers that start servers: each server in its own process
group (stopped as a whole, descendants included), GPU memory given back before the next one,
and servers left by a killed earlier run found again by their recorded pids."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import psutil

STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", flush=True)


def spawn(
    command: list[str], log_path: Path, env: Mapping[str, str] = {}
) -> subprocess.Popen[bytes]:
    """`command` with stdout and stderr into `log_path`, as its own process group (so that
    stopping it reaches every process it started), `env` added to the environment."""
    log_path.write_text(f"$ {shlex.join(command)}\n")
    with open(log_path, "ab") as sink:  # the child keeps its own descriptor
        env = {**os.environ, **env}
        return subprocess.Popen(command, stdout=sink, stderr=sink, env=env, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM to the process group (a server stops its engine / stages), then SIGKILL to the
    group and to every descendant seen before, wherever its session is."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:  # it is gone
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log(f"pid {proc.pid} ignored SIGTERM for {grace:.0f} s; killing it")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(Exception):
            child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def kill_leftovers(work_dir: Path) -> None:
    """Kill the process groups of servers that an earlier run of this script started and did
    not stop (a device call killed at its limit leaves them running, as their own sessions);
    `work_dir/servers.pids` lists them, one pid a line."""
    pids = work_dir / "servers.pids"
    for pid in pids.read_text().split() if pids.exists() else []:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pid), signal.SIGKILL)
            log(f"killed the process group of server pid {pid}, left by an earlier run")
    pids.unlink(missing_ok=True)


def wait_gpu_free(timeout: float = 60.0) -> None:
    """Until the GPUs' memory is given back (the next server sizes its KV cache from it)."""
    if not shutil.which("nvidia-smi"):
        return
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    deadline = time.monotonic() + timeout
    used: list[int] = []
    while time.monotonic() < deadline:
        out = subprocess.run(query, capture_output=True, text=True).stdout
        used = [int(float(line)) for line in out.split() if line.strip()]
        if all(mib < 2048 for mib in used):
            return
        time.sleep(1)
    log(f"warning: GPU memory still in use after {timeout:.0f} s: {used} MiB")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])
