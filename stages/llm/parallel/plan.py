"""The step plan: what rank 0 tells the other ranks of its replica before every forward pass.

Only rank 0 schedules. Each step it broadcasts the step's flattened inputs (the arrays of
`HostStepInputs`, the multi-modal rows to splice in), which of the previous step's sampled
tokens feed this one (asynchronous scheduling) and which rows need logits; the followers run
the same forward pass on their shards and take part in its collectives, and never sample.

The plan travels down a pipe to each follower's stdin as one msgpack message of the project's
codec (no pickle), its length first. Block tables are sent only as wide as this step's longest
request needs; a follower pads them back to the runner's fixed width.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import sys
from typing import BinaryIO

import msgspec
import numpy as np
import torch
from omni.stages.llm.step_inputs import HostStepInputs
from omni.transport.codec import MessageCodec


class StepPlan(msgspec.Struct, frozen=True):
    token_ids: np.ndarray
    positions: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray  # [num_reqs, columns in use]
    slot_mapping: np.ndarray
    logits_indices: np.ndarray
    max_query_len: int
    max_seq_len: int
    rope_positions: np.ndarray | None
    splice_starts: list[int]
    splice_rows: list[torch.Tensor]
    # The previous step's sampled tokens that feed this step: row feed_dst[i] of the batch
    # takes token feed_src[i] of the `num_fed` tokens rank 0 broadcasts after the plan.
    feed_dst: list[int]
    feed_src: list[int]
    num_fed: int
    # Rows of the step's hidden states whose logits are computed (none: a prefill chunk).
    logit_rows: list[int]


class Shutdown(msgspec.Struct, frozen=True):
    reason: str


# Kinds are never renumbered.
_CODEC = MessageCodec({1: StepPlan, 2: Shutdown}, inline_threshold=sys.maxsize)


def plan_for(
    host: HostStepInputs,
    block_size: int,
    feed: tuple[list[int], list[int], int] | None,
    logit_rows: list[int],
) -> StepPlan:
    columns = max(1, -(-host.max_seq_len // block_size))
    dst, src, num_fed = feed if feed is not None else ([], [], 0)
    return StepPlan(
        token_ids=host.token_ids,
        positions=host.positions,
        query_start_loc=host.query_start_loc,
        seq_lens=host.seq_lens,
        block_tables=np.ascontiguousarray(host.block_tables[:, :columns]),
        slot_mapping=host.slot_mapping,
        logits_indices=host.logits_indices,
        max_query_len=host.max_query_len,
        max_seq_len=host.max_seq_len,
        rope_positions=host.rope_positions,
        splice_starts=[start for start, _ in host.mm_splices],
        splice_rows=[rows.cpu() for _, rows in host.mm_splices],
        feed_dst=dst,
        feed_src=src,
        num_fed=num_fed,
        logit_rows=logit_rows,
    )


def host_inputs_of(plan: StepPlan, table_width: int) -> HostStepInputs:
    """The plan's inputs as rank 0 built them, block tables padded to `table_width`. The
    arrays are copied out of the message (decoded arrays are read-only views of its bytes,
    which torch will not wrap)."""
    tables = np.zeros((plan.block_tables.shape[0], table_width), np.int32)
    tables[:, : plan.block_tables.shape[1]] = plan.block_tables
    rope = None if plan.rope_positions is None else plan.rope_positions.copy()
    return HostStepInputs(
        token_ids=plan.token_ids.copy(),
        positions=plan.positions.copy(),
        query_start_loc=plan.query_start_loc.copy(),
        seq_lens=plan.seq_lens.copy(),
        block_tables=tables,
        slot_mapping=plan.slot_mapping.copy(),
        logits_indices=plan.logits_indices.copy(),
        max_query_len=plan.max_query_len,
        max_seq_len=plan.max_seq_len,
        rope_positions=rope,
        mm_splices=list(zip(plan.splice_starts, plan.splice_rows, strict=True)),
    )


# A plan's length ahead of its bytes on the pipe.
_LENGTH = struct.Struct("<Q")
# Room for a few plans in each pipe (Linux's default is 64 KiB): rank 0 rarely waits for a
# follower to read.
_PIPE_BYTES = 1 << 20


class PlanSender:
    """Rank 0's end: each plan goes down every follower's stdin pipe, its length then its
    bytes. A follower waiting for the next plan sleeps in read() (a collective would spin),
    and sees rank 0's death as the end of its pipe."""

    def __init__(self, pipes: list[BinaryIO]) -> None:
        self.pipes = pipes
        for pipe in pipes:
            with contextlib.suppress(AttributeError, OSError):  # Linux only; a hint
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def send(self, message: StepPlan | Shutdown) -> None:
        payload = _CODEC.encode(message)[0]
        frame = _LENGTH.pack(len(payload)) + bytes(payload)
        for pipe in self.pipes:  # BrokenPipeError: that follower is dead
            pipe.write(frame)
            pipe.flush()


class PlanReceiver:
    """A follower's end: reads plans from its stdin (file descriptor `fd`)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd

    def receive(self) -> StepPlan | Shutdown:
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        message = _CODEC.decode([memoryview(self._read(length))])
        assert isinstance(message, StepPlan | Shutdown)
        return message

    def _read(self, size: int) -> bytearray:
        data = bytearray()
        while len(data) < size:
            chunk = os.read(self.fd, size - len(data))
            if not chunk:
                raise EOFError("rank 0 closed the plan pipe (it exited)")
            data += chunk
        return data
