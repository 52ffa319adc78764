"""A denoiser's forward replayed as a CUDA graph, for batches small enough to be launch-bound.

One Stable Diffusion UNet forward is some 1,500 small kernels. At a batch of one or two
images the host takes longer to launch them than an H100 takes to run them, so the GPU idles
between kernels; a CUDA graph launches the whole forward at once. Large batches keep the GPU
busy anyway and run eagerly, which also spares them a graph's memory.

`GraphedForward` wraps `module.forward`. For each new signature (every tensor argument's
shape, dtype and device, and the values of the other arguments) whose batch is at most
`max_batch`, it warms up on a side stream and captures a graph. A later call with that
signature copies its tensors into the graph's static inputs, replays, and returns a clone of
the output, so a caller that keeps past outputs (multistep schedulers do) never sees one
overwritten. Every graph shares one memory pool: they never run at once, and each output is
cloned before another graph runs. What cannot be captured runs eagerly: an argument that is
not a tensor, None, bool or string (a Python number could differ every step, and a graph per
value would never be replayed), a CPU tensor, a capture that fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Marks a value `describe` cannot fold into a graph's signature.
UNCAPTURABLE = object()
_PLAIN_TYPES = (type(None), bool, str)


def describe(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable signature of `value` with each tensor replaced by its shape, dtype and
    device (and appended to `tensors`); UNCAPTURABLE if some part cannot be captured."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, _PLAIN_TYPES):
        return ("value", value)
    if isinstance(value, list | tuple):
        items = tuple(describe(item, tensors) for item in value)
        return UNCAPTURABLE if UNCAPTURABLE in items else (type(value).__name__, items)
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        entries = tuple((key, describe(value[key], tensors)) for key in sorted(value))
        if any(entry is UNCAPTURABLE for _, entry in entries):
            return UNCAPTURABLE
        return ("dict", entries)
    return UNCAPTURABLE


def rebuild(value: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """`value` with its tensors, in `describe`'s order, taken from `tensors`."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, list | tuple):
        return type(value)(rebuild(item, tensors) for item in value)
    if isinstance(value, dict):
        return {key: rebuild(value[key], tensors) for key in sorted(value)}
    return value


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: Any


class GraphedForward:
    """`forward` with CUDA graphs for batches up to `max_batch` rows; see the module docstring."""

    def __init__(
        self, forward: Callable[..., Any], max_batch: int = 8, max_graphs: int = 32
    ) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.replays = 0  # for tests and logs: how many calls a graph served
        self._graphs: dict[Any, _Graph] = {}
        self._failed: set[Any] = set()
        self._pool: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors: list[torch.Tensor] = []
        key = describe((args, kwargs), tensors)
        if not self._eligible(key, tensors):
            return self.forward(*args, **kwargs)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                return self.forward(*args, **kwargs)
            try:
                graph = self._capture(args, kwargs, tensors)
            except Exception:
                logger.warning("CUDA graph capture failed; this shape runs eagerly", exc_info=True)
                self._failed.add(key)
                return self.forward(*args, **kwargs)
            self._graphs[key] = graph
        for static, tensor in zip(graph.inputs, tensors, strict=True):
            static.copy_(tensor)
        graph.graph.replay()
        self.replays += 1
        return _clone(graph.output)

    def _eligible(self, key: Any, tensors: list[torch.Tensor]) -> bool:
        if key is UNCAPTURABLE or key in self._failed or not tensors:
            return False
        if any(t.device.type != "cuda" for t in tensors):
            return False
        if tensors[0].dim() == 0 or tensors[0].shape[0] > self.max_batch:
            return False
        return not torch.cuda.is_current_stream_capturing()

    def _capture(self, args: Any, kwargs: Any, tensors: list[torch.Tensor]) -> _Graph:
        inputs = [t.clone() for t in tensors]
        static_args, static_kwargs = rebuild((args, kwargs), iter(inputs))
        # Warm-up off the main stream, as torch's capture recipe asks: lazy initialisation
        # (cuBLAS workspaces, autotuning) must not happen inside the capture.
        side = torch.cuda.Stream(device=tensors[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.forward(*static_args, **static_kwargs)
        if not _is_tensors(output):
            raise TypeError(f"forward returned {type(output).__name__}, not tensors")
        return _Graph(graph, inputs, output)


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, tuple) and all(_is_tensors(item) for item in value)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    return tuple(_clone(item) for item in value)
