"""Hand one 18 MB bf16 tensor from one process to another, five ways, and compare to memcpy.

The tensor is 2520 x 3584 bfloat16: one document page of Qwen2.5-VL-7B vision embeddings.
Each method is timed one-way: the producer reads the monotonic clock (shared by all processes
on a host) just before it starts the handoff, the consumer reads it once it holds a usable
tensor, then acknowledges so that handoffs never overlap. Reported: the median and the best
of the timed iterations, after warm-up, each against the same statistic of a memcpy.

    python3 benchmarks/transport.py [--iterations 30] [--warmup 5]

Methods:
  shared memory (pool)        SharedTensorPool.put into a reused, pre-faulted segment; the
                              handle goes over ZeroMQ ipc; the consumer maps it (cached) and
                              gets a tensor over the mapping; release returns it to the pool.
  shared memory (in place)    the producer wrote the page straight into pooled shared memory
                              (SharedTensorPool.allocate, as a stage can for its outputs), so
                              only the handle moves; the write itself is not timed.
  shared memory (fresh)       the pool method with a brand-new segment every time, to show what page
                              faults on first touch cost (the reason the pool exists).
  zmq ipc zero-copy           the stage codec: tensor bytes as a separate frame, copy=False.
  zmq tcp 127.0.0.1           the same codec over loopback TCP.
  pickle over zmq ipc         pickle.dumps / pickle.loads, the baseline (never used by omni).

The TCP path to a stage on another host (`omni serve --stage-endpoint`), between two processes
that share nothing (no shared memory; only the TCP connection):
  stage tcp + CURVE           the router's socket (BoundRouter, CURVE keys, allow-list) and a
                              stage's DEALER (connect_dealer with its keys) exchange HELLO and
                              WELCOME; the WELCOME offers the sealed bulk channel (its session
                              key inside CURVE), which the stage opens. The page then goes as
                              the stage codec's frames through SealedPeers: AES-256-GCM sealed
                              on that channel, a ticket on the CURVE socket, decoded to a tensor
                              by the stage (omni.transport.sealed).
  stage tcp, no keys          the same with --insecure-stage-endpoint (no encryption).
  plain tcp socket            the floor: the same bytes with socket.sendall into a receiver's
                              recv_into a reused buffer, then torch.frombuffer.
Goal: the stage's TCP path within 1.3x of the plain socket (medians).

    python3 benchmarks/transport.py --methods stage-tcp-curve stage-tcp socket-tcp
"""

from __future__ import annotations

import argparse
import os
import pickle  # the baseline only; tests/test_no_pickle.py allows this one file
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import torch
import zmq
from omni.transport.messages import Hello, StageReply, Welcome, stage_codec
from omni.transport.sealed import (
    CHUNK_BYTES,
    TAG_BYTES,
    BulkListener,
    BulkOffer,
    Frame,
    RecordCipher,
    SealedChannel,
    recv_exactly,
)
from omni.transport.sealed_peers import SealedPeers
from omni.transport.shm import SharedTensorHandle, SharedTensorPool, SharedTensorReader
from omni.transport.sockets import (
    BoundRouter,
    CurveKeys,
    SocketOptions,
    connect_dealer,
    generate_curve_keypair,
)

ROWS, COLS = 2520, 3584
PREFIX = "omnibench_"
METHODS = (
    "shm-pool", "shm-inplace", "shm-fresh", "zmq-ipc", "zmq-tcp", "pickle",
    "stage-tcp-curve", "stage-tcp", "socket-tcp",
)  # fmt: skip
# The methods of the TCP path to another host, each its own kind of connection.
TCP_PATH = ("stage-tcp-curve", "stage-tcp", "socket-tcp")
LABELS = {
    "shm-pool": "shared memory (pool)",
    "shm-inplace": "shared memory (in place)",
    "shm-fresh": "shared memory (fresh)",
    "zmq-ipc": "zmq ipc zero-copy",
    "zmq-tcp": "zmq tcp 127.0.0.1",
    "pickle": "pickle over zmq ipc",
    "stage-tcp-curve": "stage tcp + CURVE",
    "stage-tcp": "stage tcp, no keys",
    "socket-tcp": "plain tcp socket",
}
_LENGTH = struct.Struct("!Q")


class Ack(msgspec.Struct):
    received_at: float
    checksum: float


def _page() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, COLS, generator=generator).to(torch.bfloat16)


def _memcpy_s(tensor: torch.Tensor, iterations: int, warmup: int) -> list[float]:
    """A plain single-threaded memcpy of the tensor's bytes into a warm buffer."""
    source = tensor.view(-1).view(torch.uint8).numpy()
    target = np.empty_like(source)
    times = []
    for index in range(warmup + iterations):
        start = time.perf_counter()
        np.copyto(target, source)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _cipher_s(
    tensor: torch.Tensor, iterations: int, warmup: int
) -> tuple[list[float], list[float]]:
    """The sealed channel's cipher alone, one core: (sealing, opening) the page record by
    record, as its sender and receiver threads do."""
    sealer = RecordCipher(bytes(32), b"\x00\x00\x00\x01")
    opener = RecordCipher(bytes(32), b"\x00\x00\x00\x01")
    page = tensor_bytes(tensor)
    target = memoryview(np.empty(page.nbytes, dtype=np.uint8))  # type: ignore[arg-type]
    records = [
        memoryview(bytearray(TAG_BYTES + min(CHUNK_BYTES, page.nbytes - offset)))
        for offset in range(0, page.nbytes, CHUNK_BYTES)
    ]
    sealing, opening = [], []
    for index in range(warmup + iterations):
        start = time.perf_counter()
        for record, offset in zip(records, range(0, page.nbytes, CHUNK_BYTES), strict=True):
            sealer.seal_into(page[offset : offset + CHUNK_BYTES], b"", record)
        sealed = time.perf_counter()
        for record, offset in zip(records, range(0, page.nbytes, CHUNK_BYTES), strict=True):
            opener.open_into(record, b"", target[offset : offset + CHUNK_BYTES])
        if index >= warmup:
            sealing.append(sealed - start)
            opening.append(time.perf_counter() - sealed)
    return sealing, opening


# -- consumer process ---------------------------------------------------------------------------


def consume(method: str, endpoint: str, keys: list[str]) -> None:
    """Receive handoffs until an empty message, acknowledging each with its arrival time."""
    if method == "socket-tcp":
        consume_socket(endpoint)
        return
    if method.startswith("stage-tcp"):
        consume_stage(endpoint, keys)
        return
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.PAIR)
    sock.connect(endpoint)
    codec = stage_codec()
    reader = SharedTensorReader(prefix=PREFIX)
    handle_decoder = msgspec.msgpack.Decoder(SharedTensorHandle)
    ack = msgspec.msgpack.Encoder()
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames[0]) == 0:
            break
        handle = None
        if method.startswith("shm"):
            handle = handle_decoder.decode(frames[0].buffer)
            tensor = reader.open(handle)
        elif method == "pickle":
            tensor = pickle.loads(frames[0].buffer)
        else:
            message = codec.decode(frames)
            assert isinstance(message, StageReply)
            tensor = message.outputs["page"]
        received_at = time.perf_counter()
        # Read one element per row so a lazy mapping could not hide work from the clock.
        checksum = float(tensor[:, 0].float().sum())
        del tensor
        if handle is not None:
            reader.release(handle)
            if method == "shm-fresh":
                reader.forget_owner(int(handle.segment.split("_")[1]))
        sock.send(ack.encode(Ack(received_at=received_at, checksum=checksum)))
    reader.close()
    sock.close()


def consume_stage(endpoint: str, keys: list[str]) -> None:
    """A stage's side: its DEALER, with its CURVE keys when given (public, secret, server). It
    says HELLO as a stage does (asking for a sealed bulk channel when keyed), opens the channel
    the WELCOME offers, and takes every message through `SealedPeers` as RouterLinks does."""
    curve = CurveKeys(*keys) if keys else None
    sock = connect_dealer(zmq.Context.instance(), endpoint, curve=curve)
    codec = stage_codec()
    sealed = SealedPeers()
    hello = Hello(
        replica_id="bench", role="bench", capacity=1, pid=os.getpid(), sealed_bulk=bool(curve)
    )
    while True:
        # IMMEDIATE: sends wait for a completed (CURVE) handshake; say HELLO until heard.
        try:
            sock.send_multipart(codec.encode(hello), flags=zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.01)
            continue
        break
    welcome = codec.decode(sock.recv_multipart())
    assert isinstance(welcome, Welcome)
    if welcome.bulk_port:
        host = endpoint.removeprefix("tcp://").rpartition(":")[0]
        offer = BulkOffer(welcome.bulk_port, welcome.bulk_session, welcome.bulk_key)
        channel = SealedChannel.connect(
            host, offer, notify=sealed.notify, max_message_bytes=SocketOptions().max_message_bytes
        )
        sealed.attach(0, channel)
        if not channel.ready.wait(10) or not channel.usable:
            raise RuntimeError(f"the sealed channel did not open: {channel.reason}")
    sock.send(b"ready")
    arrivals = zmq.Poller()
    arrivals.register(sealed.fileno(), zmq.POLLIN)
    ack = msgspec.msgpack.Encoder()
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames[0]) == 0:
            break
        ready = sealed.receive(0, frames)
        while not ready:
            arrivals.poll()
            arrived, closed = sealed.poll()
            if closed:
                raise RuntimeError(f"the sealed channel closed: {closed[0][1].reason}")
            ready = [message for _, message in arrived]
        message = codec.decode(ready[0])
        assert isinstance(message, StageReply)
        tensor = message.outputs["page"]
        received_at = time.perf_counter()
        checksum = float(tensor[:, 0].float().sum())
        del tensor, message, frames, ready
        sock.send(ack.encode(Ack(received_at=received_at, checksum=checksum)))
    sealed.close()
    sock.close()


def consume_socket(endpoint: str) -> None:
    """The floor: a length, then the raw bytes into a reused buffer, as a tensor."""
    host, _, port = endpoint.rpartition(":")
    conn = socket.create_connection((host, int(port)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ack = msgspec.msgpack.Encoder()
    buffer = bytearray(ROWS * COLS * 2)
    header = bytearray(_LENGTH.size)
    while True:
        recv_exactly(conn, memoryview(header))
        (length,) = _LENGTH.unpack(header)
        if length == 0:
            break
        recv_exactly(conn, memoryview(buffer)[:length])
        tensor = torch.frombuffer(buffer, dtype=torch.bfloat16).view(ROWS, COLS)
        received_at = time.perf_counter()
        checksum = float(tensor[:, 0].float().sum())
        reply = ack.encode(Ack(received_at=received_at, checksum=checksum))
        conn.sendall(_LENGTH.pack(len(reply)) + reply)
    conn.close()


# -- producer -----------------------------------------------------------------------------------


class Producer:
    """Performs one handoff per call of `send`, by one method."""

    def __init__(self, method: str, sock: zmq.Socket) -> None:
        self.method = method
        self.sock = sock
        self.codec = stage_codec()
        self.pool = SharedTensorPool(prefix=PREFIX)
        self.handle_encoder = msgspec.msgpack.Encoder()
        self.in_place: SharedTensorHandle | None = None

    def produce(self, tensor: torch.Tensor) -> None:
        """Untimed: where a stage writes its output. Straight into the pool for shm-inplace."""
        if self.method != "shm-inplace":
            return
        allocated = self.pool.allocate(list(tensor.shape), tensor.dtype)
        assert allocated is not None
        target, self.in_place = allocated
        np.copyto(
            target.view(-1).view(torch.uint8).numpy(), tensor.view(-1).view(torch.uint8).numpy()
        )

    def send(self, tensor: torch.Tensor) -> Callable[[], None]:
        """Timed: hand `tensor` over; returns what to clean up once the consumer acknowledged."""
        method, sock = self.method, self.sock
        if method == "shm-pool":
            handle = self.pool.put(tensor)
            assert handle is not None
            sock.send(self.handle_encoder.encode(handle), copy=False)
        elif method == "shm-inplace":
            assert self.in_place is not None
            sock.send(self.handle_encoder.encode(self.in_place), copy=False)
        elif method == "shm-fresh":
            fresh = SharedTensorPool(prefix=PREFIX)
            handle = fresh.put(tensor)
            assert handle is not None
            sock.send(self.handle_encoder.encode(handle), copy=False)
            return fresh.close
        elif method == "pickle":
            sock.send(pickle.dumps(tensor, protocol=pickle.HIGHEST_PROTOCOL), copy=False)
        else:
            message = StageReply(request_id="page", outputs={"page": tensor})
            sock.send_multipart(self.codec.encode(message), copy=False)
        return lambda: None


class StageLink:
    """The router's side of the stage TCP path: one BoundRouter, one stage behind it, and with
    keys the sealed bulk listener and `SealedPeers`, as StageRouter sets them up."""

    def __init__(self, curve: bool) -> None:
        self.keys: list[str] = []
        server_keys = None
        if curve:
            server_public, server_secret = generate_curve_keypair()
            client_public, client_secret = generate_curve_keypair()
            server_keys = CurveKeys(
                server_public, server_secret, authorized_clients=(client_public,)
            )
            self.keys = [client_public, client_secret, server_public]
        self.bound = BoundRouter(
            zmq.Context.instance(), "tcp://127.0.0.1:0", curve=server_keys, allow_tcp=True
        )
        self.endpoint = self.bound.endpoint
        self.sealed = SealedPeers()
        self.listener = (
            BulkListener(
                "127.0.0.1",
                self.sealed.adopt,
                self.sealed.notify,
                max_message_bytes=SocketOptions().max_message_bytes,
            )
            if curve
            else None
        )
        self.codec = stage_codec()
        self.identity = b""

    def connected(self) -> None:
        """HELLO -> WELCOME (with the sealed channel's offer), then the stage's "ready"."""
        identity, *frames = self.bound.socket.recv_multipart()
        self.identity = identity
        hello = self.codec.decode(frames)
        assert isinstance(hello, Hello)
        offer = self.listener.offer(identity) if self.listener and hello.sealed_bulk else None
        welcome = Welcome(
            replica_id=hello.replica_id,
            heartbeat_interval_s=1.0,
            heartbeat_timeout_s=5.0,
            bulk_port=offer.port if offer else 0,
            bulk_session=offer.session_id if offer else b"",
            bulk_key=offer.key if offer else b"",
        )
        self.bound.socket.send_multipart([identity, *self.codec.encode(welcome)])
        assert self.bound.socket.recv_multipart()[1] == b"ready"
        deadline = time.monotonic() + 10
        while offer is not None and self.sealed.channel(identity) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the stage never opened its sealed channel")
            self.sealed.poll()
            time.sleep(0.001)

    def _send_control(self, frames: Sequence[Frame]) -> str:
        self.bound.socket.send_multipart([self.identity, *frames], copy=False)
        return "sent"

    def send(self, tensor: torch.Tensor) -> None:
        message = StageReply(request_id="page", outputs={"page": tensor})
        self.sealed.send(self.identity, self.codec.encode(message), self._send_control)

    def ack(self) -> bytes:
        return bytes(self.bound.socket.recv_multipart()[1])

    def close(self) -> None:
        self.bound.socket.send_multipart([self.identity, b""])
        time.sleep(0.1)
        self.sealed.close()
        if self.listener is not None:
            self.listener.close()
        self.bound.close()


class SocketLink:
    """The floor: one plain TCP connection."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.conn: socket.socket | None = None

    def connected(self) -> None:
        self.conn, _ = self.listener.accept()
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, tensor: torch.Tensor) -> None:
        assert self.conn is not None
        data = tensor_bytes(tensor)
        self.conn.sendall(_LENGTH.pack(data.nbytes))
        self.conn.sendall(data)

    def ack(self) -> bytes:
        assert self.conn is not None
        header = bytearray(_LENGTH.size)
        recv_exactly(self.conn, memoryview(header))
        reply = bytearray(_LENGTH.unpack(header)[0])
        recv_exactly(self.conn, memoryview(reply))
        return bytes(reply)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.sendall(_LENGTH.pack(0))
            self.conn.close()
        self.listener.close()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def run_tcp_path(method: str, tensor: torch.Tensor, iterations: int, warmup: int) -> list[float]:
    """One of TCP_PATH: the page one way per iteration, the consumer another process."""
    link: StageLink | SocketLink = (
        SocketLink() if method == "socket-tcp" else StageLink(curve=method == "stage-tcp-curve")
    )
    consumer = subprocess.Popen(
        [sys.executable, __file__, "--consume", method, link.endpoint, *link.keys]
    )
    ack_decoder = msgspec.msgpack.Decoder(Ack)
    expected = float(tensor[:, 0].float().sum())
    times = []
    try:
        link.connected()
        for index in range(warmup + iterations):
            started = time.perf_counter()
            link.send(tensor)
            ack = ack_decoder.decode(link.ack())
            if ack.checksum != expected:
                raise RuntimeError(f"{method}: the consumer saw different data")
            if index >= warmup:
                times.append(ack.received_at - started)
        link.close()
        consumer.wait(timeout=60)
    finally:
        consumer.kill()
    return times


def run_method(
    method: str, tensor: torch.Tensor, iterations: int, warmup: int, folder: str
) -> list[float]:
    if method in TCP_PATH:
        return run_tcp_path(method, tensor, iterations, warmup)
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.PAIR)
    if method == "zmq-tcp":
        sock.bind("tcp://127.0.0.1:*")
    else:
        sock.bind(f"ipc://{folder}/{method}.sock")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    consumer = subprocess.Popen([sys.executable, __file__, "--consume", method, endpoint])
    ack_decoder = msgspec.msgpack.Decoder(Ack)
    expected = float(tensor[:, 0].float().sum())
    producer = Producer(method, sock)
    times = []
    try:
        for index in range(warmup + iterations):
            producer.produce(tensor)
            started = time.perf_counter()
            cleanup = producer.send(tensor)
            ack = ack_decoder.decode(sock.recv())
            cleanup()
            if ack.checksum != expected:
                raise RuntimeError(f"{method}: the consumer saw different data")
            if index >= warmup:
                times.append(ack.received_at - started)
        sock.send(b"")
        consumer.wait(timeout=60)
    finally:
        consumer.kill()
        producer.pool.close()
        sock.close(linger=0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--consume", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        consume(args.consume[0], args.consume[1], args.consume[2:])
        return
    tensor = _page()
    nbytes = tensor.numel() * tensor.element_size()
    samples = {"memcpy": _memcpy_s(tensor, args.iterations, args.warmup)}
    with tempfile.TemporaryDirectory(prefix="omnibench", dir="/tmp") as folder:
        for method in args.methods:
            samples[method] = run_method(method, tensor, args.iterations, args.warmup, folder)
    # The median is what a stage sees; the best of N is the cost without interference from
    # other processes, which on a shared 2-core machine can double the median.
    median = {key: statistics.median(times) for key, times in samples.items()}
    best = {key: min(times) for key, times in samples.items()}
    print(
        f"handoff of a {ROWS}x{COLS} bfloat16 tensor ({nbytes / 1e6:.1f} MB), one-way, "
        f"{args.iterations} timed after {args.warmup} warm-up; {os.cpu_count()} CPUs"
    )
    header = ("method", "median ms", "GB/s", "x memcpy", "best ms", "x memcpy", "pickle/this")
    print(
        f"{header[0]:<26}{header[1]:>10}{header[2]:>7}{header[3]:>9}{header[4]:>9}{header[5]:>9}{header[6]:>12}"
    )
    for key in samples:
        label = "in-process memcpy" if key == "memcpy" else LABELS[key]
        vs_pickle = f"{median['pickle'] / median[key]:.1f}x" if "pickle" in median else "-"
        print(
            f"{label:<26}{median[key] * 1e3:>10.2f}{nbytes / median[key] / 1e9:>7.2f}"
            f"{median[key] / median['memcpy']:>9.2f}{best[key] * 1e3:>9.2f}"
            f"{best[key] / best['memcpy']:>9.2f}{vs_pickle:>12}"
        )
    if "shm-pool" in median:
        ratio_median = median["shm-pool"] / median["memcpy"]
        ratio_best = best["shm-pool"] / best["memcpy"]
        ratios = f"{ratio_median:.2f}x (medians), {ratio_best:.2f}x (best)"
        print(f"goal: shared memory within 2x memcpy -> {ratios}")
        if "pickle" in median:
            speedup = median["pickle"] / median["shm-pool"]
            print(f"goal: shared memory >= 3x faster than pickle -> {speedup:.1f}x (medians)")
    if "stage-tcp-curve" in median:
        sealing, opening = _cipher_s(tensor, args.iterations, args.warmup)
        print(
            f"AES-256-GCM alone, one core: sealing {statistics.median(sealing) * 1e3:.2f} ms, "
            f"opening {statistics.median(opening) * 1e3:.2f} ms (medians)"
        )
    if "socket-tcp" in median:
        for key in ("stage-tcp-curve", "stage-tcp"):
            if key in median:
                print(
                    f"goal: {LABELS[key]} within 1.3x the plain tcp socket -> "
                    f"{median[key] / median['socket-tcp']:.2f}x (medians), "
                    f"{best[key] / best['socket-tcp']:.2f}x (best)"
                )


if __name__ == "__main__":
    main()
