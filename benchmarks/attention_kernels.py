"""Paged attention kernels on a GPU: correctness of triton vs torch, then decode/prefill timings.

    python3 benchmarks/attention_kernels.py            # ~1 minute on an H100
    python3 benchmarks/attention_kernels.py --sweep    # also try launch configs (tuning)

Geometry is Qwen2.5-7B's: 28 query heads, 4 kv heads, head_dim 128, block_size 16, bf16.
Decode GB/s counts the KV bytes each step must read (every request's whole context, K and V);
prefill TFLOP/s counts the causal half of QK^T and PV. Eager timings of small decode batches
are bound by host launch cost (also printed); the CUDA-graph rows are what the engine's
captured decode step sees.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omni.stages.llm.attention import AttentionMetadata, attend
from omni.stages.llm.attention.reference import RequestShape, build_paged_batch
from omni.stages.llm.attention.torch_backend import paged_attention_torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 28, 4, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
HBM_GBPS = 3000.0  # the H100's ~3 TB/s that the decode target is measured against


@dataclass
class Row:
    case: str
    impl: str
    ms: float
    metric: str


def bench(fn: Callable[[], object], reps: int = 50) -> float:
    """Median milliseconds, with the L2 flushed between runs (triton's do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median"))


def host_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """Wall milliseconds per call when launches queue back to back (host-side cost)."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e3 / calls


def capture_attend_graph(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture one decode step (cache write + attention) the way the engine will."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) outside the capture
        attend(query, key, value, kv_cache, meta, SCALE, "triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend(query, key, value, kv_cache, meta, SCALE, "triton")
    return graph, out


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).norm()
    return float(diff / expected.float().norm().clamp_min(1e-30))


def make_uniform_batch(
    batch: int, context: int, query_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A batch of equal requests built on the GPU (the CPU builder is too slow at this size).

    Each request's last `query_len` positions are new; blocks are a random permutation.
    """
    blocks_per_req = math.ceil(context / BLOCK_SIZE)
    num_blocks = 1 + batch * blocks_per_req
    gen = torch.Generator(device=device).manual_seed(0)
    perm = torch.randperm(num_blocks - 1, device=device, generator=gen) + 1
    block_tables = perm.view(batch, blocks_per_req).to(torch.int32)
    kv_cache = torch.randn(
        2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE
    )
    positions = torch.arange(context - query_len, context, device=device)
    slots = block_tables[:, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    num_tokens = batch * query_len
    meta = AttentionMetadata(
        query_start_loc=torch.arange(
            0, num_tokens + 1, query_len, device=device, dtype=torch.int32
        ),
        seq_lens=torch.full((batch,), context, device=device, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=slots.reshape(-1),
        max_query_len=query_len,
        max_seq_len=context,
        is_decode_only=query_len == 1,
    )
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    value = torch.randn_like(key)
    return query, key, value, kv_cache, meta


def check_correctness(device: torch.device) -> list[Row]:
    """Mixed batches (decode + prefix chunks + fresh prompts), triton vs torch backend."""
    rows = []
    shapes = [
        RequestShape(700, 1),
        RequestShape(3000, 1),
        RequestShape(0, 300),
        RequestShape(129, 64),
        RequestShape(16, 1),
        RequestShape(1000, 200),
    ]
    decode_only = [RequestShape(n, 1) for n in (5, 640, 4095, 17)]
    for name, reqs in (("mixed", shapes), ("decode", decode_only)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            b = build_paged_batch(
                reqs,
                num_heads=NUM_HEADS,
                num_kv_heads=NUM_KV_HEADS,
                head_dim=HEAD_DIM,
                block_size=BLOCK_SIZE,
                dtype=dtype,
                device=device,
                num_padding_tokens=3,
            )
            cache_t, cache_r = b.kv_cache.clone(), b.kv_cache.clone()
            out_t = attend(b.query, b.key, b.value, cache_t, b.meta, SCALE, "triton")
            out_r = attend(b.query, b.key, b.value, cache_r, b.meta, SCALE, "torch")
            torch.cuda.synchronize()
            err = rel_error(out_t, out_r)
            same_cache = torch.equal(cache_t, cache_r)
            ok = err < (1e-5 if dtype == torch.float32 else 1e-2) and same_cache
            print(
                f"correctness {name:6s} {dtype!s:15s} rel_err={err:.2e} "
                f"cache_equal={same_cache} {'OK' if ok else 'FAIL'}"
            )
            rows.append(
                Row(
                    f"check {name} {dtype}".replace("torch.", ""),
                    "triton vs torch",
                    0.0,
                    f"rel {err:.1e} {'OK' if ok else 'FAIL'}",
                )
            )
    return rows


def bench_decode(device: torch.device, batch: int, context: int) -> list[Row]:
    from omni.stages.llm.attention.triton_backend import paged_attention_triton

    query, key, value, kv_cache, meta = make_uniform_batch(batch, context, 1, device)
    attend(query, key, value, kv_cache, meta, SCALE, "triton")  # fills the new slots
    kv_bytes = batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * kv_cache.element_size()
    case = f"decode b={batch} ctx={context}"
    rows = []

    def gbps(ms: float) -> str:
        rate = kv_bytes / ms / 1e6
        return f"{rate:7.0f} GB/s ({rate / HBM_GBPS:4.0%} of {HBM_GBPS / 1e3:.0f} TB/s)"

    ms = bench(lambda: paged_attention_triton(query, kv_cache, meta, SCALE))
    rows.append(Row(case, "triton paged", ms, gbps(ms)))
    ms_attend = bench(lambda: attend(query, key, value, kv_cache, meta, SCALE, "triton"))
    rows.append(Row(case, "triton attend (+kv write)", ms_attend, gbps(ms_attend)))
    graph, graph_out = capture_attend_graph(query, key, value, kv_cache, meta)
    eager_out = attend(query, key, value, kv_cache, meta, SCALE, "triton")
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(graph_out, eager_out)
    ms = bench(graph.replay)
    rows.append(
        Row(
            case,
            "triton attend, CUDA graph",
            ms,
            gbps(ms) + ("" if same else "  FAIL graph != eager"),
        )
    )
    rows.append(
        Row(
            case,
            "host time per eager attend",
            host_ms(lambda: attend(query, key, value, kv_cache, meta, SCALE, "triton")),
            "(launch cost)",
        )
    )
    # Dense SDPA over contiguous per-request K/V: what an unpaged layout would cost.
    dense_k = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, device=device, dtype=DTYPE)
    dense_v = torch.randn_like(dense_k)
    q4 = query.view(batch, 1, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    ms = bench(lambda: F.scaled_dot_product_attention(q4, dense_k, dense_v, enable_gqa=True))
    rows.append(Row(case, "torch SDPA dense", ms, gbps(ms)))
    if batch <= 64:  # the per-request reference loop is slow at large batch
        ms = bench(lambda: paged_attention_torch(query, kv_cache, meta, SCALE), reps=20)
        rows.append(Row(case, "torch paged reference", ms, gbps(ms)))
    return rows


def bench_prefill(device: torch.device, batch: int, prompt: int) -> list[Row]:
    from omni.stages.llm.attention.triton_backend import paged_attention_triton

    query, key, value, kv_cache, meta = make_uniform_batch(batch, prompt, prompt, device)
    attend(query, key, value, kv_cache, meta, SCALE, "triton")
    flops = 4 * batch * NUM_HEADS * HEAD_DIM * prompt * (prompt + 1) / 2
    case = f"prefill {batch}x{prompt}"
    rows = []

    def tflops(ms: float) -> str:
        return f"{flops / ms / 1e9:7.1f} TFLOP/s"

    ms = bench(lambda: paged_attention_triton(query, kv_cache, meta, SCALE))
    rows.append(Row(case, "triton paged", ms, tflops(ms)))
    ms = bench(lambda: attend(query, key, value, kv_cache, meta, SCALE, "triton"))
    rows.append(Row(case, "triton attend (+kv write)", ms, tflops(ms)))
    q4 = query.view(batch, prompt, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    k4 = key.view(batch, prompt, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    v4 = value.view(batch, prompt, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ms = bench(
                lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)
            )
        rows.append(Row(case, "torch SDPA flash (dense)", ms, tflops(ms)))
    except RuntimeError as exc:
        print(f"SDPA flash unavailable: {exc}", file=sys.stderr)
    try:
        from torch.nn.attention.varlen import varlen_attn

        cu = meta.query_start_loc
        ms = bench(
            lambda: varlen_attn(
                query, key, value, cu, cu, prompt, prompt, window_size=(-1, 0), scale=SCALE
            )
        )
        rows.append(Row(case, "torch varlen_attn", ms, tflops(ms)))
    except (ImportError, RuntimeError) as exc:
        print(f"varlen_attn unavailable: {exc}", file=sys.stderr)
    return rows


def _sweep_configs(case: str) -> list[dict[str, int]]:
    """A small grid per case: each config is a fresh compile, so keep it to ~30."""
    grid: list[dict[str, int]] = []
    if case == "decode b=256 ctx=640":
        for tile in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3, 4):
                    grid.append(dict(block_m=16, tile=tile, num_warps=warps, num_stages=stages))
    elif case.startswith("decode"):
        for splits in (1, 2, 4, 8, 16, 32, 64):
            for tile in (32, 64):
                grid.append(dict(block_m=16, tile=tile, num_splits=splits, num_stages=3))
    else:
        for block_m in (64, 128):
            for tile in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        grid.append(
                            dict(block_m=block_m, tile=tile, num_warps=warps, num_stages=stages)
                        )
    return grid


def sweep(device: torch.device) -> None:
    """Try launch configs on the headline shapes; prints the best few of each."""
    from omni.stages.llm.attention.triton_backend import (
        AttentionLaunchConfig,
        paged_attention_triton,
    )

    cases = [
        ("decode b=256 ctx=640", 256, 640, 1),
        ("decode b=1 ctx=4096", 1, 4096, 1),
        ("decode b=64 ctx=4096", 64, 4096, 1),
        ("prefill 256x512", 256, 512, 512),
    ]
    q_per_kv = NUM_HEADS // NUM_KV_HEADS
    for name, batch, context, qlen in cases:
        query, key, value, kv_cache, meta = make_uniform_batch(batch, context, qlen, device)
        attend(query, key, value, kv_cache, meta, SCALE, "triton")
        results = []
        for params in _sweep_configs(name):
            cfg = AttentionLaunchConfig(block_q=params["block_m"] // q_per_kv, **params)

            def run(
                c: AttentionLaunchConfig = cfg,
                q: torch.Tensor = query,
                cache: torch.Tensor = kv_cache,
                m: AttentionMetadata = meta,
            ) -> object:
                return paged_attention_triton(q, cache, m, SCALE, c)

            try:
                ms = bench(run, reps=20)
            except Exception as exc:  # e.g. out of shared memory for a big tile
                print(f"  skip {cfg}: {type(exc).__name__}")
                continue
            results.append((ms, cfg))
        results.sort(key=lambda item: item[0])
        print(f"sweep {name}:")
        for ms, cfg in results[:6]:
            print(f"  {ms * 1e3:8.1f} us  {cfg}")
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="also try launch configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_kernels: no CUDA device; this benchmark needs a GPU.")
        return 0
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    rows = check_correctness(device)
    for batch in (1, 64, 256):
        for context in (640, 4096):
            rows += bench_decode(device, batch, context)
            torch.cuda.empty_cache()
    rows += bench_prefill(device, 256, 512)
    if args.sweep:
        sweep(device)
    print()
    print(f"{'case':28s} {'implementation':28s} {'ms':>9s}  result")
    for row in rows:
        ms = f"{row.ms:9.4f}" if row.ms else f"{'':9s}"
        print(f"{row.case:28s} {row.impl:28s} {ms}  {row.metric}")
    failed = any("FAIL" in row.metric for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
