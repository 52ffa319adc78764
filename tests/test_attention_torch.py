"""The torch attention backend against a float64 reference and hand-computed values."""

from __future__ import annotations

import pytest
import torch
from omni.stages.llm.attention import AttentionMetadata, attend
from omni.stages.llm.attention.reference import (
    PagedBatch,
    RequestShape,
    build_paged_batch,
    naive_paged_attention,
)
from omni.stages.llm.attention.torch_backend import write_kv_cache_torch

# Decode requests, prefill chunks on top of cached prefixes, a fresh prompt, a request with
# no new tokens this step, and a prompt that ends exactly on a block boundary.
MIXED = [
    RequestShape(5, 1),
    RequestShape(40, 1),
    RequestShape(20, 7),
    RequestShape(0, 9),
    RequestShape(10, 0),
    RequestShape(33, 3),
    RequestShape(0, 32),
]

TOLERANCE = {  # (rtol, atol) against float64, set by each dtype's output rounding
    torch.float32: (1e-5, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def _run(batch: PagedBatch, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    expected = naive_paged_attention(
        batch.query, batch.key, batch.value, batch.kv_cache, batch.meta, scale
    )
    out = attend(batch.query, batch.key, batch.value, batch.kv_cache, batch.meta, scale, "torch")
    return out, expected


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    [(4, 4, 64, 16), (4, 2, 128, 32), (14, 2, 64, 16), (14, 2, 128, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_batch_matches_float64_reference(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    batch = build_paged_batch(
        MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, num_padding_tokens=2, seed=1,
    )
    scale = head_dim**-0.5
    out, expected = _run(batch, scale)
    assert out.dtype == dtype and out.shape == batch.query.shape
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    # Padding tokens past the last request come back as exact zeros.
    assert torch.count_nonzero(out[-2:]) == 0


def test_cache_write_lands_in_slots_and_skips_padding() -> None:
    kv_cache = torch.zeros(2, 3, 4, 1, 2)
    key = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])
    value = -key
    slot_mapping = torch.tensor([5, -1, 11])  # block 1 offset 1; padding; block 2 offset 3
    write_kv_cache_torch(key, value, kv_cache, slot_mapping)
    expected = torch.zeros(2, 3, 4, 1, 2)
    expected[0, 1, 1, 0] = torch.tensor([1.0, 2.0])
    expected[1, 1, 1, 0] = torch.tensor([-1.0, -2.0])
    expected[0, 2, 3, 0] = torch.tensor([5.0, 6.0])
    expected[1, 2, 3, 0] = torch.tensor([-5.0, -6.0])
    assert torch.equal(kv_cache, expected)


def test_causal_mask_is_bottom_right_aligned() -> None:
    """With zero queries every visible key weighs the same, so the output is the mean of
    the visible values: value = position makes the visible span readable off the output."""
    block_size, prefix_len, query_len = 4, 6, 3
    seq_len = prefix_len + query_len
    kv_cache = torch.zeros(2, 4, block_size, 1, 1)
    block_table = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    for pos in range(prefix_len):
        kv_cache[1, int(block_table[0, pos // block_size]), pos % block_size] = float(pos)
    positions = torch.arange(prefix_len, seq_len)
    slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, query_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=block_table,
        slot_mapping=slots,
        max_query_len=query_len,
        max_seq_len=seq_len,
    )
    query = torch.zeros(query_len, 1, 1)
    key = torch.zeros(query_len, 1, 1)
    value = positions.float().view(query_len, 1, 1)
    out = attend(query, key, value, kv_cache, meta, 1.0, "torch")
    # Token i sits at position 6 + i and sees positions 0..6+i: mean (6 + i) / 2.
    torch.testing.assert_close(out.flatten(), torch.tensor([3.0, 3.5, 4.0]), rtol=0, atol=1e-6)
    assert kv_cache[1, 2, 0, 0, 0].item() == 8.0  # position 8 went to block 2, offset 0


def test_gqa_maps_query_heads_to_their_group() -> None:
    """Query head h reads kv head h // (num_heads // num_kv_heads)."""
    kv_cache = torch.zeros(2, 2, 4, 2, 1)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        block_tables=torch.tensor([[1]], dtype=torch.int32),
        slot_mapping=torch.tensor([4]),
        max_query_len=1,
        max_seq_len=1,
        is_decode_only=True,
    )
    value = torch.tensor([[[10.0], [20.0]]])  # kv head 0 -> 10, kv head 1 -> 20
    out = attend(torch.ones(1, 6, 1), torch.ones(1, 2, 1), value, kv_cache, meta, 1.0, "torch")
    assert out.flatten().tolist() == [10.0, 10.0, 10.0, 20.0, 20.0, 20.0]


def _tiny_batch() -> PagedBatch:
    return build_paged_batch(
        [RequestShape(3, 2)], num_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
        dtype=torch.float32,
    )


def test_unknown_backend_is_rejected() -> None:
    b = _tiny_batch()
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        attend(b.query, b.key, b.value, b.kv_cache, b.meta, 1.0, "cuda")


def test_mismatched_key_shape_is_rejected() -> None:
    b = _tiny_batch()
    with pytest.raises(ValueError, match=r"key must be \(2, 2, 8\), got \(2, 4, 8\)"):
        attend(b.query, b.query, b.value, b.kv_cache, b.meta, 1.0, "torch")


def test_heads_not_a_multiple_of_kv_heads_is_rejected() -> None:
    b = _tiny_batch()
    query = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="num_heads 3 is not a multiple of num_kv_heads 2"):
        attend(query, b.key, b.value, b.kv_cache, b.meta, 1.0, "torch")


def test_query_longer_than_context_is_rejected() -> None:
    b = _tiny_batch()
    b.meta.seq_lens = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match="request 0 has 2 new tokens but seq_len 1"):
        attend(b.query, b.key, b.value, b.kv_cache, b.meta, 1.0, "torch")


def test_unsupported_dtype_is_rejected() -> None:
    b = _tiny_batch()
    with pytest.raises(ValueError, match=r"query dtype torch\.float64"):
        attend(b.query.double(), b.key, b.value, b.kv_cache, b.meta, 1.0, "torch")
