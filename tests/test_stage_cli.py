"""`omni stage` joins a running server over tcp://127.0.0.1, serves, and leaves routing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq.auth
from omni.transport.sockets import CurveKeys, generate_curve_keypair, load_curve_keypair
from stage_helpers import SHM_PREFIX, running_router

from omni.cli import main
from omni.commands.stage import add_parser
from omni.supervision.streams import NoReplicaError


def test_omni_stage_joins_over_tcp_with_curve_serves_and_leaves(tmp_path: Path) -> None:
    server_public, server_secret = generate_curve_keypair()
    _, secret_file = zmq.auth.create_certificates(str(tmp_path), "stage")
    stage_public, _ = load_curve_keypair(secret_file)
    keys = CurveKeys(server_public, server_secret, authorized_clients=(stage_public,))
    # A separate process on a busy machine: allow it a full second between heartbeats.
    settings = {
        "allow_tcp": True,
        "curve": keys,
        "pending_timeout_s": 0.5,
        "heartbeat_timeout_s": 1.0,
    }
    with running_router("tcp://127.0.0.1:*", **settings) as router:
        command = [
            sys.executable, "-m", "omni.cli", "stage", "echo",
            "--connect", router.endpoint,
            "--replica-id", "remote-0",
            "--model", "tiny-echo",
            "--capacity", "2",
            "--heartbeat-interval", "0.05",
            "--shm-prefix", SHM_PREFIX,
            "--curve-server-key", server_public,
            "--curve-keys-file", secret_file,
            "--log-level", "WARNING",
        ]  # fmt: skip
        stage = subprocess.Popen(command)
        try:
            assert router.wait_for_replicas("echo", 1, timeout=60)
            [info] = router.replicas("echo")
            assert (info.replica_id, info.model, info.capacity, info.pid) == (
                "remote-0",
                "tiny-echo",
                2,
                stage.pid,
            )
            streams = [
                router.submit("echo", {"x": torch.tensor([i, -i], dtype=torch.int16)})
                for i in range(5)
            ]
            values = [stream.result(timeout=10)[0].tensors["x"].tolist() for stream in streams]
            assert values == [[1, 1], [3, -1], [5, -3], [7, -5], [9, -7]]

            stage.send_signal(signal.SIGINT)  # Ctrl-C takes the same clean path as SIGTERM
            assert stage.wait(timeout=30) == 0
            deadline = time.monotonic() + 5
            while router.replicas("echo") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert router.replicas("echo") == []
            assert router.counters.replicas_lost == 1
            with pytest.raises(
                NoReplicaError, match="no replica of stage 'echo' had room \\(0 live\\)"
            ):
                router.submit("echo", {"x": torch.ones(1)}).result(timeout=5)
        finally:
            stage.kill()
            stage.wait()


def test_bad_configuration_exits_with_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "nosuchrole", "--connect", "ipc:///tmp/omni-none.sock"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(
        "omni stage: error: no stage worker for role 'nosuchrole'; known roles: ["
    )
    assert "'echo'" in error and error.count("\n") == 1
    assert main(["stage", "echo", "--connect", "udp://x:1"]) == 2
    assert "scheme must be ipc, inproc or tcp" in capsys.readouterr().err
    assert main(["stage", "echo", "--connect", "ipc:///tmp/omni-none.sock",
                 "--tensor-parallel-size", "2"]) == 2
    assert capsys.readouterr().err == (
        "omni stage: error: --tensor-parallel-size applies to the llm role only, not 'echo'\n"
    )


def test_stage_command_registers_its_subcommand() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["stage", "llm", "--connect", "tcp://head:7000", "--device", "cuda:1"])
    assert (args.role, args.connect, args.device, args.capacity) == (
        "llm",
        "tcp://head:7000",
        "cuda:1",
        8,
    )
    assert args.func.__name__ == "run"
