"""Flattening one scheduler step into the tensors a forward pass reads.

Built with numpy on the host and moved in one copy per tensor: at batch 256 a per-token Python
loop would cost more than the decode step it feeds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from omni.stages.llm.attention.metadata import AttentionMetadata
from omni.stages.llm.host_to_device import copy_to_device
from omni.stages.llm.scheduler import ScheduledRequest


@dataclass
class HostStepInputs:
    """Host-side arrays for one step, before they reach the device."""

    token_ids: np.ndarray  # int64 [num_tokens]
    positions: np.ndarray  # int64 [num_tokens]
    query_start_loc: np.ndarray  # int32 [num_reqs + 1]
    seq_lens: np.ndarray  # int32 [num_reqs]
    block_tables: np.ndarray  # int32 [num_reqs, width]
    slot_mapping: np.ndarray  # int64 [num_tokens]
    # Row of the flattened batch whose hidden state predicts each request's next token.
    logits_indices: np.ndarray  # int64 [num_reqs]
    max_query_len: int
    max_seq_len: int
    # int64 [3, num_tokens]: M-RoPE (temporal, height, width) positions, for models whose
    # rotary takes them (Qwen2-VL family); None for plain 1-D rotary.
    rope_positions: np.ndarray | None = None
    # Multi-modal embeddings to write over the token embeddings: (row of the flattened batch
    # where the run starts, the embedding rows).
    mm_splices: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def build_host_inputs(
    scheduled: list[ScheduledRequest],
    block_size: int,
    table_width: int | None = None,
    mrope: bool = False,
) -> HostStepInputs:
    query_lens = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, len(scheduled))
    starts = np.fromiter(
        (s.request.num_computed_tokens for s in scheduled), np.int64, len(scheduled)
    )
    num_tokens = int(query_lens.sum())
    cu = np.zeros(len(scheduled) + 1, np.int64)
    np.cumsum(query_lens, out=cu[1:])

    token_ids = np.fromiter(
        itertools.chain.from_iterable(
            s.request.all_token_ids[start : start + s.num_new_tokens]
            for s, start in zip(scheduled, starts.tolist(), strict=True)
        ),
        np.int64,
        num_tokens,
    )
    req_of_token = np.repeat(np.arange(len(scheduled)), query_lens)
    positions = np.arange(num_tokens, dtype=np.int64) - cu[req_of_token] + starts[req_of_token]
    seq_lens = starts + query_lens

    width = table_width or max(len(s.block_ids) for s in scheduled)
    block_tables = np.zeros((len(scheduled), width), np.int32)
    for row, s in enumerate(scheduled):
        block_tables[row, : len(s.block_ids)] = s.block_ids
    slot_mapping = (
        block_tables[req_of_token, positions // block_size].astype(np.int64) * block_size
        + positions % block_size
    )
    rope_positions = _mrope_positions(scheduled, positions, cu) if mrope else None
    return HostStepInputs(
        rope_positions=rope_positions,
        mm_splices=_mm_splices(scheduled, starts, cu),
        token_ids=token_ids,
        positions=positions,
        query_start_loc=cu.astype(np.int32),
        seq_lens=seq_lens.astype(np.int32),
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        logits_indices=cu[1:] - 1,
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
    )


# Longest query a request may have for its step to run as decode rows: each row re-reads its
# request's whole context, fine for the few tokens left after a prefix hit, wasteful for a
# long prefill (which is compute-bound and gains nothing from a graph).
MAX_QUERY_LEN_AS_ROWS = 16


def as_decode_rows(host: HostStepInputs) -> HostStepInputs | None:
    """The same step as one single-token row per new token, or None if it should not run so.

    Causal attention of a request's token at position p sees positions 0..p: exactly a decode
    row with seq_len p + 1 over the request's block table. Every layer writes all new tokens'
    K/V before attending, so a row sees the K/V of the rows before it in the same step. A short
    prefill (what remains after a prefix-cache hit, or a chunk's tail) then fits the decode
    CUDA graphs instead of running eagerly, kernel launch by kernel launch. The hidden states
    of `host.logits_indices`' rows are the ones to sample from.
    """
    if host.mm_splices or host.max_query_len > MAX_QUERY_LEN_AS_ROWS:
        return None
    query_lens = np.diff(host.query_start_loc)
    req_of_token = np.repeat(np.arange(host.num_reqs), query_lens)
    num_tokens = host.num_tokens
    return HostStepInputs(
        token_ids=host.token_ids,
        positions=host.positions,
        query_start_loc=np.arange(num_tokens + 1, dtype=np.int32),
        seq_lens=(host.positions + 1).astype(np.int32),
        block_tables=host.block_tables[req_of_token],
        slot_mapping=host.slot_mapping,
        logits_indices=np.arange(num_tokens, dtype=np.int64),
        max_query_len=1,
        max_seq_len=host.max_seq_len,
        rope_positions=host.rope_positions,
    )


def _mrope_positions(
    scheduled: list[ScheduledRequest], positions: np.ndarray, cu: np.ndarray
) -> np.ndarray:
    """Prompt tokens take the positions the prompt processor computed; tokens past the prompt
    (and every token of a text-only request) sit at their index plus the request's delta in
    all three rows, as transformers' get_rope_index continues them. `positions` holds each
    token's index in its request, `cu` where each request's tokens start.

    Vectorised over the batch (a per-request loop made build_host_inputs take 0.56 ms for 64
    decode rows on the dev machine, 0.12 ms now); only a request whose new tokens reach into
    its prompt (a prefill chunk) takes its positions from the processor's table."""
    num_reqs = len(scheduled)
    deltas = np.fromiter((s.request.mrope_position_delta for s in scheduled), np.int64, num_reqs)
    query_lens = np.diff(cu)
    out = np.broadcast_to(positions + np.repeat(deltas, query_lens), (3, positions.size)).copy()
    for row, s in enumerate(scheduled):
        prompt = s.request.mrope_positions
        lo = int(cu[row])
        if prompt is None or positions[lo] >= prompt.shape[1]:
            continue
        hi = int(cu[row + 1])
        index = positions[lo:hi]
        in_prompt = index < prompt.shape[1]
        out[:, lo:hi][:, in_prompt] = prompt[:, index[in_prompt]]
    return out


def _mm_splices(
    scheduled: list[ScheduledRequest], starts: np.ndarray, cu: np.ndarray
) -> list[tuple[int, torch.Tensor]]:
    """The parts of each multi-modal item that fall in this step's chunk of its request."""
    splices: list[tuple[int, torch.Tensor]] = []
    for row, (s, start) in enumerate(zip(scheduled, starts.tolist(), strict=True)):
        request = s.request
        if not request.mm_embeddings:
            continue
        end = start + s.num_new_tokens
        for item, embedding in zip(request.mm_placeholders, request.mm_embeddings, strict=True):
            lo, hi = max(start, item.offset), min(end, item.offset + item.length)
            if lo < hi:
                # Admission fails a request whose skipped item is not inside its prefix hit.
                assert embedding is not None, f"no embedding for item at {item.offset}"
                rows = embedding[lo - item.offset : hi - item.offset]
                splices.append((int(cu[row]) + lo - start, rows))
    return splices


def pad_tokens(host: HostStepInputs, multiple: int) -> HostStepInputs:
    """The step with its token count rounded up to a multiple of `multiple`, the extra tokens
    forming one more request that writes no KV (slot -1) and reads only the null block (its
    block-table row is 0s). Nothing is read back from those rows: logits_indices and the
    multi-modal splices keep pointing at the real tokens, which come first.

    Why: every distinct token count is a new shape for each of the step's GEMMs, and cuBLAS
    picks a kernel for a new shape on the host, as the caching allocator sizes new blocks for
    new activation sizes (on an H200 host a GEMM launch took 0.1 ms for a row count seen
    before, 0.4 ms for a new one, allocator included). Rounded counts repeat, and the runner
    warms them all up at load (eager_shapes). Serving Qwen2.5-VL-7B image chats, the host time
    of a step with prompt tokens did not change measurably (docs/benchmarks.md): the rest of
    the eager forward's host time dominates it.
    """
    pad = -host.num_tokens % multiple
    if pad == 0:
        return host
    num_tokens = host.num_tokens
    pad_positions = np.arange(pad, dtype=np.int64)
    rope = host.rope_positions
    return HostStepInputs(
        token_ids=np.concatenate([host.token_ids, np.zeros(pad, np.int64)]),
        positions=np.concatenate([host.positions, pad_positions]),
        query_start_loc=np.append(host.query_start_loc, np.int32(num_tokens + pad)),
        seq_lens=np.append(host.seq_lens, np.int32(pad)),
        block_tables=np.vstack(
            [host.block_tables, np.zeros((1, host.block_tables.shape[1]), np.int32)]
        ),
        slot_mapping=np.concatenate([host.slot_mapping, np.full(pad, -1, np.int64)]),
        logits_indices=host.logits_indices,
        max_query_len=max(host.max_query_len, pad),
        max_seq_len=max(host.max_seq_len, pad),
        rope_positions=None
        if rope is None
        else np.concatenate([rope, np.broadcast_to(pad_positions, (rope.shape[0], pad))], 1),
        mm_splices=host.mm_splices,
    )


@dataclass
class DeviceStepInputs:
    token_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor


def to_device(host: HostStepInputs, device: torch.device) -> DeviceStepInputs:
    def move(array: np.ndarray) -> torch.Tensor:
        return copy_to_device(torch.from_numpy(array), device)

    attn = AttentionMetadata(
        query_start_loc=move(host.query_start_loc),
        seq_lens=move(host.seq_lens),
        block_tables=move(host.block_tables),
        slot_mapping=move(host.slot_mapping),
        max_query_len=host.max_query_len,
        max_seq_len=host.max_seq_len,
        is_decode_only=host.is_decode_only,
    )
    return DeviceStepInputs(
        token_ids=move(host.token_ids),
        positions=move(host.rope_positions if host.rope_positions is not None else host.positions),
        attn=attn,
        logits_indices=move(host.logits_indices),
    )
