"""Packed vision attention: one SDPA call per segment length equals one call per segment."""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from omni.stages.encoders.vision_attention import SegmentPlans, build_plan, segment_attention


def per_segment_reference(q, k, v, cu_seqlens, scale):
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        # transformers' layout: [1, heads, length, dim] per segment
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


def test_mixed_lengths_equal_one_call_per_segment() -> None:
    gen = torch.Generator().manual_seed(0)
    # windows of 4 and 6 tokens, an empty one, and a full image of 9, in mixed order
    cu_seqlens = torch.tensor([0, 4, 10, 10, 14, 23, 29], dtype=torch.int32)
    q, k, v = (torch.randn(29, 3, 8, generator=gen) for _ in range(3))
    groups = build_plan(cu_seqlens)
    assert sorted((g.length, g.rows.shape[0]) for g in groups) == [(4, 2), (6, 2), (9, 1)]
    # Only the lone 9-token segment lies back to back with itself: a view, not a gather.
    assert sorted((g.length, g.start) for g in groups if g.start is not None) == [(9, 14)]
    got = segment_attention(q, k, v, groups, 0.35)
    torch.testing.assert_close(got, per_segment_reference(q, k, v, cu_seqlens, 0.35))


def test_plans_are_reused_for_the_same_tensor_only() -> None:
    plans = SegmentPlans(capacity=2)
    window, full = torch.tensor([0, 2, 4]), torch.tensor([0, 4])
    first = plans.plan(window)
    assert plans.plan(window) is first
    assert plans.plan(full) is not first
    assert plans.plan(torch.tensor([0, 2, 4])) is not first  # equal values, another tensor


def test_one_threads_forwards_do_not_evict_another_threads_plans() -> None:
    import threading

    plans = SegmentPlans(capacity=2)
    mine = torch.tensor([0, 2, 4])
    first = plans.plan(mine)

    def other_thread() -> None:  # the serving thread's eager forwards, during a capture
        for end in (6, 8, 10):
            plans.plan(torch.tensor([0, end]))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert plans.plan(mine) is first
    plans.plan(torch.tensor([0, 1]))
    plans.plan(torch.tensor([0, 3]))
    assert plans.plan(mine) is not first  # its own thread's plans still evict it


def test_back_to_back_segments_are_views_equal_to_the_gather() -> None:
    gen = torch.Generator().manual_seed(1)
    # Same-size images: four windows of 6 tokens end to end, then two images of 12.
    windows = torch.tensor([0, 6, 12, 18, 24], dtype=torch.int32)
    images = torch.tensor([0, 12, 24], dtype=torch.int32)
    # q, k, v as the tower has them: views of one fused qkv output.
    q, k, v = torch.randn(24, 3, 2, 8, generator=gen).unbind(1)
    for cu_seqlens in (windows, images):
        groups = build_plan(cu_seqlens)
        assert [(g.start, g.rows.shape[0]) for g in groups] == [(0, len(cu_seqlens) - 1)]
        gathered = [dataclasses.replace(g, start=None) for g in groups]
        got = segment_attention(q, k, v, groups, 0.3)
        assert torch.equal(got, segment_attention(q, k, v, gathered, 0.3))
        torch.testing.assert_close(got, per_segment_reference(q, k, v, cu_seqlens, 0.3))
