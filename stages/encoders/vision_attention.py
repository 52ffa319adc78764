"""Packed attention for the Qwen2-VL / Qwen2.5-VL vision tower.

transformers' vision attention (without flash-attn) runs one SDPA call per segment of
`cu_seqlens`: per image in full-attention layers and, in Qwen2.5-VL, per 8x8-patch window in
the others. A batch of 32 448x448 images has 512 windows, so each window layer is 512 small
kernel launches and the tower runs far below the GPU's matmul rate. Here segments of equal
length are gathered into one `[segments, heads, length, head_dim]` batch and attended in a
single SDPA call per distinct length (usually one or two per layer), with the same math.

The gather plan depends only on `cu_seqlens`, which the tower passes unchanged to every layer
of a kind, so it is built once per forward and reused (a plan also costs a device-to-host
copy of the lengths, which would otherwise stall every layer).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RotaryFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class SegmentGroup:
    """Every segment of one length: `rows[i]` lists the token rows of the i-th segment."""

    length: int
    rows: torch.Tensor  # int64 [segments, length]
    # Where the segments lie back to back (the usual case: every window of same-size images,
    # or every image in full-attention layers), the first row; they are then a plain view of
    # the tokens and need no gather or scatter. None otherwise.
    start: int | None = None


class SegmentPlans:
    """Gather plans keyed by the identity of the `cu_seqlens` tensor they were built from.
    Holds the last few only: a forward uses one per attention kind.

    Kept per thread: the tower's CUDA graphs are captured on a thread of their own while the
    serving thread runs eager forwards, and a graph must be able to take the very plans its
    capture used (vision_graphs.py), which the other thread's forwards would otherwise evict."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._local = threading.local()

    def plan(self, cu_seqlens: torch.Tensor) -> list[SegmentGroup]:
        held: list[tuple[torch.Tensor, list[SegmentGroup]]] = getattr(self._local, "plans", [])
        for tensor, groups in held:
            if tensor is cu_seqlens:
                return groups
        groups = build_plan(cu_seqlens)
        # Holding the tensor keeps its identity from being reused by a new allocation.
        self._local.plans = [*held[-(self.capacity - 1) :], (cu_seqlens, groups)]
        return groups


def build_plan(cu_seqlens: torch.Tensor) -> list[SegmentGroup]:
    bounds = cu_seqlens.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    groups = []
    for length, starts in starts_by_length.items():
        offsets = torch.arange(length, device=cu_seqlens.device)
        first = torch.tensor(starts, device=cu_seqlens.device)
        back_to_back = all(b - a == length for a, b in itertools.pairwise(starts))
        groups.append(
            SegmentGroup(
                length, first[:, None] + offsets[None, :], starts[0] if back_to_back else None
            )
        )
    return groups


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    groups: list[SegmentGroup],
    scale: float,
) -> torch.Tensor:
    """Non-causal attention within each segment. q, k, v and the result are `[tokens, heads,
    head_dim]`; tokens outside every segment come back as zeros."""
    tokens = query.shape[0]
    if len(groups) == 1 and groups[0].start == 0 and groups[0].rows.numel() == tokens:
        # One run of equal segments over every token: views in, the result is the output.
        return _attend_run(query, key, value, groups[0], scale).reshape(query.shape)
    out = torch.zeros_like(query)
    for group in groups:
        if group.start is not None:
            end = group.start + group.rows.numel()
            out[group.start : end] = _attend_run(query, key, value, group, scale).reshape(
                end - group.start, *query.shape[1:]
            )
            continue
        # [segments, length, heads, dim] -> [segments, heads, length, dim]
        q, k, v = (t[group.rows].transpose(1, 2) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out[group.rows] = attended.transpose(1, 2)
    return out


def _attend_run(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group: SegmentGroup,
    scale: float,
) -> torch.Tensor:
    """Attention over a group of back-to-back segments, read as views: `[segments, length,
    heads, dim]`."""
    assert group.start is not None
    segments = group.rows.shape[0]
    end = group.start + segments * group.length
    q, k, v = (
        t[group.start : end].reshape(segments, group.length, *t.shape[1:]).transpose(1, 2)
        for t in (query, key, value)
    )
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


class PackedVisionAttention(nn.Module):
    """Drop-in for transformers' `VisionAttention` / `Qwen2_5_VLVisionAttention`, sharing its
    `qkv` and `proj` layers (so the checkpoint's weights stay where they were loaded)."""

    def __init__(self, original: nn.Module, rotary: RotaryFn, plans: SegmentPlans) -> None:
        super().__init__()
        # getattr: nn.Module's attribute typing would make these Tensor | Module.
        self.qkv: nn.Module = getattr(original, "qkv")  # noqa: B009
        self.proj: nn.Module = getattr(original, "proj")  # noqa: B009
        self.num_heads = int(getattr(original, "num_heads"))  # noqa: B009
        self.scaling = float(getattr(original, "scaling"))  # noqa: B009
        self.rotary = rotary
        self.plans = plans

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if position_embeddings is None:
            raise ValueError("the vision tower passed no rotary position embeddings")
        tokens = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1)
        query, key, value = qkv.unbind(1)
        cos, sin = position_embeddings
        query, key = self.rotary(query, key, cos, sin)
        attended = segment_attention(query, key, value, self.plans.plan(cu_seqlens), self.scaling)
        return self.proj(attended.reshape(tokens, -1))


def pack_vision_attention(tower: nn.Module, rotary: RotaryFn) -> int:
    """Replaces every block's attention in `tower` with `PackedVisionAttention`; returns how
    many were replaced."""
    plans = SegmentPlans()
    replaced = 0
    for block in getattr(tower, "blocks", ()):
        block.attn = PackedVisionAttention(block.attn, rotary, plans)
        replaced += 1
    return replaced
