"""CURVE on tcp://: only peers holding the right keys get a message through."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from omni.stages.contracts.echo import CONTRACT, EchoParams
from omni.transport.key_folder import key_pair_text, load_stage_keys
from omni.transport.messages import Hello, Welcome, stage_codec
from omni.transport.sockets import (
    CurveKeys,
    _start_authenticator,
    connect_dealer,
    generate_curve_keypair,
    load_server_curve_keys,
)
from stage_helpers import echo_runtime, ipc_endpoint, running_router

from omni.supervision.router import StageRouter
from omni.supervision.streams import ReplicaLostError


def _hello(dealer: zmq.Socket, replica_id: str) -> Welcome | None:
    codec = stage_codec()
    hello = Hello(replica_id=replica_id, role="vision", capacity=1, pid=1)
    # IMMEDIATE: with no completed connection the message cannot even be queued.
    with contextlib.suppress(zmq.Again):
        dealer.send_multipart(codec.encode(hello), flags=zmq.NOBLOCK)
    if dealer.poll(timeout=300):
        message = codec.decode(dealer.recv_multipart())
        assert isinstance(message, Welcome)
        return message
    return None


def _plain_dealer(endpoint: str) -> zmq.Socket:
    dealer: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    return dealer


def _wait_for(router: StageRouter, replica_id: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(info.replica_id == replica_id for info in router.replicas()):
            return True
        time.sleep(0.01)
    return False


def test_only_peers_with_the_keys_get_messages_accepted() -> None:
    server_public, server_secret = generate_curve_keypair()
    client_public, client_secret = generate_curve_keypair()
    stranger_public, stranger_secret = generate_curve_keypair()
    server_keys = CurveKeys(server_public, server_secret, authorized_clients=(client_public,))
    with running_router("tcp://127.0.0.1:*", allow_tcp=True, curve=server_keys) as router:
        endpoint = router.endpoint
        assert endpoint.startswith("tcp://127.0.0.1:")
        context: zmq.Context = zmq.Context.instance()
        peers = {
            # No CURVE at all: the handshake fails, nothing reaches the router.
            "plain": _plain_dealer(endpoint),
            # A valid keypair the server does not list.
            "stranger": connect_dealer(
                context, endpoint, curve=CurveKeys(stranger_public, stranger_secret, server_public)
            ),
            # The right client keys but the wrong idea of the server's key.
            "wrong-server": connect_dealer(
                context, endpoint, curve=CurveKeys(client_public, client_secret, stranger_public)
            ),
        }
        try:
            for name, dealer in peers.items():
                assert _hello(dealer, name) is None, name
                assert not _wait_for(router, name, 0.2), name
            good = connect_dealer(
                context, endpoint, curve=CurveKeys(client_public, client_secret, server_public)
            )
            peers["good"] = good
            welcome = None
            deadline = time.monotonic() + 5
            while welcome is None and time.monotonic() < deadline:
                welcome = _hello(good, "good")
            assert welcome is not None and welcome.replica_id == "good"
            assert [info.replica_id for info in router.replicas()] == ["good"]
            assert router.counters.protocol_errors == 0
        finally:
            for dealer in peers.values():
                dealer.close(linger=0)


def test_server_keys_load_from_certificate_files(tmp_path: Path) -> None:
    server_public_file, server_secret_file = zmq.auth.create_certificates(str(tmp_path), "server")
    (tmp_path / "stages").mkdir()
    stage_public_file, _ = zmq.auth.create_certificates(str(tmp_path / "stages"), "stage-a")
    keys = load_server_curve_keys(server_secret_file, tmp_path / "stages")
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    stage_public, _ = zmq.auth.load_certificate(stage_public_file)
    assert keys.public_key == server_public.decode("ascii")
    assert keys.authorized_clients == (stage_public.decode("ascii"),)
    with pytest.raises(ValueError, match="nothing-here is not a directory of stage certificates"):
        load_server_curve_keys(server_secret_file, tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no public certificates"):
        load_server_curve_keys(server_secret_file, tmp_path / "empty")


def test_local_stages_join_over_plain_ipc_beside_a_curve_tcp_endpoint() -> None:
    """`omni serve --stage-endpoint`: one ROUTER, ipc for its own stages (no keys, the folder's
    permissions guard it) and tcp for other hosts' stages, which must hold a listed key."""
    server_public, server_secret = generate_curve_keypair()
    client_public, client_secret = generate_curve_keypair()
    keys = CurveKeys(server_public, server_secret, authorized_clients=(client_public,))
    with ipc_endpoint() as local, running_router(
        local, remote_endpoint="tcp://127.0.0.1:0", curve=keys
    ) as router:
        assert router.endpoint == local
        remote = router.remote_endpoint
        assert remote is not None and remote.startswith("tcp://127.0.0.1:")
        plain_tcp = _plain_dealer(remote)
        try:
            assert _hello(plain_tcp, "plain-tcp") is None
        finally:
            plain_tcp.close(linger=0)
        client = CurveKeys(client_public, client_secret, server_public)
        near = echo_runtime(local, "near-0").start()
        far = echo_runtime(remote, "far-0", curve=client, shared_memory=False).start()
        try:
            assert router.wait_for_replicas("echo", 2, timeout=30)
            shared = {info.replica_id: info.shared_memory for info in router.replicas("echo")}
            assert shared == {"near-0": True, "far-0": False}
        finally:
            for runtime in (near, far):
                runtime.stop()
                runtime.join(10)


def test_a_closed_tcp_connection_fails_its_requests_before_any_heartbeat_timeout() -> None:
    """A stage on another host that dies closes its TCP connection: its requests fail at once,
    not after heartbeat_timeout_s (here a minute, so only the closed connection can tell)."""
    with running_router(
        "tcp://127.0.0.1:0", allow_tcp=True, heartbeat_timeout_s=60.0
    ) as router:
        command = [
            sys.executable, "-m", "omni.cli", "stage", "echo", "--connect", router.endpoint,
            "--replica-id", "far-0", "--log-level", "WARNING",
        ]  # fmt: skip
        stage = subprocess.Popen(command)
        try:
            assert router.wait_for_replicas("echo", 1, timeout=60)
            body = CONTRACT.encode(EchoParams(delay_s=60))
            stream = router.submit("echo", {"x": torch.ones(2)}, body)
            deadline = time.monotonic() + 30
            while not router.replicas("echo")[0].load:
                assert time.monotonic() < deadline, "the request never reached the stage"
                time.sleep(0.01)
            stage.kill()
            with pytest.raises(
                ReplicaLostError,
                match=f"far-0 \\(pid {stage.pid}\\) closed its connection \\(its process or host",
            ):
                stream.result(timeout=30)
            assert router.replicas("echo") == []
        finally:
            stage.kill()
            stage.wait()


def test_an_allow_list_that_starts_empty_grows_and_shrinks() -> None:
    """Ray placement's list: each actor's key is admitted when it starts, dropped after."""
    server_public, server_secret = generate_curve_keypair()
    client_public, client_secret = generate_curve_keypair()
    keys = CurveKeys(server_public, server_secret, allow_list=True)
    client = CurveKeys(client_public, client_secret, server_public)
    context: zmq.Context = zmq.Context.instance()
    with running_router("tcp://127.0.0.1:0", allow_tcp=True, curve=keys) as router:
        before = connect_dealer(context, router.endpoint, curve=client)
        try:
            assert _hello(before, "before") is None
        finally:
            before.close(linger=0)
        router.allow_client(client_public)
        admitted = connect_dealer(context, router.endpoint, curve=client)
        try:
            deadline = time.monotonic() + 5
            while (welcome := _hello(admitted, "admitted")) is None:
                assert time.monotonic() < deadline
            assert welcome.replica_id == "admitted"
            router.disallow_client(client_public)
            after = connect_dealer(context, router.endpoint, curve=client)
            try:
                assert _hello(after, "after") is None
            finally:
                after.close(linger=0)
            # The connection made while the key was listed stays.
            assert [info.replica_id for info in router.replicas()] == ["admitted"]
        finally:
            admitted.close(linger=0)


def test_a_stage_reads_its_key_pair_from_an_inherited_pipe() -> None:
    """How a Ray actor hands its stage the key pair without writing a secret to disk."""
    public, secret = generate_curve_keypair()
    server_public, _ = generate_curve_keypair()
    read_end, write_end = os.pipe()
    os.write(write_end, key_pair_text(public, secret).encode("ascii"))
    os.close(write_end)
    try:
        keys = load_stage_keys(server_public, f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
    assert (keys.public_key, keys.secret_key, keys.server_key) == (public, secret, server_public)


def test_a_router_waits_for_the_zap_endpoint_a_closed_one_still_holds() -> None:
    # ZeroMQ frees a closed socket's inproc endpoint asynchronously, so a router started right
    # after another closed could find `inproc://zeromq.zap.01` taken (seen once in the suite).
    import threading

    context = zmq.Context()
    blocker = context.socket(zmq.REP)
    blocker.bind("inproc://zeromq.zap.01")
    release = threading.Timer(0.2, blocker.close)
    release.start()
    try:
        authenticator = _start_authenticator(context)
        assert authenticator.is_alive()
        authenticator.stop()
    finally:
        release.join()
        context.term()
