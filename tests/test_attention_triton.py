"""The Triton kernels, run on the CPU by Triton's interpreter, against float64 and torch.

The interpreter executes every program of the grid in numpy, so the batches are small; the
same kernels are checked on a GPU by benchmarks/attention_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import (
    IN_INTERPRETER_CHILD,
    fix_interpreter_index,
    in_child_only,
    run_interpreter_child,
)

# Tests that launch kernels are named test_interpreter_* and run only in the child (see
# tests/triton_interpreter.py); in this process only the launcher and host-side tests run.
NUM_INTERPRETER_TESTS = 9
triton = pytest.importorskip("triton")

from omni.stages.llm.attention import attend  # noqa: E402
from omni.stages.llm.attention.reference import (  # noqa: E402
    RequestShape,
    build_paged_batch,
    naive_paged_attention,
)
from omni.stages.llm.attention.triton_backend import (  # noqa: E402
    MAX_SPLITS,
    AttentionLaunchConfig,
    choose_launch_config,
    paged_attention_triton,
    write_kv_cache_triton,
)


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="this is the launcher")
def test_kernels_in_child_process() -> None:
    run_interpreter_child(__file__, NUM_INTERPRETER_TESTS)


if IN_INTERPRETER_CHILD:
    fix_interpreter_index()

# Decode requests, chunks on cached prefixes, a fresh prompt, a request with no new tokens.
MIXED = [
    RequestShape(5, 1),
    RequestShape(140, 1),
    RequestShape(20, 7),
    RequestShape(0, 9),
    RequestShape(10, 0),
    RequestShape(33, 3),
]
DECODE = [RequestShape(3, 1), RequestShape(70, 1), RequestShape(17, 1)]

TOLERANCE = {  # (rtol, atol) against float64
    torch.float32: (1e-5, 2e-6),
    torch.float16: (2e-3, 2e-3),
    # The interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest), so
    # its error can reach a full bf16 ulp.
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@in_child_only
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        (4, 4, 64, 16, torch.float32),  # GQA ratio 1
        (4, 2, 128, 32, torch.bfloat16),  # ratio 2
        (14, 2, 64, 32, torch.float32),  # ratio 7: 14 of 16 tile rows used
        (14, 2, 128, 16, torch.bfloat16),
        (4, 2, 64, 16, torch.float16),
    ],
)
def test_interpreter_mixed_batch_matches_reference_and_torch_backend(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    batch = build_paged_batch(
        MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, num_padding_tokens=2, seed=2,
    )
    scale = head_dim**-0.5
    expected = naive_paged_attention(
        batch.query, batch.key, batch.value, batch.kv_cache, batch.meta, scale
    )
    cache_torch = batch.kv_cache.clone()
    out_torch = attend(batch.query, batch.key, batch.value, cache_torch, batch.meta, scale, "torch")
    out = attend(batch.query, batch.key, batch.value, batch.kv_cache, batch.meta, scale, "triton")

    assert torch.equal(batch.kv_cache, cache_torch)  # the write kernel is bit-exact
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.double(), out_torch.double(), rtol=rtol, atol=atol)
    assert torch.count_nonzero(out[-2:]) == 0  # padding past the last request


@in_child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreter_split_kv_matches_reference(dtype: torch.dtype) -> None:
    """Flash-decoding: 4 context slices of 16-position tiles, so the 3-token request leaves
    three slices empty (max -inf, weight 0) and the 70-token one spans all four."""
    batch = build_paged_batch(
        DECODE, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
        num_padding_tokens=1, seed=3,
    )
    scale = 0.125
    expected = naive_paged_attention(
        batch.query, batch.key, batch.value, batch.kv_cache, batch.meta, scale
    )
    write_kv_cache_triton(batch.key, batch.value, batch.kv_cache, batch.meta.slot_mapping)
    split = AttentionLaunchConfig(block_m=16, block_q=8, tile=16, num_splits=4)
    out = paged_attention_triton(batch.query, batch.kv_cache, batch.meta, scale, split)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    assert torch.count_nonzero(out[-1]) == 0


@in_child_only
def test_interpreter_write_kernel_skips_padding_and_touches_nothing_else() -> None:
    kv_cache = torch.zeros(2, 3, 4, 2, 16)
    key = torch.arange(3 * 2 * 16, dtype=torch.float32).view(3, 2, 16)
    value = -key
    slots = torch.tensor([5, -1, 11])
    write_kv_cache_triton(key, value, kv_cache, slots)
    expected = torch.zeros(2, 3, 4, 2, 16)
    expected[0, 1, 1], expected[1, 1, 1] = key[0], value[0]
    expected[0, 2, 3], expected[1, 2, 3] = key[2], value[2]
    assert torch.equal(kv_cache, expected)


def test_launch_config_for_long_single_decode_splits_the_context() -> None:
    cfg = choose_launch_config(
        num_heads=28, num_kv_heads=4, max_query_len=1, max_seq_len=4096, num_reqs=1, num_sms=132
    )
    assert (cfg.block_m, cfg.block_q, cfg.tile, cfg.num_splits) == (16, 2, 64, 16)


def test_launch_config_for_big_decode_batch_does_not_split() -> None:
    cfg = choose_launch_config(
        num_heads=28, num_kv_heads=4, max_query_len=1, max_seq_len=640, num_reqs=256,
        num_sms=132,
    )
    assert (cfg.block_m, cfg.block_q, cfg.num_splits) == (16, 2, 1)


def test_launch_config_for_prefill_packs_query_tokens() -> None:
    cfg = choose_launch_config(
        num_heads=28, num_kv_heads=4, max_query_len=512, max_seq_len=512, num_reqs=256,
        num_sms=132,
    )
    assert (cfg.block_m, cfg.block_q, cfg.tile, cfg.num_splits) == (128, 18, 32, 1)
    short = choose_launch_config(
        num_heads=4, num_kv_heads=4, max_query_len=3, max_seq_len=50, num_reqs=2, num_sms=132
    )
    assert (short.block_m, short.block_q) == (16, 16)


def test_launch_config_rejects_bad_tiles() -> None:
    with pytest.raises(ValueError, match="tile is 24; it must be a power of two >= 16"):
        AttentionLaunchConfig(block_m=16, block_q=2, tile=24)
    with pytest.raises(ValueError, match="num_splits is 3"):
        AttentionLaunchConfig(block_m=16, block_q=2, tile=16, num_splits=3)


def test_triton_rejects_cache_dtype_unlike_query() -> None:
    batch = build_paged_batch(
        DECODE, num_heads=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32
    )
    with pytest.raises(ValueError, match=r"kv_cache dtype torch\.float16 to match query"):
        attend(batch.query, batch.key, batch.value, batch.kv_cache.half(), batch.meta, 1.0,
               "triton")
    assert MAX_SPLITS == 64


@in_child_only
def test_interpreter_mla_absorbed_attention_matches_expanded() -> None:
    # MLA's GPU path: the one latent plane passed as both key and value plane of the unified
    # kernel (a 40-dim latent, padded to 64), against the expanded CPU path.
    from omni.stages.llm.attention.mla import (
        attend_mla_absorbed,
        attend_mla_expanded,
        write_latent_cache,
    )
    from omni.stages.llm.attention.triton_backend import paged_attention_mla_triton

    heads, nope, rope, v_dim, rank = 4, 16, 8, 12, 32
    batch = build_paged_batch(
        MIXED, num_heads=heads, num_kv_heads=1, head_dim=rank + rope, block_size=16,
        dtype=torch.float32, seed=5,
    )
    gen = torch.Generator().manual_seed(6)
    cache = batch.kv_cache[:1].clone()
    num_tokens = batch.query.shape[0]
    write_latent_cache(torch.randn(num_tokens, rank, generator=gen),
                       torch.randn(num_tokens, rope, generator=gen), cache, batch.meta.slot_mapping)
    q_nope = torch.randn(num_tokens, heads, nope, generator=gen)
    q_pe = torch.randn(num_tokens, heads, rope, generator=gen)
    kv_b = torch.randn(heads * (nope + v_dim), rank, generator=gen) / rank**0.5
    scale = (nope + rope) ** -0.5
    expected = attend_mla_expanded(q_nope, q_pe, cache, batch.meta, kv_b, scale)
    out = attend_mla_absorbed(q_nope, q_pe, cache, batch.meta, kv_b, scale,
                              paged_attention_mla_triton)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="compiles for CUDA; the child interprets")
def test_mla_tiles_compile_for_sm90_within_shared_memory() -> None:
    # DeepSeek-V2-Lite's absorbed attention: 16 query heads over one 576-dim kv head (padded
    # to 1024). The default tiles would not fit an SM; mla_launch_config's must.
    from omni.stages.llm.attention import triton_kernels
    from omni.stages.llm.attention.triton_backend import mla_launch_config
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = mla_launch_config(16)
    assert config.num_stages == 2 and mla_launch_config(16, 576, 4).num_stages == 1
    pointers = ["out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr"]
    signature = {
        **dict.fromkeys(pointers, "*bf16"),
        "block_tables_ptr": "*i32",
        "seq_lens_ptr": "*i32",
        "query_start_loc_ptr": "*i32",
        **dict.fromkeys(["partial_out_ptr", "partial_max_ptr", "partial_sum_ptr"], "*fp32"),
        "scale_log2": "fp32",
        **dict.fromkeys(
            ["num_reqs", "q_stride_token", "q_stride_head", "out_stride_token",
             "out_stride_head", "block_table_stride", "cache_stride_block",
             "cache_stride_offset", "cache_stride_head"],
            "i32",
        ),
    }
    constexprs = {
        "NUM_HEADS": 16, "Q_PER_KV": 16, "HEAD_DIM": 576, "HEAD_DIM_PAD": 1024,
        "BLOCK_SIZE": 16, "TILE": config.tile, "BLOCK_Q": config.block_q,
        "BLOCK_M": config.block_m, "NUM_SPLITS": 1, "DOT_PRECISION": "tf32",
        "DOT_IN_FP32": False,
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=triton_kernels.unified_attention_kernel, signature=signature,
                       constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert 0 < compiled.metadata.shared <= 227 * 1024
