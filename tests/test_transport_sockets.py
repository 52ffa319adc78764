"""Socket limits and endpoint rules of the stage transport."""

from __future__ import annotations

import pytest
import torch
import zmq
from omni.stages.runtime.process import bind_device
from omni.transport.sockets import (
    BoundRouter,
    CurveKeys,
    SocketOptions,
    check_endpoint,
    connect_dealer,
)


def test_every_socket_gets_the_limits() -> None:
    context: zmq.Context = zmq.Context.instance()
    options = SocketOptions(max_message_bytes=4096, send_hwm=7, recv_hwm=9, linger_ms=0)
    router = BoundRouter(context, "inproc://limits", options)
    dealer = connect_dealer(context, "inproc://limits", options)
    try:
        for sock in (router.socket, dealer):
            assert sock.getsockopt(zmq.MAXMSGSIZE) == 4096
            assert (sock.getsockopt(zmq.SNDHWM), sock.getsockopt(zmq.RCVHWM)) == (7, 9)
        assert dealer.getsockopt(zmq.IMMEDIATE) == 1
    finally:
        dealer.close(linger=0)
        router.close()


def test_an_oversized_message_is_refused_not_buffered(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    context: zmq.Context = zmq.Context.instance()
    endpoint = "tcp://127.0.0.1:*"
    router = BoundRouter(
        context, endpoint, SocketOptions(max_message_bytes=2048, linger_ms=0), allow_tcp=True
    )
    big = context.socket(zmq.DEALER)
    small = context.socket(zmq.DEALER)
    try:
        big.connect(router.endpoint)
        small.connect(router.endpoint)
        big.send(b"x" * 4096)
        small.send(b"y" * 16)
        assert router.socket.poll(timeout=2000)
        _, payload = router.socket.recv_multipart()
        assert payload == b"y" * 16
        assert router.socket.poll(timeout=300) == 0  # the 4 KiB message never arrives
    finally:
        big.close(linger=0)
        small.close(linger=0)
        router.close()


def test_tcp_binding_is_opt_in_and_names_its_host() -> None:
    with pytest.raises(ValueError, match="needs tcp enabled"):
        check_endpoint("tcp://127.0.0.1:5555", binding=True)
    with pytest.raises(ValueError, match="name the interface to bind, not a wildcard"):
        check_endpoint("tcp://*:5555", binding=True, allow_tcp=True)
    with pytest.raises(ValueError, match="scheme must be ipc, inproc or tcp"):
        check_endpoint("udp://127.0.0.1:5555", binding=False)
    assert check_endpoint("tcp://10.0.0.7:5555", binding=False) == "tcp://10.0.0.7:5555"
    with pytest.raises(ValueError, match="40-character Z85"):
        CurveKeys(public_key="short", secret_key="short")
    with pytest.raises(ValueError, match="max_message_bytes is 10; the minimum is 1024"):
        SocketOptions(max_message_bytes=10)


def test_stage_device_must_exist() -> None:
    assert bind_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError, match="device cuda:3 was requested but this host has 0 CUDA"
        ):
            bind_device("cuda:3")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        bind_device("meta")
