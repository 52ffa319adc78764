"""CUDA graphs of the Qwen2-VL / Qwen2.5-VL vision tower, for batches of same-size images.

The tower is transformers' eager module: 32 blocks of norms, projections, rotary and attention,
a few thousand kernel launches and their Python a forward. Measured on an H200 serving image
chats, that host work, not the GPU, bounded the encoder, and where the encoder shares the LLM
stage's process (`--colocate-encoders`) it also took the GIL from the LLM's step loop. A graph
replays the whole forward with one call.

What a forward depends on besides the pixels (rotary positions, attention segments, window
order) depends only on the images' patch grids, and transformers' tower takes all of it
precomputed (`position_ids`, `cu_seqlens`, `window_index`, `cu_window_seqlens`). So a batch of
N images of one grid is captured once per (grid, bucket), where the bucket is N rounded up to a
power of two: the padding rows are whole extra images, and the tower attends within each
image, so they change nothing for the real ones. A (grid, bucket) is captured the second time
it comes, so ever-new image sizes cost no captures. Batches that mix grids, or exceed the
patch budget, run eagerly.

A capture runs on a thread of its own while the batches keep running eagerly, so no request
waits for one (a capture is two forwards' worth of work, and at a server's start every bucket
of a new image size is captured within seconds). It begins and ends the capture itself, not
through `torch.cuda.graph`, whose entry synchronises the device and empties the caching
allocators: in a process shared with the LLM stage that would also throw away the LLM's cached
activation and pinned host blocks and make its next steps allocate them again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

Grid = tuple[int, int, int]  # (t, h, w) patches of one image
# Captured graphs kept; each holds its input and output buffers (its activations live in one
# memory pool that every graph shares).
MAX_CAPTURED = 16
# A (grid, bucket) is captured the second time it is seen: a capture costs about two eager
# forwards, which traffic of ever-new image sizes would pay on every batch.
CAPTURE_AFTER = 2
# Sightings remembered before the count starts over (a bound on memory, not a tuning knob).
MAX_SIGHTINGS = 4096


def static_tower_inputs(tower: nn.Module, grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything the tower's forward derives from `grid_thw` (with host syncs), computed once
    and passed back in as keyword arguments, with which the forward runs no host sync."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    merge = int(getattr(tower, "spatial_merge_size"))  # noqa: B009
    device = grid_thw.device
    inputs = {
        "position_ids": get_vision_position_ids(grid_thw, merge),
        "cu_seqlens": get_vision_cu_seqlens(grid_thw),
    }
    window_size = getattr(tower, "window_size", None)
    if window_size is not None:  # Qwen2.5-VL: most layers attend within windows
        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw,
            spatial_merge_size=merge,
            window_size=int(window_size),
            patch_size=int(getattr(tower, "patch_size")),  # noqa: B009
        )
        inputs.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens)
    # transformers builds the window order on the CPU; an index on another device would be
    # copied inside the forward, which a graph cannot capture.
    return {name: tensor.to(device) for name, tensor in inputs.items()}


@dataclass
class _Bucket:
    """The tower's forward for `count` images of one grid, on fixed buffers."""

    pixels: torch.Tensor  # [count * patches, patch_dim]
    grid_thw: torch.Tensor  # [count, 3]
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor | None = None  # [count * tokens, hidden] after `run`
    graph: torch.cuda.CUDAGraph | None = None
    # The attention's gather plans the graph was captured with: their index tensors live
    # outside the graph's memory pool, and the attention keeps only its last few plans.
    plans: list[Any] = field(default_factory=list)

    def forward(self, tower: nn.Module) -> torch.Tensor:
        return tower(self.pixels, grid_thw=self.grid_thw, **self.inputs).pooler_output

    def run(self, tower: nn.Module) -> torch.Tensor:
        if self.graph is None:
            self.output = self.forward(tower)
        else:
            self.graph.replay()
        assert self.output is not None
        return self.output


class VisionTowerGraphs:
    """Runs a batch of same-grid images through a captured graph of the tower (or, with
    `capture=False`, through the same fixed-buffer forward eagerly: what the CPU tests run)."""

    def __init__(
        self,
        tower: nn.Module,
        max_batch_patches: int,
        capture: bool = True,
        capture_after: int = CAPTURE_AFTER,
    ) -> None:
        self.tower = tower
        self.max_batch_patches = max_batch_patches
        self.capture = capture
        self.capture_after = capture_after
        # The buckets ready to run and the keys being captured: shared with the capture thread.
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[Grid, int], _Bucket] = OrderedDict()
        self._capturing: set[tuple[Grid, int]] = set()
        self._sightings: dict[tuple[Grid, int], int] = {}
        self._capturer: concurrent.futures.ThreadPoolExecutor | None = None
        self._captures: list[concurrent.futures.Future[None]] = []
        self.failed = False  # a capture failed: every batch runs eagerly
        self._pool: Any = None  # torch.cuda.graph_pool_handle(), shared by every graph
        self._side: torch.cuda.Stream | None = None  # the capture thread's stream

    def bucket_size(self, grid: Grid, count: int) -> int | None:
        """The padded image count a batch of `count` images of `grid` runs as, or None where it
        runs eagerly (over the patch budget, as a single image larger than it is)."""
        patches = grid[0] * grid[1] * grid[2]
        size = 1
        while size < count:
            size *= 2
        if size * patches > self.max_batch_patches:
            return None
        return size

    def run(
        self, pixel_values: torch.Tensor, grids: list[Grid], merge_size: int
    ) -> torch.Tensor | None:
        """The merged embeddings `[tokens, hidden]` of the batch (a new tensor), or None if it
        must run eagerly: mixed grids, over the budget, or its graph not captured yet."""
        grid = grids[0]
        if any(g != grid for g in grids):
            return None
        size = self.bucket_size(grid, len(grids))
        if size is None or self.failed:
            return None
        bucket = self._ready_bucket((grid, size), pixel_values.dtype)
        if bucket is None:
            return None
        rows = pixel_values.shape[0]
        bucket.pixels[:rows].copy_(pixel_values)
        tokens = rows // merge_size**2
        # Cloned: the next replay overwrites the graph's output buffer.
        return bucket.run(self.tower)[:tokens].clone()

    def wait_for_captures(self, timeout: float | None = None) -> None:
        """Returns once the captures started so far have ended (tests; shutting down)."""
        concurrent.futures.wait(self._captures, timeout=timeout)

    def close(self) -> None:
        """Drops the captures not yet started and waits for the one running."""
        if self._capturer is not None:
            self._capturer.shutdown(wait=True, cancel_futures=True)
            self._capturer = None

    def _ready_bucket(self, key: tuple[Grid, int], dtype: torch.dtype) -> _Bucket | None:
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None:
                self._buckets.move_to_end(key)
                return bucket
            if key in self._capturing:
                return None
        if not self._seen_enough(key):
            return None
        if self.capture:
            self._start_capture(key, dtype)
            return None
        bucket = self._new_bucket(key, dtype)
        self._publish(key, bucket)
        return bucket

    def _seen_enough(self, key: tuple[Grid, int]) -> bool:
        if len(self._sightings) >= MAX_SIGHTINGS:
            self._sightings.clear()
        seen = self._sightings[key] = self._sightings.get(key, 0) + 1
        if seen < self.capture_after:
            return False
        del self._sightings[key]
        return True

    def _start_capture(self, key: tuple[Grid, int], dtype: torch.dtype) -> None:
        device = next(self.tower.parameters()).device
        # The serving thread's stream: the bucket's buffers are allocated on it, since that is
        # where they are written and read from then on.
        origin = torch.cuda.current_stream(device) if device.type == "cuda" else None
        with self._lock:
            self._capturing.add(key)
        if self._capturer is None:
            self._capturer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="vision-capture"
            )
        self._captures = [f for f in self._captures if not f.done()]
        self._captures.append(self._capturer.submit(self._capture_bucket, key, dtype, origin))

    def _capture_bucket(
        self, key: tuple[Grid, int], dtype: torch.dtype, origin: torch.cuda.Stream | None
    ) -> None:
        """On the capture thread: builds the bucket, captures it, and makes it ready."""
        try:
            with contextlib.ExitStack() as on_device:
                if origin is None:
                    bucket = self._new_bucket(key, dtype)
                else:
                    # The current device is per thread: this one's must be the tower's.
                    on_device.enter_context(torch.cuda.device(origin.device))
                    with torch.cuda.stream(origin):
                        bucket = self._new_bucket(key, dtype)
                    origin.synchronize()  # the buffers' zero fill, queued on that stream
                self._capture(bucket)
            self._publish(key, bucket)
            logger.info("captured the vision tower for %d image(s) of grid %s", key[1], key[0])
        except Exception:
            # A capture the device refused must not fail requests: the eager forward serves.
            logger.exception("capturing the vision tower failed; it runs eagerly from now on")
            self.failed = True
        finally:
            with self._lock:
                self._capturing.discard(key)

    def _new_bucket(self, key: tuple[Grid, int], dtype: torch.dtype) -> _Bucket:
        grid, size = key
        device = next(self.tower.parameters()).device
        proj = getattr(getattr(self.tower, "patch_embed"), "proj")  # noqa: B009
        patch_dim = int(proj.weight[0].numel())
        patches = grid[0] * grid[1] * grid[2]
        grid_thw = torch.tensor([grid] * size, dtype=torch.int64, device=device)
        return _Bucket(
            pixels=torch.zeros(size * patches, patch_dim, dtype=dtype, device=device),
            grid_thw=grid_thw,
            inputs=static_tower_inputs(self.tower, grid_thw),
        )

    def _publish(self, key: tuple[Grid, int], bucket: _Bucket) -> None:
        with self._lock:
            self._buckets[key] = bucket
            while len(self._buckets) > MAX_CAPTURED:
                self._buckets.popitem(last=False)

    def _capture(self, bucket: _Bucket) -> None:
        if self._side is None:
            # One stream for every capture: the warm-up's blocks, cached for it, serve the next.
            self._side = torch.cuda.Stream()
        side = self._side
        with torch.cuda.stream(side):
            # Warm-up: kernels pick their algorithms and the attention's gather plans are built
            # (their host syncs must not happen while capturing).
            bucket.forward(self.tower)
        side.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the serving thread keeps running the tower eagerly, and an LLM stage
        # sharing the process (colocated encoders) keeps stepping, while this thread captures.
        with torch.cuda.stream(side):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                bucket.output = bucket.forward(self.tower)
            finally:
                graph.capture_end()
        bucket.graph = graph
        bucket.plans = _gather_plans(self.tower, bucket.inputs)


def _gather_plans(tower: nn.Module, inputs: dict[str, torch.Tensor]) -> list[Any]:
    """The packed attention's plans for the segment bounds in `inputs`, as it holds them
    now (it built them in the forward just run)."""
    blocks = getattr(tower, "blocks", None)
    plans = getattr(blocks[0].attn, "plans", None) if blocks else None
    if plans is None:
        return []
    return [plans.plan(inputs[name]) for name in ("cu_seqlens", "cu_window_seqlens")
            if name in inputs]


def batch_grids(grid_thw: torch.Tensor) -> list[Grid]:
    rows: list[list[int]] = grid_thw.tolist()
    return [(int(t), int(h), int(w)) for t, h, w in rows]

