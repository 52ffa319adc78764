"""The runtime and router features for stage-to-stage traffic: a step's replies leave a replica
as one message, and a replica asks another role for work (a peer call) through the router,
hearing its replies, its loss, or nothing more once it withdraws the call."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import pytest
import torch
import zmq
from omni.stages.contracts import Contract, Empty
from omni.stages.contracts.echo import CONTRACT as ECHO
from omni.stages.contracts.echo import EchoParams, EchoReply
from omni.stages.runtime import (
    StageConfig,
    StageOutput,
    StageRuntime,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)
from omni.stages.runtime.testing import EchoWorker
from omni.stages.runtime.worker import PeerCall, PeerReply
from omni.transport.messages import (
    Goodbye,
    Heartbeat,
    Hello,
    PeerRequest,
    StageReplies,
    StageReply,
    StageRequest,
    Welcome,
    stage_codec,
)
from stage_helpers import FAST, SHM_PREFIX, echo_runtime, ipc_endpoint, our_segments, running_router

from omni.supervision.router import StageRouter
from omni.supervision.streams import Reply

# -- a worker that answers a batch of requests in one step ----------------------------------


class Placed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch_size: int
    position: int


BATCH = Contract("test-batch", Empty, Placed, Empty)


@register_worker("test-batch")
class BatchWorker(StageWorker):
    """Holds requests until `size` have come, then answers them all in one step: `x * 10`."""

    size = 3

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self._queued: list[WorkerRequest] = []
        self.steps = 0

    def add_request(self, request: WorkerRequest) -> None:
        self._queued.append(request)

    def has_work(self) -> bool:
        return len(self._queued) >= self.size

    def step(self) -> list[StageOutput]:
        self.steps += 1
        batch, self._queued = self._queued, []
        return [
            StageOutput(
                request.request_id,
                tensors={"y": request.inputs["x"] * 10},
                reply=Placed(batch_size=len(batch), position=position),
                finished=True,
            )
            for position, request in enumerate(batch)
        ]

    def abort(self, request_id: str) -> None:
        self._queued = [r for r in self._queued if r.request_id != request_id]


def _runtime(endpoint: str, role: str, worker: StageWorker, replica_id: str) -> StageRuntime:
    config = StageConfig(
        role=role,
        connect=endpoint,
        heartbeat_interval_s=0.05,
        server_timeout_s=1.0,
        shm_prefix=SHM_PREFIX,
        shm_threshold_bytes=4096,
        replica_id=replica_id,
    )
    return StageRuntime(config, worker)


@contextmanager
def _started(*runtimes: StageRuntime) -> Iterator[None]:
    for runtime in runtimes:
        runtime.start()
    try:
        yield
    finally:
        for runtime in runtimes:
            runtime.stop()
        for runtime in runtimes:
            assert runtime.join(10)


def test_a_steps_replies_leave_as_one_message() -> None:
    """Seen on the wire, by a bare ROUTER standing in for the orchestrator."""
    codec = stage_codec()
    with ipc_endpoint() as endpoint:
        router: zmq.Socket = zmq.Context.instance().socket(zmq.ROUTER)
        router.bind(endpoint)
        worker = BatchWorker(WorkerOptions())
        try:
            with _started(_runtime(endpoint, "test-batch", worker, "batch-0")):
                identity, *frames = router.recv_multipart()
                assert isinstance(codec.decode(frames), Hello)
                welcome = Welcome(
                    replica_id="batch-0", heartbeat_interval_s=5, heartbeat_timeout_s=9
                )
                router.send_multipart([identity, *codec.encode(welcome)])
                for i in range(3):
                    request = StageRequest(request_id=f"r{i}", inputs={"x": torch.tensor([i])})
                    router.send_multipart([identity, *codec.encode(request)])
                messages = []
                deadline = time.monotonic() + 1.0  # long enough for any stray second message
                while time.monotonic() < deadline:
                    if router.poll(50):
                        message = codec.decode(router.recv_multipart()[1:])
                        if not isinstance(message, Heartbeat):
                            messages.append(message)
        finally:
            router.close(linger=0)
    assert worker.steps == 1
    [message] = messages
    assert isinstance(message, StageReplies)
    assert [(r.request_id, r.outputs["y"].tolist(), r.finished) for r in message.replies] == [
        ("r0", [0], True),
        ("r1", [10], True),
        ("r2", [20], True),
    ]
    assert [BATCH.decode_reply(r.body) for r in message.replies] == [
        Placed(batch_size=3, position=0),
        Placed(batch_size=3, position=1),
        Placed(batch_size=3, position=2),
    ]


def test_the_router_hands_each_reply_of_one_message_to_its_own_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        received: list[str] = []
        state = router._state
        handle = state.handle

        def counting(identity: bytes, message: msgspec.Struct) -> None:
            if not isinstance(message, Heartbeat | Hello):
                received.append(type(message).__name__)
            handle(identity, message)

        monkeypatch.setattr(state, "handle", counting)
        worker = BatchWorker(WorkerOptions())
        with _started(_runtime(endpoint, "test-batch", worker, "batch-0")):
            assert router.wait_for_replicas("test-batch", 1, timeout=10)
            streams = [
                router.submit("test-batch", {"x": torch.tensor([i, -i])}, request_id=f"r{i}")
                for i in (1, 2, 3)
            ]
            replies = [stream.result(timeout=10) for stream in streams]
            assert received == ["StageReplies"]  # the three replies came as one message
    assert [
        (r.request_id, r.tensors["y"].tolist(), BATCH.decode_reply(r.body), r.finished)
        for [r] in replies
    ] == [
        ("r1", [10, -10], Placed(3, 0), True),
        ("r2", [20, -20], Placed(3, 1), True),
        ("r3", [30, -30], Placed(3, 2), True),
    ]


# -- a worker that asks the echo stage ------------------------------------------------------


class Asked(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the echo stage said: the chunks it sent and its model; or how the call failed."""

    echo_chunks: list[int]
    echo_model: str = ""
    error: str = ""
    lost: bool = False


ASKER = Contract("test-asker", EchoParams, Asked, Empty)


@register_worker("test-asker")
class AskerWorker(StageWorker):
    """For each request, a peer call to "echo" with the request's tensors and body; answers its
    caller once the echo's last reply comes, with the echo's tensors plus 1000, or with the
    call's failure. `withdraw_after` N: withdraws the call after N echo replies and answers
    with those (0: at once, in the same breath as making it)."""

    withdraw_after: int | None = None

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self._calls: list[PeerCall] = []
        self._withdrawn: list[str] = []
        self._outputs: list[StageOutput] = []
        # Open calls: call id -> (request id, echo replies heard).
        self._open: dict[str, tuple[str, list[PeerReply]]] = {}
        # Every answer this worker was handed, in order (read by the tests).
        self.heard: list[PeerReply] = []

    def add_request(self, request: WorkerRequest) -> None:
        call_id = f"{request.request_id}/echo"
        self._calls.append(PeerCall(call_id, "echo", dict(request.inputs), request.body))
        if self.withdraw_after == 0:  # changed its mind before the runtime sent the call
            self._withdrawn.append(call_id)
            self._outputs.append(StageOutput(request.request_id, reply=Asked([]), finished=True))
            return
        self._open[call_id] = (request.request_id, [])

    def take_peer_calls(self) -> tuple[list[PeerCall], list[str]]:
        calls, self._calls = self._calls, []
        withdrawn, self._withdrawn = self._withdrawn, []
        return calls, withdrawn

    def on_peer_reply(self, reply: PeerReply) -> None:
        self.heard.append(reply)
        request_id, replies = self._open[reply.request_id]
        chunks = [ECHO.decode_reply(r.body).chunk for r in replies]
        if reply.error is not None:
            del self._open[reply.request_id]
            asked = Asked(chunks, error=reply.error, lost=reply.lost)
            self._outputs.append(StageOutput(request_id, reply=asked, finished=True))
            return
        replies.append(reply)
        enough = self.withdraw_after is not None and len(replies) >= self.withdraw_after
        if not (reply.finished or enough):
            return
        if not reply.finished:
            self._withdrawn.append(reply.request_id)
        del self._open[reply.request_id]
        last = ECHO.decode_reply(reply.body)
        asked = Asked([*chunks, last.chunk], echo_model=last.model)
        tensors = {name: tensor + 1000 for name, tensor in reply.tensors.items()}
        self._outputs.append(StageOutput(request_id, tensors, asked, finished=True))

    def has_work(self) -> bool:
        return bool(self._outputs)

    def step(self) -> list[StageOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs

    def abort(self, request_id: str) -> None:
        for call_id, (asking, _) in list(self._open.items()):
            if asking == request_id:
                del self._open[call_id]
                self._withdrawn.append(call_id)


def _asker(endpoint: str) -> tuple[StageRuntime, AskerWorker]:
    worker = AskerWorker(WorkerOptions(model="asker"))
    return _runtime(endpoint, "test-asker", worker, "asker-0"), worker


def _ask(router: StageRouter, tensors: dict[str, torch.Tensor], params: EchoParams) -> Reply:
    [reply] = router.submit("test-asker", tensors, ASKER.encode(params)).result(timeout=10)
    return reply


def test_a_peer_call_is_answered_through_the_router() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        asker, worker = _asker(endpoint)
        echo = echo_runtime(endpoint)
        with _started(asker, echo):
            assert router.wait_for_replicas("test-asker", 1, timeout=10)
            assert router.wait_for_replicas("echo", 1, timeout=10)
            small = torch.tensor([1, 2, 3], dtype=torch.int32)
            # 8 KiB: the echo's reply goes through shared memory, relayed as a handle.
            big = torch.arange(2048, dtype=torch.float32)
            reply = _ask(router, {"small": small, "big": big}, EchoParams(chunks=2))
            assert reply.tensors["small"].tolist() == [1003, 1005, 1007]
            assert torch.equal(reply.tensors["big"], big * 2 + 1 + 1000)
            assert ASKER.decode_reply(reply.body) == Asked([0, 1], echo_model="tiny")
            assert [(h.request_id, h.finished, h.error) for h in worker.heard] == [
                (f"{reply.request_id}/echo", False, None),
                (f"{reply.request_id}/echo", True, None),
            ]
            assert [ECHO.decode_reply(h.body) for h in worker.heard] == [
                EchoReply(chunk=0, device="cpu", model="tiny"),
                EchoReply(chunk=1, device="cpu", model="tiny"),
            ]
            # The echo stage's refusal reaches the asker as a failure, not a loss.
            refused = _ask(router, {"x": torch.ones(1)}, EchoParams(fail=True))
            assert ASKER.decode_reply(refused.body) == Asked(
                [], error="RuntimeError: asked to fail at chunk 0", lost=False
            )
            assert not refused.tensors
            loads = {info.replica_id: info.load for info in router.replicas()}
            assert loads == {"asker-0": 0, "echo-0": 0}
            del reply, refused, worker.heard[:]
    assert our_segments() == []


class _FakeEcho:
    """An echo replica on a bare DEALER: it takes a request, sends one chunk, then does what
    the test says (go silent, or leave)."""

    def __init__(self, endpoint: str) -> None:
        self.codec = stage_codec()
        self.dealer: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        self.dealer.connect(endpoint)
        hello = Hello(replica_id="fake-echo-0", role="echo", capacity=1, pid=1)
        self.dealer.send_multipart(self.codec.encode(hello))
        assert isinstance(self.receive(), Welcome)

    def receive(self) -> msgspec.Struct:
        while True:
            message = self.codec.decode(self.dealer.recv_multipart())
            if not isinstance(message, Heartbeat):
                return message

    def send(self, message: msgspec.Struct) -> None:
        self.dealer.send_multipart(self.codec.encode(message))


@pytest.mark.parametrize(
    ("ending", "message"),
    [
        (
            "dies",
            r"^request r/echo failed: stage 'echo' replica fake-echo-0 \(pid 1\) stopped "
            r"responding \(no heartbeat for 0\.\d s\)$",
        ),
        ("leaves", r"^request r/echo failed: stage 'echo' replica fake-echo-0 \(pid 1\) left$"),
        ("none", r"^request r/echo waited 0\.5 s: no replica of stage 'echo' had room \(0 live\)$"),
    ],
)
def test_a_peer_call_whose_replica_is_lost_hears_so(ending: str, message: str) -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint, pending_timeout_s=0.5) as router:
        asker, worker = _asker(endpoint)
        with _started(asker):
            assert router.wait_for_replicas("test-asker", 1, timeout=10)
            fake = None if ending == "none" else _FakeEcho(endpoint)
            try:
                stream = router.submit(
                    "test-asker",
                    {"x": torch.tensor([5])},
                    ASKER.encode(EchoParams()),
                    request_id="r",
                )
                if fake is not None:
                    request = fake.receive()
                    assert isinstance(request, StageRequest) and request.request_id == "r/echo"
                    assert request.inputs["x"].tolist() == [5]
                    assert ECHO.decode_request(request.body) == EchoParams()
                    chunk = EchoReply(chunk=0, device="fake", model="fake")
                    first = StageReply(
                        request_id="r/echo",
                        outputs={"x": torch.tensor([11])},
                        body=ECHO.encode(chunk),
                    )
                    fake.send(first)
                    if ending == "leaves":
                        fake.send(Goodbye(replica_id="fake-echo-0", reason=""))
                [reply] = stream.result(timeout=10)
            finally:
                if fake is not None:
                    fake.dealer.close(linger=0)
    asked = ASKER.decode_reply(reply.body)
    assert (asked.echo_chunks, asked.lost) == ([] if ending == "none" else [0], True)
    assert re.match(message, asked.error), asked.error
    assert [h.lost for h in worker.heard] == ([True] if ending == "none" else [False, True])
    assert router.replicas("echo") == []


def test_a_withdrawn_peer_call_is_aborted_and_heard_no_more() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        asker, worker = _asker(endpoint)
        worker.withdraw_after = 2
        echo = echo_runtime(endpoint)
        assert isinstance(echo.worker, EchoWorker)
        with _started(asker, echo):
            assert router.wait_for_replicas("test-asker", 1, timeout=10)
            assert router.wait_for_replicas("echo", 1, timeout=10)
            params = EchoParams(chunks=1000, delay_s=0.01)
            reply = _ask(router, {"x": torch.tensor([7.0])}, params)
            assert ASKER.decode_reply(reply.body) == Asked([0, 1], echo_model="tiny")
            assert reply.tensors["x"].tolist() == [1015.0]
            # The Abort reaches the echo stage: it stops, and its slot is free.
            deadline = time.monotonic() + 5
            while echo.worker.stats().requests_active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert echo.worker.stats().requests_active == 0
            sent = echo.worker.stats().replies
            time.sleep(0.3)  # 30 more chunks, were the echo still at it
            assert echo.worker.stats().replies == sent < 1000
            assert [info.load for info in router.replicas("echo")] == [0]
            # The asker heard exactly the two replies it waited for, nothing after.
            assert [(h.finished, h.error) for h in worker.heard] == [(False, None), (False, None)]


def test_a_call_withdrawn_before_it_was_sent_never_leaves_the_replica() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        asker, worker = _asker(endpoint)
        worker.withdraw_after = 0
        echo = echo_runtime(endpoint)
        with _started(asker, echo):
            assert router.wait_for_replicas("test-asker", 1, timeout=10)
            assert router.wait_for_replicas("echo", 1, timeout=10)
            reply = _ask(router, {"x": torch.tensor([7.0])}, EchoParams())
            assert ASKER.decode_reply(reply.body) == Asked([])
            time.sleep(0.2)  # time enough for a call that did leave to be answered
            _, sent = router.load_snapshot()
            assert sent == {("test-asker", "asker-0"): 1}  # nothing went to the echo stage
            assert worker.heard == []


def test_a_peer_call_waits_until_its_link_is_welcomed() -> None:
    """With several API processes a replica can be WELCOMEd by one router, and given work
    there, before router 0 (which carries its peer calls) has welcomed it. A router drops what
    an unknown replica sends, so a call sent then would be lost and its request would hang:
    the call must wait for router 0's WELCOME."""
    codec = stage_codec()
    with ipc_endpoint() as first, ipc_endpoint() as second, running_router(second) as router:
        bare: zmq.Socket = zmq.Context.instance().socket(zmq.ROUTER)
        bare.bind(first)
        worker = AskerWorker(WorkerOptions(model="asker"))
        config = StageConfig(
            role="test-asker",
            connect=first,
            also_connect=(second,),
            heartbeat_interval_s=0.05,
            server_timeout_s=1.0,
            shm_prefix=SHM_PREFIX,
            replica_id="asker-0",
        )
        try:
            with _started(StageRuntime(config, worker)):
                assert router.wait_for_replicas("test-asker", 1, timeout=10)
                body = ASKER.encode(EchoParams())
                stream = router.submit("test-asker", {"x": torch.tensor([5])}, body, request_id="r")
                # Router 0 has not answered: for half a second it hears only HELLOs.
                heard: list[msgspec.Struct] = []
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    if bare.poll(20):
                        identity, *frames = bare.recv_multipart()
                        heard.append(codec.decode(frames))
                assert heard and {type(m) for m in heard} == {Hello}
                # The same interval as router 1's: the replica beats at link 0's on every link.
                welcome = Welcome(replica_id="asker-0", **FAST)
                bare.send_multipart([identity, *codec.encode(welcome)])
                # Now the call comes; answer it as the router would relay an echo's reply.
                while True:
                    assert bare.poll(5000), "the peer call never came"
                    identity, *frames = bare.recv_multipart()
                    call = codec.decode(frames)
                    if isinstance(call, PeerRequest):
                        break
                assert (call.request_id, call.role) == ("r/echo", "echo")
                answer = StageReply(
                    request_id="r/echo",
                    outputs={"x": torch.tensor([11])},
                    body=ECHO.encode(EchoReply(chunk=0, device="fake", model="fake")),
                    finished=True,
                )
                bare.send_multipart([identity, *codec.encode(answer)])
                [reply] = stream.result(timeout=10)
        finally:
            bare.close(linger=0)
    assert ASKER.decode_reply(reply.body) == Asked([0], echo_model="fake")
    assert reply.tensors["x"].tolist() == [1011]
