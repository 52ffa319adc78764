"""The stage runtime: one busy loop plus one I/O thread, joined by queues.

* The I/O thread (`links.RouterLinks`) owns a DEALER socket per orchestrator (one per API
  process). It says HELLO until WELCOMEd, heartbeats, turns incoming frames into typed messages
  (anything undecodable is answered with an ERROR and dropped; the stage keeps serving), and
  sends what the busy loop hands it on the link each message names.
* The busy loop owns the worker. It takes requests, aborts and the answers to the worker's
  peer calls from the inbound queue, calls `worker.step()` while there is work, encodes the
  step's outputs as one message (large tensors into shared memory when the orchestrator shares
  this host) and passes the frames to the I/O thread over an inproc socket, which moves them
  without copying. The worker's peer calls (requests to other roles) leave the same way.

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
from collections.abc import Sequence

import msgspec
import torch
import zmq
from omni.stages.runtime.config import StageConfig
from omni.stages.runtime.links import ALL_LINKS, CLOSE, Inbound, RouterLinks
from omni.stages.runtime.worker import PeerReply, StageOutput, StageWorker, WorkerRequest
from omni.transport.messages import (
    Abort,
    Goodbye,
    Heartbeat,
    Hello,
    PeerRequest,
    StageError,
    StageReplies,
    StageReply,
    StageRequest,
    stage_codec,
)
from omni.transport.shm import SharedTensorHandle, SharedTensorPool, SharedTensorReader

logger = logging.getLogger(__name__)

# How long the busy loop sleeps on an empty queue; bounds how late it notices stop().
_IDLE_WAIT_S = 0.05
# The link that carries peer calls (and their answers).
_PEER_LINK = 0


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
        # A server refused this replica's CURVE key: restarting it would be refused again.
        self.refused = False
        self._context = context or zmq.Context.instance()
        self._codec = stage_codec()
        self._inbound: queue.Queue[tuple[int, Inbound]] = queue.Queue()
        self._stop = threading.Event()
        out_endpoint = f"inproc://omni-stage-out-{id(self):x}"
        self._out_endpoint = out_endpoint
        self._links = RouterLinks(
            config,
            self._context,
            out_endpoint,
            self._deliver,
            self._heartbeat,
            self._hello,
            self._fail_io,
        )
        # Requests being served, by id, with the link (API process) each came on.
        self._active: dict[str, int] = {}
        # The worker's peer calls still waiting for their last answer.
        self._peer_calls: set[str] = set()
        self._pool: SharedTensorPool | None = None
        self._reader = SharedTensorReader(prefix=config.shm_prefix)
        # The I/O thread's own, for copying peer answers out of shared memory (see _deliver).
        self._peer_reader = SharedTensorReader(prefix=config.shm_prefix)
        self._io_thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        self._loaded = False
        # When the busy loop last went round (a step done, or an idle wait over); read by the
        # I/O thread for the heartbeat's `stalled_s`.
        self._progress_at = time.monotonic()

    # -- lifecycle ----------------------------------------------------------------------------

    def load(self) -> None:
        """Load the worker (once); `start` and `run` do it if it was not done before."""
        if not self._loaded:
            self.worker.load()
            self._loaded = True

    def start(self, own_cuda_stream: bool = False) -> StageRuntime:
        """Load the worker and serve from background threads; returns at once.

        `own_cuda_stream`: the busy loop queues its kernels on a CUDA stream of its own, for a
        replica that shares its process (and GPU) with another: their kernels then run side
        by side instead of one after the other on the default stream."""
        self.load()
        self._start_io()
        target = self._serve_on_own_stream if own_cuda_stream else self._serve
        self._loop_thread = threading.Thread(
            target=target, name=f"stage-{self.replica_id}", daemon=True
        )
        self._loop_thread.start()
        return self

    def run(self) -> None:
        """Load the worker and serve in this thread until `stop()`."""
        self.load()
        self._start_io()
        self._serve()

    @property
    def running(self) -> bool:
        """Whether a `start()`ed runtime's busy loop is still going."""
        return self._loop_thread is not None and self._loop_thread.is_alive()

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
        """Until every orchestrator this replica joins has WELCOMEd it; False on timeout."""
        return self._links.all_welcomed.wait(timeout)

    @property
    def welcomed(self) -> bool:
        return self._links.all_welcomed.is_set()

    @property
    def protocol_errors(self) -> int:
        return self._links.protocol_errors

    def _start_io(self) -> None:
        self._io_thread = threading.Thread(
            target=self._links.run, name=f"stage-io-{self.replica_id}", daemon=True
        )
        self._io_thread.start()
        self._links.ready.wait()
        if self._links.failure is not None:
            raise RuntimeError(f"stage {self.replica_id} could not connect: {self._links.failure}")

    def _fail_io(self, reason: str) -> None:
        if reason.startswith("I/O failed"):
            self.failed = True
        if self._links.refused_by:
            self.refused = True
        self.stop(reason)

    def _hello(self) -> Hello:
        config = self.config
        return Hello(
            replica_id=self.replica_id,
            role=config.role,
            model=config.model,
            capacity=config.capacity,
            device=config.device,
            pid=os.getpid(),
            host_id=config.host_id,
            # Joined with CURVE keys: large messages may travel sealed beside the CURVE socket.
            sealed_bulk=config.curve is not None,
        )

    def _heartbeat(self) -> Heartbeat:
        load = len(self._active)
        stalled = time.monotonic() - self._progress_at if load else 0.0
        return Heartbeat(
            replica_id=self.replica_id,
            load=load,
            stalled_s=max(0.0, stalled),
            stats=self._worker_stats(),
        )

    def _worker_stats(self) -> bytes:
        """The worker's stats struct for this heartbeat; a failing `stats()` must not stop the
        heartbeats that keep the replica alive, so it is logged and sent empty."""
        try:
            stats = self.worker.stats()
            return b"" if stats is None else msgspec.msgpack.encode(stats)
        except Exception:
            logger.exception("stage %s: worker stats failed", self.replica_id)
            return b""

    def _deliver(self, link: int, message: Inbound) -> None:
        """Runs on the I/O thread. A peer call's answer can map another replica's shared
        memory (an encoder's embeddings); its tensors are copied out and the memory handed
        back here, so the copy (milliseconds for megabytes of freshly mapped pages) runs
        beside the busy loop instead of inside a step, and the worker keeps plain tensors."""
        if link == _PEER_LINK and isinstance(message, StageReply) and message.shm_outputs:
            message = self._copy_out(message)
        self._inbound.put((link, message))

    def _copy_out(self, reply: StageReply) -> StageReply | StageError:
        try:
            tensors = {**reply.outputs, **self._peer_reader.copy_out(reply.shm_outputs)}
        except (OSError, ValueError) as exc:
            for handle in reply.shm_outputs.values():
                with contextlib.suppress(OSError, ValueError):
                    self._peer_reader.discard(handle)
            message = f"unreadable shared tensor: {exc}"
            return StageError(request_id=reply.request_id, message=message)
        return StageReply(
            request_id=reply.request_id, outputs=tensors, body=reply.body, finished=reply.finished
        )

    # -- busy loop ----------------------------------------------------------------------------

    def _serve_on_own_stream(self) -> None:
        device = torch.device(self.config.device)
        if device.type == "cuda":
            # The current stream is per thread: everything this loop launches goes here.
            torch.cuda.set_stream(torch.cuda.Stream(device))
        self._serve()

    def _serve(self) -> None:
        push = self._context.socket(zmq.PUSH)
        push.connect(self._out_endpoint)
        try:
            while not self._stop.is_set():
                self._reader.release_deferred()  # inputs the worker has let go of
                self._take_inbound(push, block=not self.worker.has_work())
                if self.worker.has_work():
                    self._step(push)
                self._progress_at = time.monotonic()
                broken = self.worker.broken()
                if broken is not None:
                    logger.error("stage %s: %s; the stage exits", self.replica_id, broken)
                    self.failed = True
                    self.stop(broken)
            self._shut_down(push)
        finally:
            push.send(CLOSE)
            push.close(linger=-1)
            if self._io_thread is not None:
                self._io_thread.join()
            self.worker.close()
            if self._pool is not None:
                self._pool.close()
            self._reader.close()
            self._peer_reader.close()

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
        self._send_outputs(push, outputs)
        self._send_peer_calls(push)

    def _take_inbound(self, push: zmq.Socket, block: bool) -> None:
        try:
            link, message = (
                self._inbound.get(timeout=_IDLE_WAIT_S) if block else self._inbound.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            if isinstance(message, StageRequest):
                self._admit(push, link, message)
            elif isinstance(message, Abort):
                if self._active.get(message.request_id) == link:
                    self.worker.abort(message.request_id)
                    del self._active[message.request_id]
            elif link == _PEER_LINK:
                self._peer_answer(message)
            try:
                link, message = self._inbound.get_nowait()
            except queue.Empty:
                break
        self._send_peer_calls(push)

    def _peer_answer(self, message: StageReply | StageError) -> None:
        """Hand the worker an answer to one of its peer calls (a withdrawn call's is dropped)."""
        if message.request_id not in self._peer_calls:
            return
        reply: PeerReply
        if isinstance(message, StageError):
            lost = message.code in ("replica_lost", "no_replica")
            reply = PeerReply(message.request_id, error=message.message, lost=lost)
        else:  # its tensors were copied out of shared memory on arrival (_deliver)
            tensors = dict(message.outputs)
            body = bytes(message.body)
            reply = PeerReply(message.request_id, tensors, body, finished=message.finished)
        if reply.finished or reply.error is not None:
            self._peer_calls.discard(message.request_id)
        self.worker.on_peer_reply(reply)

    def _send_peer_calls(self, push: zmq.Socket) -> None:
        calls, withdrawn = self.worker.take_peer_calls()
        for request_id in withdrawn:
            if request_id in self._peer_calls:
                self._peer_calls.discard(request_id)
                self._send(push, Abort(request_id=request_id), _PEER_LINK)
        for call in calls:
            if call.request_id in withdrawn:
                continue  # made and withdrawn since the last look: never send it
            self._peer_calls.add(call.request_id)
            request = PeerRequest(
                request_id=call.request_id,
                role=call.role,
                inputs=dict(call.tensors),
                body=call.body,
            )
            self._send(push, request, _PEER_LINK)

    def _admit(self, push: zmq.Socket, link: int, request: StageRequest) -> None:
        if request.request_id in self._active:
            message = f"request id {request.request_id!r} is already active on this replica"
            self._send(push, StageError(request_id=request.request_id, message=message), link)
            return
        try:
            inputs = dict(request.inputs)
            for name, handle in request.shm_inputs.items():
                # Released when the worker drops the tensor, so the producer can reuse it.
                inputs[name] = self._reader.open(handle, release_on_gc=True)
            self.worker.add_request(
                WorkerRequest(request_id=request.request_id, inputs=inputs, body=request.body)
            )
        except Exception as exc:
            logger.warning("rejected request %s: %s", request.request_id, exc)
            message = f"{type(exc).__name__}: {exc}"
            self._send(push, StageError(request_id=request.request_id, message=message), link)
            return
        self._active[request.request_id] = link

    def _send_outputs(self, push: zmq.Socket, outputs: Sequence[StageOutput]) -> None:
        """One message per API process for the whole step's replies (a step of a busy LLM
        stage answers hundreds of requests); errors go on their own."""
        replies: dict[int, list[StageReply]] = {}
        for output in outputs:
            link = self._active.get(output.request_id)
            if link is None:
                continue  # aborted meanwhile
            if output.finished or output.error is not None:
                del self._active[output.request_id]
            if output.error is not None:
                error = StageError(request_id=output.request_id, message=output.error[:4000])
                self._send(push, error, link)
            else:
                replies.setdefault(link, []).append(self._reply(output))
        for link, batch in replies.items():
            self._send(push, batch[0] if len(batch) == 1 else StageReplies(replies=batch), link)

    def _reply(self, output: StageOutput) -> StageReply:
        inline: dict[str, torch.Tensor] = {}
        shared: dict[str, SharedTensorHandle] = {}
        for name, tensor in output.tensors.items():
            handle = self._share(tensor)
            if handle is None:
                inline[name] = tensor
            else:
                shared[name] = handle
        return StageReply(
            request_id=output.request_id,
            outputs=inline,
            shm_outputs=shared,
            body=b"" if output.reply is None else msgspec.msgpack.encode(output.reply),
            finished=output.finished,
        )

    def _share(self, tensor: torch.Tensor) -> SharedTensorHandle | None:
        nbytes = tensor.numel() * tensor.element_size()
        if not self._links.shared_memory or nbytes < self.config.shm_threshold_bytes:
            return None
        if self._pool is None:
            self._pool = SharedTensorPool(
                prefix=self.config.shm_prefix, max_bytes=self.config.shm_max_bytes
            )
        return self._pool.put(tensor)  # None when the pool is full: the tensor goes inline

    def _send(self, push: zmq.Socket, message: msgspec.Struct, link: int) -> None:
        push.send_multipart([bytes([link]), *self._codec.encode(message)], copy=False)

    def _shut_down(self, push: zmq.Socket) -> None:
        reason = self.exit_reason or "stopped"
        for request_id in sorted(self._peer_calls):
            self._send(push, Abort(request_id=request_id), _PEER_LINK)
        self._peer_calls.clear()
        for request_id, link in sorted(self._active.items()):
            self.worker.abort(request_id)
            message = f"the replica shut down ({reason})"
            error = StageError(request_id=request_id, message=message, code="replica_lost")
            self._send(push, error, link)
        self._active.clear()
        self._send(push, Goodbye(replica_id=self.replica_id, reason=reason[:1000]), ALL_LINKS)
