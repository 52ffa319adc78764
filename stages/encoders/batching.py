"""The stage worker every encoder shares: queue requests, run as many as fit one forward.

An encoder stage's request is one request's items as a few tensors (the vision stage's
`pixel_values` and `image_grid_thw`, the audio stage's `input_features` and
`feature_lengths`); its reply is one finished output with the tensor `embeddings`, the items'
rows concatenated in order. Requests queued together run in one forward, up to a budget in the
encoder's own unit of cost (patches, clips); a request larger than the budget still runs,
alone. A subclass names its encoder class, inputs and budget, and says what a request costs;
the encoder takes the input tensors positionally, in `INPUT_NAMES` order.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from omni.stages.runtime.worker import StageOutput, StageWorker, WorkerOptions, WorkerRequest

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
    TOKENS_KEY: ClassVar[str]  # the reply's data key for its number of embedding rows

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        known = ("dtype", self.BUDGET_OPTION)
        unknown = sorted(set(options.extra) - set(known))
        if unknown:
            raise ValueError(f"unknown {self.ROLE} stage options {unknown}; known: {list(known)}")
        if not options.model:
            raise ValueError(f"the {self.ROLE} stage needs --model ({self.MODEL_KIND})")
        self.dtype = options.extra.get("dtype", "auto")
        text = options.extra.get(self.BUDGET_OPTION, str(self.DEFAULT_BUDGET))
        try:
            self.max_batch_cost = int(text)
        except ValueError:
            raise ValueError(f"option {self.BUDGET_OPTION} must be an int, got {text!r}") from None
        if self.max_batch_cost < 1:
            raise ValueError(f"{self.BUDGET_OPTION} is {self.max_batch_cost}; it must be >= 1")
        self._queue: deque[_Queued] = deque()
        self._encoder: Encoder | None = None
        # Heartbeat counters (see `stats`): requests encoded and the forwards that did it.
        self.requests_encoded = 0
        self.forwards = 0

    @abstractmethod
    def cost(self, inputs: Inputs) -> int:
        """One request's cost in the budget's unit."""

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
        encoder = self.encoder
        missing = [name for name in self.INPUT_NAMES if name not in request.inputs]
        if missing:
            raise ValueError(f"request {request.request_id!r} lacks input tensors {missing}")
        if any(queued.request_id == request.request_id for queued in self._queue):
            raise ValueError(f"request {request.request_id!r} is already active")
        inputs = {name: request.inputs[name] for name in self.INPUT_NAMES}
        encoder.check_inputs(*self._positional(inputs))
        self._queue.append(_Queued(request.request_id, inputs, self.cost(inputs)))

    def has_work(self) -> bool:
        return bool(self._queue)

    def step(self) -> list[StageOutput]:
        """One forward over the queued requests that fit in the budget (at least one)."""
        if not self._queue:
            return []
        batch = [self._queue.popleft()]
        cost = batch[0].cost
        while self._queue and cost + self._queue[0].cost <= self.max_batch_cost:
            cost += self._queue[0].cost
            batch.append(self._queue.popleft())
        embeddings = self.encoder.encode_batch([self._positional(item.inputs) for item in batch])
        self.forwards += 1
        self.requests_encoded += len(batch)
        return [
            StageOutput(
                request_id=item.request_id,
                tensors={"embeddings": embeds.contiguous()},
                data={self.TOKENS_KEY: int(embeds.shape[0])},
                finished=True,
            )
            for item, embeds in zip(batch, embeddings, strict=True)
        ]

    def abort(self, request_id: str) -> None:
        self._queue = deque(item for item in self._queue if item.request_id != request_id)

    def stats(self) -> dict[str, float]:
        """Queued requests, requests encoded and forward passes: their ratio is the batch
        size the stage achieves."""
        return {
            "encoder_requests_queued": len(self._queue),
            "encoder_requests_encoded": self.requests_encoded,
            "encoder_forwards": self.forwards,
        }

    def close(self) -> None:
        self._queue.clear()
        self._encoder = None
