"""The fixed-address inputs a captured CUDA graph reads, and how a step's inputs reach them.

A graph replays the kernels it was captured with, on the buffers it was captured with: a step
that replays it first writes its own inputs into those buffers, padded to the graph's shape.
Padding differs by kind of graph:

- a decode graph of `size` rows takes `size` one-token requests; a padded row is one more
  request at position 0 that reads the null block (seq_len 1) and writes no KV (slot -1). Its
  query_start_loc is fixed (0, 1, 2, ...) and never copied.
- a mixed graph of `size` tokens takes up to `num_reqs` requests of any query length; padded
  tokens (token 0, position 0, slot -1) belong to no request, and padded requests have no new
  tokens (query_start_loc repeats the real token count), so attention skips both.

The host side fills pinned staging buffers with numpy (`StepStaging.fill`, no device work, so
a CPU test can check the layout) and queues one asynchronous copy per buffer
(`StaticStepInputs.load`): a copy from pageable memory would make the host wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omni.stages.llm.attention.metadata import AttentionMetadata
from omni.stages.llm.step_inputs import HostStepInputs

if TYPE_CHECKING:
    from omni.stages.llm.model_runner import TokenFeed


@dataclass(frozen=True)
class GraphShape:
    """The shape a step is padded to: its token count, its request count, and whether it is a
    decode graph's (one token a request, fixed query_start_loc)."""

    num_tokens: int
    num_reqs: int
    decode: bool


class StepStaging:
    """One set of host buffers for a step's inputs (pinned on a GPU machine). Rows of `int64`:
    token ids, slots, then the position rows."""

    def __init__(
        self, position_rows: int, max_tokens: int, max_reqs: int, table_width: int, pin: bool
    ) -> None:
        def buffer(shape: tuple[int, ...], dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
            tensor = torch.full(shape, fill, dtype=dtype)
            return tensor.pin_memory() if pin else tensor

        i32, i64 = torch.int32, torch.int64
        self.int64 = buffer((2 + position_rows, max_tokens), i64)
        self.seq_lens = buffer((max_reqs,), i32, 1)
        self.query_start_loc = buffer((max_reqs + 1,), i32)
        self.logits_indices = buffer((max_reqs,), i64)
        self.block_tables = buffer((max_reqs, table_width), i32)
        # A token feed's destination rows, then its source rows (asynchronous scheduling).
        self.feed_rows = buffer((2 * max_tokens,), i64)
        # Recorded after the copies out of these buffers are queued (GPU only).
        self.copied: torch.cuda.Event | None = torch.cuda.Event() if pin else None

    def fill(self, host: HostStepInputs, shape: GraphShape) -> None:
        """Writes `host` padded to `shape` (see the module docstring)."""
        n, r = host.num_tokens, host.num_reqs
        size, num_reqs = shape.num_tokens, shape.num_reqs
        if n > size or r > num_reqs:
            raise ValueError(f"a step of {n} tokens, {r} requests does not fit {shape}")
        staged = self.int64.numpy()
        staged[0, :n] = host.token_ids
        staged[1, :n] = host.slot_mapping
        staged[2:, :n] = host.rope_positions if host.rope_positions is not None else host.positions
        staged[0, n:size] = 0
        staged[1, n:size] = -1
        staged[2:, n:size] = 0
        seq_lens = self.seq_lens.numpy()
        seq_lens[:r] = host.seq_lens
        # A padded decode row reads one position of the null block; a padded request of a
        # mixed graph has no tokens, and attention returns before reading its length.
        seq_lens[r:num_reqs] = 1 if shape.decode else 0
        self.block_tables.numpy()[:r, : host.block_tables.shape[1]] = host.block_tables
        if shape.decode:
            return
        starts = self.query_start_loc.numpy()
        starts[: r + 1] = host.query_start_loc
        starts[r + 1 : num_reqs + 1] = n
        logits = self.logits_indices.numpy()
        logits[:r] = host.logits_indices
        logits[r:num_reqs] = 0

    def fill_feed(self, dst: list[int], src_rows: list[int]) -> int:
        rows = self.feed_rows.numpy()
        k = len(dst)
        rows[:k] = dst
        rows[k : 2 * k] = src_rows
        return k

    def as_host_inputs(self, host: HostStepInputs, shape: GraphShape) -> HostStepInputs:
        """The filled step as ordinary inputs (what the graph will read), for a check on the
        CPU that the padding leaves the real rows' results alone. Mixed graphs only."""
        assert not shape.decode
        size, num_reqs = shape.num_tokens, shape.num_reqs
        staged = self.int64.numpy()
        rope = staged[2:, :size].copy() if host.rope_positions is not None else None
        return HostStepInputs(
            token_ids=staged[0, :size].copy(),
            positions=staged[2, :size].copy(),
            query_start_loc=self.query_start_loc.numpy()[: num_reqs + 1].copy(),
            seq_lens=self.seq_lens.numpy()[:num_reqs].copy(),
            block_tables=self.block_tables.numpy()[:num_reqs].copy(),
            slot_mapping=staged[1, :size].copy(),
            logits_indices=self.logits_indices.numpy()[:num_reqs].copy(),
            max_query_len=size,
            max_seq_len=host.max_seq_len,
            rope_positions=rope,
            mm_splices=host.mm_splices,
        )


class StaticStepInputs:
    """The device buffers that one family of graphs reads, and two staging sets used in turn:
    with asynchronous scheduling the host fills the next step's inputs while the device may
    not yet have copied the previous step's."""

    def __init__(
        self,
        max_tokens: int,
        max_reqs: int,
        position_rows: int,
        table_width: int,
        device: torch.device,
        decode: bool,
    ) -> None:
        i32, i64 = torch.int32, torch.int64
        self.decode = decode
        self.position_rows = position_rows
        self.token_ids = torch.zeros(max_tokens, dtype=i64, device=device)
        # [n], or [3, n] for M-RoPE models.
        positions_shape = (max_tokens,) if position_rows == 1 else (position_rows, max_tokens)
        self.positions = torch.zeros(positions_shape, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=i64, device=device)
        self.seq_lens = torch.full((max_reqs,), 1 if decode else 0, dtype=i32, device=device)
        # Decode rows are one token each; a mixed graph's requests start empty.
        self.query_start_loc = (
            torch.arange(max_reqs + 1, dtype=i32, device=device)
            if decode
            else torch.zeros(max_reqs + 1, dtype=i32, device=device)
        )
        self.logits_indices = torch.zeros(max_reqs, dtype=i64, device=device)
        self.block_tables = torch.zeros((max_reqs, table_width), dtype=i32, device=device)
        self.feed_rows = torch.zeros(2 * max_tokens, dtype=i64, device=device)
        pin = device.type == "cuda"
        self.staging = [
            StepStaging(position_rows, max_tokens, max_reqs, table_width, pin) for _ in range(2)
        ]
        self.turn = 0

    def meta(self, shape: GraphShape, max_seq_len: int) -> AttentionMetadata:
        """The metadata a graph of `shape` is captured with. `max_seq_len` is an upper bound,
        not a step's value: the graph must serve any context length."""
        size, num_reqs = shape.num_tokens, shape.num_reqs
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: num_reqs + 1],
            seq_lens=self.seq_lens[:num_reqs],
            block_tables=self.block_tables[:num_reqs],
            slot_mapping=self.slot_mapping[:size],
            # Mixed graphs: the query-length bound picks the prefill tile shape for any step.
            max_query_len=1 if shape.decode else size,
            max_seq_len=max_seq_len,
            is_decode_only=shape.decode,
        )

    def load(self, host: HostStepInputs, shape: GraphShape, feed: TokenFeed | None) -> None:
        """Queues the copies of `host`, padded to `shape`, into the buffers (then the feed's
        tokens into token_ids), without waiting for the device."""
        stage = self.staging[self.turn]
        self.turn ^= 1
        # Its last copies, queued two steps ago, must be done before it is overwritten.
        assert stage.copied is not None
        stage.copied.synchronize()
        stage.fill(host, shape)
        size, num_reqs, r = shape.num_tokens, shape.num_reqs, host.num_reqs
        width = host.block_tables.shape[1]
        self.token_ids[:size].copy_(stage.int64[0, :size], non_blocking=True)
        self.slot_mapping[:size].copy_(stage.int64[1, :size], non_blocking=True)
        positions = stage.int64[2:, :size]
        self.positions[..., :size].copy_(
            positions[0] if self.position_rows == 1 else positions, non_blocking=True
        )
        self.seq_lens[:num_reqs].copy_(stage.seq_lens[:num_reqs], non_blocking=True)
        self.block_tables[:r, :width].copy_(stage.block_tables[:r, :width], non_blocking=True)
        if not shape.decode:
            self.query_start_loc[: num_reqs + 1].copy_(
                stage.query_start_loc[: num_reqs + 1], non_blocking=True
            )
            self.logits_indices[:num_reqs].copy_(
                stage.logits_indices[:num_reqs], non_blocking=True
            )
        if feed is not None:
            # The feed's rows travel with the other inputs, not as two more small copies.
            k = stage.fill_feed(feed.dst, feed.src_rows)
            self.feed_rows[: 2 * k].copy_(stage.feed_rows[: 2 * k], non_blocking=True)
            feed.apply_at(self.token_ids, self.feed_rows[:k], self.feed_rows[k : 2 * k])
        stage.copied.record()

