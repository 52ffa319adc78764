"""The stage runtime: one busy loop plus one I/O thread, joined by queues.

* The I/O thread owns the DEALER socket. It says HELLO until WELCOMEd, heartbeats, turns
  incoming frames into typed messages (anything undecodable is answered with an ERROR and
  dropped; the stage keeps serving), and sends the replies the busy loop hands it.
* The busy loop owns the worker. It takes requests and aborts from the inbound queue, calls
  `worker.step()` while there is work, encodes each output (large tensors into shared memory
  when the orchestrator shares this host) and passes the frames to the I/O thread over an
  inproc socket, which moves them without copying.

`start()` runs both in background threads (tests, single-process mode); `run()` runs the busy
loop in the calling thread (a stage process). `stop()` ends either cleanly: in-flight requests
are failed with a clear error, GOODBYE is sent, shared memory is unlinked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import msgspec
import torch
import zmq
from omni.stages.runtime.config import StageConfig, host_id
from omni.stages.runtime.worker import StageOutput, StageWorker, WorkerRequest
from omni.transport.codec import ProtocolError
from omni.transport.messages import (
    Abort,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    Shutdown,
    StageError,
    StageReply,
    StageRequest,
    Welcome,
    stage_codec,
)
from omni.transport.shm import SharedTensorHandle, SharedTensorPool, SharedTensorReader
from omni.transport.sockets import connect_dealer

logger = logging.getLogger(__name__)

# An empty frame on the inproc channel tells the I/O thread to flush and exit; real messages
# always start with a kind byte.
_CLOSE = b""
# How long the busy loop sleeps on an empty queue; bounds how late it notices stop().
_IDLE_WAIT_S = 0.05


class StageRuntime:
    """Runs one `StageWorker` as a replica of `config.role`, connected to the orchestrator."""

    def __init__(
        self, config: StageConfig, worker: StageWorker, context: zmq.Context | None = None
    ) -> None:
        self.config = config
        self.worker = worker
        self.replica_id = config.effective_replica_id
        self.exit_reason = ""
        self.failed = False  # the worker raised; the process should exit non-zero
        self.protocol_errors = 0
        self._context = context or zmq.Context.instance()
        self._codec = stage_codec()
        self._inbound: queue.Queue[StageRequest | Abort] = queue.Queue()
        self._stop = threading.Event()
        self._welcomed = threading.Event()
        self._io_ready = threading.Event()
        self._io_failure: BaseException | None = None
        self._shared_memory = False
        self._heartbeat_interval_s = config.heartbeat_interval_s
        self._out_endpoint = f"inproc://omni-stage-out-{id(self):x}"
        self._active: set[str] = set()
        self._pool: SharedTensorPool | None = None
        self._reader = SharedTensorReader(prefix=config.shm_prefix)
        self._io_thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> StageRuntime:
        """Load the worker and serve from background threads; returns at once."""
        self.worker.load()
        self._start_io()
        self._loop_thread = threading.Thread(
            target=self._serve, name=f"stage-{self.replica_id}", daemon=True
        )
        self._loop_thread.start()
        return self

    def run(self) -> None:
        """Load the worker and serve in this thread until `stop()`."""
        self.worker.load()
        self._start_io()
        self._serve()

    def stop(self, reason: str = "stopped") -> None:
        """Ask the runtime to shut down cleanly (safe from signal handlers and other threads)."""
        if not self._stop.is_set():
            self.exit_reason = reason
            self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a `start()`ed runtime to finish; True if it did."""
        for thread in (self._loop_thread, self._io_thread):
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    return False
        return True

    def wait_until_welcomed(self, timeout: float) -> bool:
        return self._welcomed.wait(timeout)

    @property
    def welcomed(self) -> bool:
        return self._welcomed.is_set()

    def _start_io(self) -> None:
        self._io_thread = threading.Thread(
            target=self._io_main, name=f"stage-io-{self.replica_id}", daemon=True
        )
        self._io_thread.start()
        self._io_ready.wait()
        if self._io_failure is not None:
            raise RuntimeError(f"stage {self.replica_id} could not connect: {self._io_failure}")

    # -- busy loop ----------------------------------------------------------------------------

    def _serve(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.connect(self._out_endpoint)
        try:
            while not self._stop.is_set():
                self._reader.release_deferred()  # inputs the worker has let go of
                self._take_inbound(push, block=not self.worker.has_work())
                if self.worker.has_work():
                    self._step(push)
            self._shut_down(push)
        finally:
            push.send(_CLOSE)
            push.close(linger=-1)
            if self._io_thread is not None:
                self._io_thread.join()
            self.worker.close()
            if self._pool is not None:
                self._pool.close()
            self._reader.close()

    def _step(self, push: zmq.Socket) -> None:
        try:
            outputs = self.worker.step()
        except Exception as exc:
            # A batch failed as a whole (out of memory, a kernel error): the worker's state can
            # no longer be trusted, so fail what it held, leave, and let the supervisor restart
            # a fresh process.
            logger.exception("worker step failed; the stage exits")
            self.failed = True
            self.stop(f"worker failed: {type(exc).__name__}: {exc}")
            return
        for output in outputs:
            self._send_output(push, output)

    def _take_inbound(self, push: zmq.Socket, block: bool) -> None:
        try:
            message = (
                self._inbound.get(timeout=_IDLE_WAIT_S) if block else self._inbound.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            if isinstance(message, StageRequest):
                self._admit(push, message)
            elif message.request_id in self._active:
                self.worker.abort(message.request_id)
                self._active.discard(message.request_id)
            try:
                message = self._inbound.get_nowait()
            except queue.Empty:
                return

    def _admit(self, push: zmq.Socket, request: StageRequest) -> None:
        if request.request_id in self._active:
            message = f"request id {request.request_id!r} is already active on this replica"
            self._send(push, StageError(request_id=request.request_id, message=message))
            return
        try:
            inputs = dict(request.inputs)
            for name, handle in request.shm_inputs.items():
                # Released when the worker drops the tensor, so the producer can reuse it.
                inputs[name] = self._reader.open(handle, release_on_gc=True)
            self.worker.add_request(
                WorkerRequest(request_id=request.request_id, inputs=inputs, params=request.params)
            )
        except Exception as exc:
            logger.warning("rejected request %s: %s", request.request_id, exc)
            message = f"{type(exc).__name__}: {exc}"
            self._send(push, StageError(request_id=request.request_id, message=message))
            return
        self._active.add(request.request_id)

    def _send_output(self, push: zmq.Socket, output: StageOutput) -> None:
        message: StageReply | StageError
        if output.error is not None:
            message = StageError(request_id=output.request_id, message=output.error[:4000])
        else:
            inline: dict[str, torch.Tensor] = {}
            shared: dict[str, SharedTensorHandle] = {}
            for name, tensor in output.tensors.items():
                handle = self._share(tensor)
                if handle is None:
                    inline[name] = tensor
                else:
                    shared[name] = handle
            message = StageReply(
                request_id=output.request_id,
                outputs=inline,
                shm_outputs=shared,
                data=dict(output.data),
                finished=output.finished,
            )
        if output.finished or output.error is not None:
            self._active.discard(output.request_id)
        self._send(push, message)

    def _share(self, tensor: torch.Tensor) -> SharedTensorHandle | None:
        nbytes = tensor.numel() * tensor.element_size()
        if not self._shared_memory or nbytes < self.config.shm_threshold_bytes:
            return None
        if self._pool is None:
            self._pool = SharedTensorPool(
                prefix=self.config.shm_prefix, max_bytes=self.config.shm_max_bytes
            )
        return self._pool.put(tensor)  # None when the pool is full: the tensor goes inline

    def _send(self, push: zmq.Socket, message: msgspec.Struct) -> None:
        push.send_multipart(self._codec.encode(message), copy=False)

    def _shut_down(self, push: zmq.Socket) -> None:
        reason = self.exit_reason or "stopped"
        for request_id in sorted(self._active):
            self.worker.abort(request_id)
            self._send(
                push,
                StageError(
                    request_id=request_id,
                    message=f"the replica shut down ({reason})",
                ),
            )
        self._active.clear()
        self._send(push, Goodbye(replica_id=self.replica_id, reason=reason[:1000]))

    # -- I/O thread ---------------------------------------------------------------------------

    def _io_main(self) -> None:
        try:
            dealer = connect_dealer(
                self._context, self.config.connect, self.config.sockets, self.config.curve
            )
            pull = self._context.socket(zmq.PULL)
            pull.bind(self._out_endpoint)
        except BaseException as exc:
            self._io_failure = exc
            self._io_ready.set()
            raise
        self._io_ready.set()
        try:
            self._io_loop(dealer, pull)
        except Exception as exc:
            logger.exception("stage I/O thread failed; the stage exits")
            self.failed = True
            self.stop(f"I/O failed: {type(exc).__name__}: {exc}")
            # Keep taking what the busy loop sends until its close marker, so it never blocks
            # on a socket nobody reads.
            while True:
                frames = pull.recv_multipart(copy=False)
                if len(frames) == 1 and len(frames[0]) == 0:
                    break
        finally:
            pull.close(linger=0)
            dealer.close()

    def _io_loop(self, dealer: zmq.Socket, pull: zmq.Socket) -> None:
        backlog: deque[Sequence[zmq.Frame]] = deque()
        closing = False
        last_heard = time.monotonic()
        next_beat = 0.0
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        while True:
            poller.register(dealer, zmq.POLLIN | (zmq.POLLOUT if backlog else 0))
            wait_ms = max(0.0, next_beat - time.monotonic()) * 1000
            events = dict(poller.poll(0 if closing else int(wait_ms)))
            if events.get(pull):
                while True:
                    try:
                        frames = pull.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) == 1 and len(frames[0]) == 0:
                        closing = True
                        break
                    backlog.append(frames)
            if events.get(dealer, 0) & zmq.POLLIN:
                last_heard = time.monotonic()
                self._receive(dealer)
            self._flush(dealer, backlog)
            if closing:
                # Give queued replies and the GOODBYE their chance before the socket closes.
                deadline = time.monotonic() + self.config.sockets.linger_ms / 1000
                while backlog and time.monotonic() < deadline:
                    self._flush(dealer, backlog)
                    time.sleep(0.001)
                return
            now = time.monotonic()
            if self._welcomed.is_set() and now - last_heard > self.config.server_timeout_s:
                logger.warning(
                    "no word from the orchestrator for %.1f s; saying HELLO again", now - last_heard
                )
                self._welcomed.clear()
            if now >= next_beat:
                self._beat(dealer)
                next_beat = now + self._heartbeat_interval_s
                if self.config.parent_pid is not None and os.getppid() != self.config.parent_pid:
                    self.stop("parent process exited")

    def _beat(self, dealer: zmq.Socket) -> None:
        message: Hello | Heartbeat
        if self._welcomed.is_set():
            message = Heartbeat(
                replica_id=self.replica_id, load=len(self._active), stats=self._worker_stats()
            )
        else:
            message = Hello(
                replica_id=self.replica_id,
                role=self.config.role,
                model=self.config.model,
                capacity=self.config.capacity,
                device=self.config.device,
                pid=os.getpid(),
                host_id=host_id(),
            )
        # Dropped when the orchestrator is unreachable: the next beat says it again.
        with contextlib.suppress(zmq.Again):
            dealer.send_multipart(self._codec.encode(message), flags=zmq.NOBLOCK)

    def _worker_stats(self) -> dict[str, float]:
        """The worker's numbers for this heartbeat; a failing `stats()` must not stop the
        heartbeats that keep the replica alive, so it is logged and sent empty."""
        try:
            return {name: float(value) for name, value in self.worker.stats().items()}
        except Exception:
            logger.exception("stage %s: worker stats failed", self.replica_id)
            return {}

    def _flush(self, dealer: zmq.Socket, backlog: deque[Sequence[zmq.Frame]]) -> None:
        while backlog:
            try:
                dealer.send_multipart(backlog[0], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # high-water mark reached: wait for POLLOUT
            backlog.popleft()

    def _receive(self, dealer: zmq.Socket) -> None:
        while True:
            try:
                frames = dealer.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = self._codec.decode(frames)
            except ProtocolError as exc:
                self.protocol_errors += 1
                logger.warning("dropped an undecodable message: %s", exc)
                self._reply_now(
                    dealer, StageError(request_id="", message=f"undecodable message: {exc}")
                )
                continue
            if isinstance(message, StageRequest | Abort):
                self._inbound.put(message)
            elif isinstance(message, Welcome):
                self._shared_memory = message.shared_memory
                self._heartbeat_interval_s = message.heartbeat_interval_s
                self._welcomed.set()
                logger.info(
                    "replica %s joined (shared memory: %s)", self.replica_id, message.shared_memory
                )
            elif isinstance(message, HelloRequired):
                self._welcomed.clear()
                self._beat(dealer)
            elif isinstance(message, Shutdown):
                self.stop(
                    f"orchestrator asked: {message.reason}"
                    if message.reason
                    else "orchestrator asked"
                )
            elif not isinstance(message, Heartbeat):
                self._reply_now(
                    dealer,
                    StageError(
                        request_id="", message=f"unexpected {type(message).__name__} message"
                    ),
                )

    def _reply_now(self, dealer: zmq.Socket, message: msgspec.Struct) -> None:
        with contextlib.suppress(zmq.Again):
            dealer.send_multipart(self._codec.encode(message), flags=zmq.NOBLOCK)
