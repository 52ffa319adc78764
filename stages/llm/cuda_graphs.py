"""CUDA graphs for decode-only steps.

A decode step of a 7B model launches hundreds of small kernels; at batch 1 their launch cost
alone exceeds the time the GPU needs to stream the weights. Capturing the forward pass once per
batch size and replaying it removes that cost. A step is padded up to the nearest captured size:
padded rows read the null block (id 0) and write no KV (slot -1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omni.stages.llm.attention.metadata import AttentionMetadata
from omni.stages.llm.step_inputs import HostStepInputs

if TYPE_CHECKING:
    from omni.stages.llm.model_runner import TokenFeed
from torch import nn


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (vLLM's spacing: padding wastes at
    most 7 rows, and the number of graphs stays small)."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        attn_backend: str,
        max_num_seqs: int,
        table_width: int,
        max_model_len: int,
        device: torch.device,
        position_rows: int = 1,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attn_backend = attn_backend
        self.table_width = table_width
        self.max_model_len = max_model_len
        n = max_num_seqs
        i32, i64 = torch.int32, torch.int64
        # Static buffers every graph reads; a replay sees whatever was copied in last.
        self.token_ids = torch.zeros(n, dtype=i64, device=device)
        # [n], or [3, n] for M-RoPE models.
        self.position_rows = position_rows
        positions_shape = (n,) if position_rows == 1 else (position_rows, n)
        self.positions = torch.zeros(positions_shape, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros((n, table_width), dtype=i32, device=device)
        # A token feed's destination rows, then its source rows (asynchronous scheduling).
        self.feed_rows = torch.zeros(2 * n, dtype=i64, device=device)
        # Pinned staging for the per-step inputs: one asynchronous copy per buffer instead of
        # a synchronous copy from pageable memory each (the host waits on every one of those).
        # Two sets, used in turn: with asynchronous scheduling the host fills the next step's
        # inputs while the device may not yet have copied the previous step's.
        self.staging = [_Staging(position_rows, n, table_width) for _ in range(2)]
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.sizes = capture_sizes(max_num_seqs)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            # An upper bound, not the step's value: the graph must serve any context length.
            max_seq_len=self.max_model_len,
            is_decode_only=True,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden: torch.Tensor = self.model(
            self.token_ids[:size],
            self.positions[..., :size],
            self.kv_caches,
            self._meta(size),
            self.attn_backend,
        )
        return hidden

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so the shared pool is sized by the largest graph and smaller ones fit.
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: Triton compiles and autotunes outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def padded_size(self, num_reqs: int) -> int | None:
        for size in self.sizes:
            if size >= num_reqs:
                return size
        return None

    def run(self, host: HostStepInputs, feed: TokenFeed | None = None) -> torch.Tensor:
        """Replays the graph for a decode-only step; returns hidden states [num_reqs, hidden]."""
        n = host.num_reqs
        size = self.padded_size(n)
        assert size is not None and host.is_decode_only
        width = host.block_tables.shape[1]
        stage = self.staging[self.turn]
        self.turn ^= 1
        # Its last copies, queued two steps ago, must be done before it is overwritten.
        stage.copied.synchronize()
        staged = stage.int64.numpy()
        staged[0, :n] = host.token_ids
        staged[1, :n] = host.slot_mapping
        staged[2:, :n] = host.rope_positions if host.rope_positions is not None else host.positions
        # Padded rows: token 0 at position 0, reading the null block, writing nothing.
        staged[0, n:size] = 0
        staged[1, n:size] = -1
        staged[2:, n:size] = 0
        seq_lens = stage.seq_lens.numpy()
        seq_lens[:n] = host.seq_lens
        seq_lens[n:size] = 1
        stage.block_tables.numpy()[:n, :width] = host.block_tables
        self.token_ids[:size].copy_(stage.int64[0, :size], non_blocking=True)
        self.slot_mapping[:size].copy_(stage.int64[1, :size], non_blocking=True)
        positions = stage.int64[2:, :size]
        self.positions[..., :size].copy_(
            positions[0] if self.position_rows == 1 else positions, non_blocking=True
        )
        self.seq_lens[:size].copy_(stage.seq_lens[:size], non_blocking=True)
        self.block_tables[:n, :width].copy_(stage.block_tables[:n, :width], non_blocking=True)
        if feed is not None:
            # The feed's rows travel with the other inputs, not as two more small copies.
            k = len(feed.dst)
            rows = stage.feed_rows.numpy()
            rows[:k] = feed.dst
            rows[k : 2 * k] = feed.src_rows
            self.feed_rows[: 2 * k].copy_(stage.feed_rows[: 2 * k], non_blocking=True)
            feed.apply_at(self.token_ids, self.feed_rows[:k], self.feed_rows[k : 2 * k])
        stage.copied.record()
        self.graphs[size].replay()
        return self.outputs[size][:n]


class _Staging:
    """One set of pinned host buffers for a step's inputs. Rows of `int64`: token ids, slots,
    then the position rows."""

    def __init__(self, position_rows: int, n: int, table_width: int) -> None:
        self.int64 = torch.zeros((2 + position_rows, n), dtype=torch.int64).pin_memory()
        self.seq_lens = torch.ones(n, dtype=torch.int32).pin_memory()
        self.block_tables = torch.zeros((n, table_width), dtype=torch.int32).pin_memory()
        self.feed_rows = torch.zeros(2 * n, dtype=torch.int64).pin_memory()
        # Recorded after the copies out of these buffers are queued.
        self.copied = torch.cuda.Event()
