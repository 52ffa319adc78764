"""The stage worker every encoder shares: queue requests, run as many as fit one forward.

An encoder stage's request is one request's items as a few tensors (the vision stage's
`pixel_values` and `image_grid_thw`, the audio stage's `input_features` and
`feature_lengths`); its reply is one finished output with the tensor `embeddings`, the items'
rows concatenated in order. Requests queued together run in one forward, up to a budget in the
encoder's own unit of cost (patches, clips); a request larger than the budget still runs,
alone. A subclass names its encoder class, inputs and budget, and says what a request costs;
the encoder takes the input tensors positionally, in `INPUT_NAMES` order.

A request may instead carry its items as they came (an image file's bytes): a subclass that
implements `prepare` turns it into the input tensors (decode, check, preprocess) on a small
thread pool, so that decoding the next requests overlaps the forward of the current ones and
none of it runs in the API process.
"""

from __future__ import annotations

import concurrent.futures
import logging
from abc import abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from omni.stages.contracts.encoder import EMBEDDINGS, EncodeReply, EncoderStats
from omni.stages.runtime.options import parse_option
from omni.stages.runtime.worker import StageOutput, StageWorker, WorkerOptions, WorkerRequest

logger = logging.getLogger(__name__)

# How long an idle step waits for a request being prepared before it returns to the runtime
# (which then looks at its inbox again).
_PREPARE_WAIT_S = 0.005

Inputs = Mapping[str, torch.Tensor]


class Encoder(Protocol):
    """What the worker needs of an encoder (`VisionEncoder`, `AudioEncoder`)."""

    def check_inputs(self, *tensors: torch.Tensor) -> None: ...

    def encode_batch(self, requests: Sequence[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]: ...


class EncodeOne:
    """`encode` for an `Encoder`: one request checked, then run as a batch of one."""

    def encode(self: Encoder, *tensors: torch.Tensor) -> torch.Tensor:
        """One request's embeddings (see `encode_batch`)."""
        self.check_inputs(*tensors)
        return self.encode_batch([tensors])[0]


@dataclass(frozen=True)
class _Queued:
    request_id: str
    inputs: Inputs
    cost: int


class BatchingEncoderWorker(StageWorker):
    """Options: `dtype` (auto, float32, bfloat16, float16) and the budget option."""

    # Its `from_pretrained(model, device, dtype)` builds the encoder.
    ENCODER_CLASS: ClassVar[Any]
    ROLE: ClassVar[str]  # the stage role, for errors
    MODEL_KIND: ClassVar[str]  # what --model must be, for errors ("a Qwen2-VL folder")
    INPUT_NAMES: ClassVar[tuple[str, ...]]  # the request tensors every request must carry
    BUDGET_OPTION: ClassVar[str]  # the option bounding one forward's total cost
    DEFAULT_BUDGET: ClassVar[int]
    # Threads that run `prepare` (0: requests must carry INPUT_NAMES).
    PREPARE_THREADS: ClassVar[int] = 0
    # Options of the subclass's own, beside dtype and the budget.
    EXTRA_OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        known = ("dtype", self.BUDGET_OPTION, *self.EXTRA_OPTIONS)
        unknown = sorted(set(options.extra) - set(known))
        if unknown:
            raise ValueError(f"unknown {self.ROLE} stage options {unknown}; known: {list(known)}")
        if not options.model:
            raise ValueError(f"the {self.ROLE} stage needs --model ({self.MODEL_KIND})")
        self.dtype = options.extra.get("dtype", "auto")
        text = options.extra.get(self.BUDGET_OPTION, str(self.DEFAULT_BUDGET))
        self.max_batch_cost: int = parse_option(self.BUDGET_OPTION, text, int)
        if self.max_batch_cost < 1:
            raise ValueError(f"{self.BUDGET_OPTION} is {self.max_batch_cost}; it must be >= 1")
        self._queue: deque[_Queued] = deque()
        self._preparing: dict[str, concurrent.futures.Future[Inputs]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._failed: list[StageOutput] = []
        self._encoder: Encoder | None = None
        # Heartbeat counters (see `stats`): requests encoded and the forwards that did it.
        self.requests_encoded = 0
        self.forwards = 0

    @abstractmethod
    def cost(self, inputs: Inputs) -> int:
        """One request's cost in the budget's unit."""

    def can_prepare(self, request: WorkerRequest) -> bool:
        """Whether the request carries its items as they came, for `prepare`."""
        return False

    def prepare(self, request: WorkerRequest) -> Inputs:
        """The INPUT_NAMES tensors of a request that `can_prepare`; runs on the preparation
        pool. Raises ValueError naming the item for what cannot be used."""
        raise NotImplementedError(f"the {self.ROLE} stage prepares no requests")

    @property
    def encoder(self) -> Any:
        """The loaded encoder (its concrete class, for callers and tests)."""
        if self._encoder is None:
            raise RuntimeError(f"the {self.ROLE} worker was not loaded")
        return self._encoder

    def load(self) -> None:
        self._encoder = self.ENCODER_CLASS.from_pretrained(
            self.options.model, self.options.device, self.dtype
        )

    def _positional(self, inputs: Inputs) -> tuple[torch.Tensor, ...]:
        return tuple(inputs[name] for name in self.INPUT_NAMES)

    def add_request(self, request: WorkerRequest) -> None:
        if request.request_id in self._preparing or any(
            queued.request_id == request.request_id for queued in self._queue
        ):
            raise ValueError(f"request {request.request_id!r} is already active")
        if not (self.PREPARE_THREADS and self.can_prepare(request)):
            self._enqueue(request.request_id, request.inputs)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.PREPARE_THREADS, thread_name_prefix=f"{self.ROLE}-prepare"
            )
        self._preparing[request.request_id] = self._pool.submit(self.prepare, request)

    def _enqueue(self, request_id: str, given: Inputs) -> None:
        missing = [name for name in self.INPUT_NAMES if name not in given]
        if missing:
            raise ValueError(f"request {request_id!r} lacks input tensors {missing}")
        inputs = {name: given[name] for name in self.INPUT_NAMES}
        self.encoder.check_inputs(*self._positional(inputs))
        self._queue.append(_Queued(request_id, inputs, self.cost(inputs)))

    def _collect_prepared(self) -> None:
        """Queue the requests whose preparation finished; fail those it refused."""
        if not self._queue and self._preparing:
            concurrent.futures.wait(
                self._preparing.values(),
                timeout=_PREPARE_WAIT_S,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
        for request_id, future in list(self._preparing.items()):
            if not future.done():
                continue
            del self._preparing[request_id]
            try:
                self._enqueue(request_id, future.result())
            except Exception as exc:
                if not isinstance(exc, ValueError):
                    logger.exception("preparing request %s failed", request_id)
                error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                self._failed.append(StageOutput(request_id, finished=True, error=error))

    def has_work(self) -> bool:
        return bool(self._queue or self._preparing or self._failed)

    def step(self) -> list[StageOutput]:
        """One forward over the queued requests that fit in the budget (at least one)."""
        self._collect_prepared()
        failed, self._failed = self._failed, []
        if not self._queue:
            return failed
        batch = [self._queue.popleft()]
        cost = batch[0].cost
        while self._queue and cost + self._queue[0].cost <= self.max_batch_cost:
            cost += self._queue[0].cost
            batch.append(self._queue.popleft())
        embeddings = self.encoder.encode_batch([self._positional(item.inputs) for item in batch])
        self.forwards += 1
        self.requests_encoded += len(batch)
        return failed + [
            StageOutput(
                request_id=item.request_id,
                tensors={EMBEDDINGS: embeds.contiguous()},
                reply=EncodeReply(num_tokens=int(embeds.shape[0])),
                finished=True,
            )
            for item, embeds in zip(batch, embeddings, strict=True)
        ]

    def abort(self, request_id: str) -> None:
        self._queue = deque(item for item in self._queue if item.request_id != request_id)
        future = self._preparing.pop(request_id, None)
        if future is not None:
            future.cancel()
        self._failed = [output for output in self._failed if output.request_id != request_id]

    def stats(self) -> EncoderStats:
        """Queued requests, requests encoded and forward passes: their ratio is the batch
        size the stage achieves."""
        return EncoderStats(
            requests_queued=len(self._queue) + len(self._preparing),
            requests_encoded=self.requests_encoded,
            forwards=self.forwards,
        )

    def close(self) -> None:
        self._queue.clear()
        for future in self._preparing.values():
            future.cancel()
        self._preparing.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._encoder = None
