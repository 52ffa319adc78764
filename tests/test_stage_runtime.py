"""The stage runtime and the router, in one process: routing, streaming, errors, liveness."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest
import torch
import zmq
from omni.stages.contracts.echo import CONTRACT as ECHO
from omni.stages.contracts.echo import EchoParams, EchoReply
from omni.stages.runtime import (
    StageConfig,
    StageOutput,
    StageRuntime,
    StreamingStageWorker,
    WorkerOptions,
    WorkerRequest,
)
from omni.transport.messages import (
    Abort,
    Hello,
    StageError,
    StageReply,
    StageRequest,
    Welcome,
    stage_codec,
)
from omni.transport.shm import SharedTensorPool
from stage_helpers import SHM_PREFIX, echo_runtime, ipc_endpoint, our_segments, running_router

from omni.supervision.streams import (
    NoReplicaError,
    ReplicaLostError,
    StageRequestError,
)


def test_echo_streams_exact_tensors_inline_and_through_shared_memory() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        runtime = echo_runtime(endpoint).start()
        assert router.wait_for_replicas("echo", 1, timeout=10)
        [info] = router.replicas("echo")
        assert (info.replica_id, info.device, info.model, info.capacity) == ("echo-0", "cpu", "", 8)
        assert info.shared_memory is True
        small = torch.tensor([1, 2, 3], dtype=torch.int32)
        big = torch.arange(4096, dtype=torch.float32).to(torch.bfloat16).view(64, 64)
        body = ECHO.encode(EchoParams(chunks=3))
        replies = router.submit("echo", {"small": small, "big": big}, body).result(timeout=10)
        assert [ECHO.decode_reply(r.body) for r in replies] == [
            EchoReply(chunk=chunk, device="cpu", model="tiny") for chunk in range(3)
        ]
        assert [r.finished for r in replies] == [False, False, True]
        for reply in replies:
            assert reply.replica_id == "echo-0"
            assert reply.tensors["small"].tolist() == [3, 5, 7]
            assert torch.equal(reply.tensors["big"], big * 2 + 1)
            assert set(reply.handles) == {"big"}  # 8 KiB >= 4 KiB threshold; 12 bytes inline
        del replies, reply
        gc.collect()
        runtime.stop()
        assert runtime.join(10)
        assert our_segments() == []  # the stage unlinked its pool on the way out


def test_bad_frame_is_answered_and_the_stage_keeps_serving() -> None:
    codec = stage_codec()
    with ipc_endpoint() as endpoint:
        context: zmq.Context = zmq.Context.instance()
        router = context.socket(zmq.ROUTER)
        router.bind(endpoint)
        runtime = echo_runtime(endpoint).start()
        try:
            identity, *frames = router.recv_multipart()
            hello = codec.decode(frames)
            assert isinstance(hello, Hello) and hello.role == "echo"
            welcome = Welcome(replica_id="echo-0", heartbeat_interval_s=5, heartbeat_timeout_s=10)
            router.send_multipart([identity, *codec.encode(welcome)])
            router.send_multipart([identity, b"\x10\x93garbage"])  # kind REQUEST, body not one
            router.send_multipart([identity, b"\xee"])  # an undeclared kind

            def next_reply() -> object:
                while True:
                    _, *frames = router.recv_multipart()
                    message = codec.decode(frames)
                    if not isinstance(message, Hello):
                        return message

            first, second = next_reply(), next_reply()
            assert isinstance(first, StageError) and first.request_id == ""
            assert first.message.startswith("undecodable message: bad StageRequest message")
            assert isinstance(second, StageError) and "unknown message kind 0xee" in second.message
            request = StageRequest(request_id="r1", inputs={"x": torch.tensor([10.0])})
            router.send_multipart([identity, *codec.encode(request)])
            reply = next_reply()
            assert isinstance(reply, StageReply)
            assert (reply.request_id, reply.finished, reply.outputs["x"].tolist()) == (
                "r1",
                True,
                [21.0],
            )
            assert runtime.protocol_errors == 2
        finally:
            runtime.stop()
            runtime.join(10)
            router.close(linger=0)


def test_worker_error_fails_only_that_request() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        runtime = echo_runtime(endpoint).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=10)
            with pytest.raises(
                StageRequestError,
                match=r"echo-0 .* failed request bad: RuntimeError: asked to fail",
            ) as failure:
                router.submit(
                    "echo",
                    {"x": torch.ones(1)},
                    ECHO.encode(EchoParams(fail=True)),
                    request_id="bad",
                ).result(10)
            # What an API answers its client: the stage's words alone.
            assert failure.value.stage_message == "RuntimeError: asked to fail at chunk 0"
            [reply] = router.submit("echo", {"x": torch.ones(2)}).result(10)
            assert reply.tensors["x"].tolist() == [3.0, 3.0]
        finally:
            runtime.stop()
            runtime.join(10)


def test_least_loaded_routing_and_waiting_for_room() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        runtimes = [echo_runtime(endpoint, f"echo-{i}", capacity=1).start() for i in range(2)]
        try:
            assert router.wait_for_replicas("echo", 2, timeout=10)
            slow = ECHO.encode(EchoParams(delay_s=0.3))
            streams = [router.submit("echo", {"x": torch.tensor([i])}, slow) for i in range(3)]
            time.sleep(0.1)
            loads = sorted((info.replica_id, info.load) for info in router.replicas("echo"))
            assert loads == [("echo-0", 1), ("echo-1", 1)]  # the third waits for room
            results = [stream.result(10)[0] for stream in streams]
            assert {results[0].replica_id, results[1].replica_id} == {"echo-0", "echo-1"}
            assert [r.tensors["x"].item() for r in results] == [1, 3, 5]
        finally:
            for runtime in runtimes:
                runtime.stop()
            for runtime in runtimes:
                runtime.join(10)


def test_abort_stops_the_stage_and_releases_the_slot() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        runtime = echo_runtime(endpoint, capacity=1).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=10)
            body = ECHO.encode(EchoParams(chunks=1000, delay_s=0.01))
            stream = router.submit("echo", {"x": torch.ones(1)}, body)
            first = stream.next(timeout=10)
            assert ECHO.decode_reply(first.body).chunk == 0
            stream.abort()
            [reply] = router.submit("echo", {"x": torch.zeros(1)}).result(10)
            assert reply.tensors["x"].tolist() == [1.0]
            assert router.replicas("echo")[0].load == 0
        finally:
            runtime.stop()
            runtime.join(10)


def test_silent_replica_is_dropped_and_its_request_fails_fast() -> None:
    codec = stage_codec()
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        lost: list[tuple[str, bool]] = []
        router.add_lost_listener(
            lambda info, reason, silent: lost.append((info.replica_id, silent))
        )
        dealer: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(endpoint)
        try:
            hello = Hello(replica_id="mute-0", role="mute", capacity=1, pid=1)
            dealer.send_multipart(codec.encode(hello))
            assert isinstance(codec.decode(dealer.recv_multipart()), Welcome)
            stream = router.submit("mute", {"x": torch.ones(1)}, request_id="stuck")
            assert isinstance(codec.decode(dealer.recv_multipart()), StageRequest)
            started = time.monotonic()
            with pytest.raises(
                ReplicaLostError,
                match=r"request stuck failed: stage 'mute' replica mute-0 \(pid 1\) "
                r"stopped responding \(no heartbeat for 0\.\d s\)",
            ):
                stream.result(timeout=5)
            assert time.monotonic() - started < 1.5
            assert router.replicas("mute") == []
            assert lost == [("mute-0", True)]
            assert (router.counters.replicas_lost, router.counters.requests_failed) == (1, 1)
        finally:
            dealer.close(linger=0)


def test_request_without_replica_fails_after_pending_timeout() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint, pending_timeout_s=0.3) as router:
        started = time.monotonic()
        with pytest.raises(
            NoReplicaError, match=r"waited 0\.3 s: no replica of stage 'vision' had room \(0 live\)"
        ):
            router.submit("vision", {"x": torch.ones(1)}).result(timeout=5)
        assert 0.3 <= time.monotonic() - started < 2


def test_clean_stop_fails_in_flight_requests_and_leaves_routing() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        runtime = echo_runtime(endpoint).start()
        assert router.wait_for_replicas("echo", 1, timeout=10)
        body = ECHO.encode(EchoParams(chunks=100, delay_s=0.02))
        stream = router.submit("echo", {"x": torch.ones(1)}, body, request_id="long")
        stream.next(timeout=10)
        runtime.stop("test says stop")
        expected = (
            r"request long failed: stage 'echo' replica echo-0 \(pid \d+\): "
            r"the replica shut down \(test says stop\)"
        )
        # Lost, not refused: another replica could serve it (a 503 over HTTP, not a 400).
        with pytest.raises(ReplicaLostError, match=expected):
            stream.result(timeout=5)
        assert runtime.join(10)
        deadline = time.monotonic() + 5
        while router.replicas("echo") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert router.replicas("echo") == []


def test_shared_memory_inputs_are_mapped_and_released() -> None:
    with (
        ipc_endpoint() as endpoint,
        running_router(endpoint) as router,
        SharedTensorPool(prefix=SHM_PREFIX) as pool,
    ):
        runtime = echo_runtime(endpoint).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=10)
            page = torch.arange(12, dtype=torch.int64).view(3, 4)
            handle = pool.put(page)
            assert handle is not None
            [reply] = router.submit("echo", shm_inputs={"page": handle}).result(10)
            assert reply.tensors["page"].tolist() == (page * 2 + 1).tolist()
            deadline = time.monotonic() + 5  # the stage releases once its worker drops the tensor
            while time.monotonic() < deadline:
                again = pool.put(torch.zeros(1))
                assert again is not None
                if again.segment == handle.segment:
                    break
                time.sleep(0.02)
            assert again.segment == handle.segment and again.generation == handle.generation + 1
        finally:
            runtime.stop()
            runtime.join(10)


def test_async_stream() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        runtime = echo_runtime(endpoint).start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=10)

            async def main() -> list[tuple[int, list[float]]]:
                streams = [
                    router.submit_async(
                        "echo", {"x": torch.tensor([float(i)])}, ECHO.encode(EchoParams(chunks=2))
                    )
                    for i in range(3)
                ]
                out = []
                for stream in streams:
                    async for reply in stream:
                        chunk = ECHO.decode_reply(reply.body).chunk
                        out.append((chunk, reply.tensors["x"].tolist()))
                return out

            assert asyncio.run(main()) == [
                (0, [1.0]),
                (1, [1.0]),
                (0, [3.0]),
                (1, [3.0]),
                (0, [5.0]),
                (1, [5.0]),
            ]
        finally:
            runtime.stop()
            runtime.join(10)


class _BrokenBatchWorker(StreamingStageWorker):
    def handle(self, request: WorkerRequest) -> Iterator[StageOutput]:
        yield StageOutput(request_id=request.request_id)

    def step(self) -> list[StageOutput]:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_a_failing_step_fails_held_requests_and_stops_the_stage() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        config = StageConfig(
            role="broken", connect=endpoint, heartbeat_interval_s=0.05, replica_id="broken-0"
        )
        runtime = StageRuntime(config, _BrokenBatchWorker(WorkerOptions())).start()
        assert router.wait_for_replicas("broken", 1, timeout=10)
        with pytest.raises(
            ReplicaLostError,
            match=r"request r failed: .*: the replica shut down "
            r"\(worker failed: RuntimeError: CUDA out of memory",
        ):
            router.submit("broken", request_id="r").result(timeout=5)
        assert runtime.join(10)
        assert runtime.failed is True


def test_single_process_mode_over_inproc() -> None:
    # The whole pipeline in one process: same code, an inproc:// endpoint, no shared memory.
    with running_router("inproc://omni-single-process", shared_memory=False) as router:
        runtime = echo_runtime("inproc://omni-single-process").start()
        try:
            assert router.wait_for_replicas("echo", 1, timeout=10)
            assert router.replicas("echo")[0].shared_memory is False
            big = torch.arange(8192, dtype=torch.int32)
            [reply] = router.submit("echo", {"big": big}).result(timeout=10)
            assert reply.handles == {}  # above the threshold, but shared memory is off
            assert torch.equal(reply.tensors["big"], big * 2 + 1)
        finally:
            runtime.stop()
            runtime.join(10)


def test_shared_output_of_an_aborted_request_is_freed() -> None:
    codec = stage_codec()
    with (
        ipc_endpoint() as endpoint,
        running_router(endpoint) as router,
        SharedTensorPool(prefix=SHM_PREFIX) as pool,
    ):
        dealer: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(endpoint)
        try:
            dealer.send_multipart(
                codec.encode(Hello(replica_id="fake-0", role="fake", capacity=1, pid=1))
            )
            assert isinstance(codec.decode(dealer.recv_multipart()), Welcome)
            stream = router.submit("fake", request_id="gone")
            assert isinstance(codec.decode(dealer.recv_multipart()), StageRequest)
            stream.abort()
            abort = codec.decode(dealer.recv_multipart())
            assert isinstance(abort, Abort) and abort.request_id == "gone"
            # The stage had already produced its output: a reply crosses the abort in flight.
            handle = pool.put(torch.ones(64))
            assert handle is not None
            late = StageReply(request_id="gone", shm_outputs={"x": handle}, finished=True)
            dealer.send_multipart(codec.encode(late))
            deadline = time.monotonic() + 5
            reused = None
            while time.monotonic() < deadline:
                reused = pool.put(torch.zeros(64))
                assert reused is not None
                if reused.segment == handle.segment:
                    break
                time.sleep(0.02)
            assert reused is not None and (reused.segment, reused.generation) == (handle.segment, 2)
        finally:
            dealer.close(linger=0)


def test_queue_of_waiting_requests_is_bounded() -> None:
    with ipc_endpoint() as endpoint, running_router(endpoint, max_pending=2) as router:
        waiting = [router.submit("vision", {"x": torch.ones(1)}) for _ in range(2)]
        with pytest.raises(
            NoReplicaError, match="2 requests already wait for a replica \\(the limit is 2\\)"
        ):
            router.submit("vision", {"x": torch.ones(1)}, request_id="third")
        waiting[0].abort()
        router.submit("vision", {"x": torch.ones(1)}).abort()  # room again after the abort
        with pytest.raises(ValueError, match="request id 'dup' is already in flight"):
            router.submit("audio", request_id="dup")
            router.submit("audio", request_id="dup")
