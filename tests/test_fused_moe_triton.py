"""The fused mixture-of-experts Triton kernel, run on the CPU by Triton's interpreter, against
the torch path (`fused_moe_torch`), and compiled for sm_90 as the H100/H200 will run it.

As in test_attention_triton.py, TRITON_INTERPRET must be set before triton is first imported,
so the kernel tests (named test_interpreter_*) run in a child pytest with the variable set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from triton_interpreter import (
    IN_INTERPRETER_CHILD,
    fix_interpreter_index,
    in_child_only,
    run_interpreter_child,
)

NUM_INTERPRETER_TESTS = 11
triton = pytest.importorskip("triton")

from omni.stages.llm.models.fused_moe_kernels import (  # noqa: E402
    align_rows_kernel,
    fused_moe_kernel,
    softmax_topk_kernel,
)
from omni.stages.llm.models.fused_moe_triton import (  # noqa: E402
    MoELaunchConfig,
    align_rows_by_expert,
    align_rows_by_expert_torch,
    choose_moe_config,
    fused_moe_triton,
    softmax_topk_triton,
)
from omni.stages.llm.models.moe import Routing, fused_moe_torch  # noqa: E402


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="this is the launcher")
def test_kernels_in_child_process() -> None:
    run_interpreter_child(__file__, NUM_INTERPRETER_TESTS)


if IN_INTERPRETER_CHILD:
    fix_interpreter_index()


def moe_inputs(
    num_tokens: int,
    hidden: int,
    intermediate: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=gen) / intermediate**0.5
    # Skewed logits, so some experts get many rows (several tiles) and some none.
    bias = torch.linspace(2.0, -2.0, num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=gen) + bias
    weights, ids = Routing(top_k=top_k, renormalize=True).select(logits)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), ids, weights


# ---- the row sort (the torch reference runs in this process) -------------------------------


def test_align_sorts_rows_by_expert_and_pads_each_run_to_a_tile() -> None:
    # 4 tokens x top-2 = rows 0..7; expert 3 of 4 is never chosen; -1 is held elsewhere.
    topk_ids = torch.tensor([[2, 0], [0, 2], [2, -1], [1, 2]])
    aligned = align_rows_by_expert_torch(topk_ids, num_experts=4, block_m=2)
    pad = 8  # num_rows: the padding marker
    # expert 0: rows 1, 2 | expert 1: row 6, pad | expert 2: rows 0, 3, 4, 7 | (3: none)
    assert aligned.num_padded_rows.tolist() == [8]
    assert aligned.sorted_rows[:8].tolist() == [1, 2, 6, pad, 0, 3, 4, 7]
    assert aligned.tile_expert[:4].tolist() == [0, 1, 2, 2]
    # Worst case: 8 rows + 4 experts x 1 short = 12 slots; the rest is padding.
    assert aligned.sorted_rows.shape == (12,) and aligned.num_tiles == 6
    assert aligned.sorted_rows[8:].tolist() == [pad] * 4


def test_tile_choice_follows_rows_per_expert() -> None:
    # Qwen3-30B-A3B (128 experts of 768, top 8) takes vLLM's measured H200 table by the
    # nearest token count: a 256-row decode batch, one token, a prefill chunk of 8192.
    assert choose_moe_config(256, 128, 768, 8) == MoELaunchConfig(32, 256, 128, 16, 4, 2)
    assert choose_moe_config(1, 128, 768, 8) == MoELaunchConfig(16, 64, 64, 1, 4, 5)
    assert choose_moe_config(8192, 128, 768, 8) == MoELaunchConfig(128, 256, 64, 16, 8, 4)
    # Other geometries by rows per expert (DeepSeek-V2-Lite: 64 experts of 1408, top 6).
    assert choose_moe_config(100, 64, 1408, 6).block_m == 16
    assert choose_moe_config(256, 64, 1408, 6).block_m == 32
    assert choose_moe_config(8192, 64, 1408, 6).block_m == 64
    # Every tuned shape's pipeline fits an H100/H200 SM's 227 KiB of shared memory; float32
    # models get narrower K slices so theirs does too (32 x 128 x 128 would take 240 KiB).
    tuned = {choose_moe_config(t, 128, 768, 8) for t in range(1, 5000, 7)}
    assert len(tuned) >= 10
    assert max(c.shared_memory_bytes() for c in tuned) <= 200 * 1024
    for geometry in ((128, 768, 8), (64, 1408, 6), (8, 32, 2)):
        for tokens in (1, 256, 8192):
            wide = choose_moe_config(tokens, *geometry, element_size=4)
            assert wide.shared_memory_bytes(4) <= 200 * 1024, (geometry, tokens)
    assert choose_moe_config(256, 64, 1408, 6, element_size=4).block_k == 64
    with pytest.raises(ValueError, match="block_k is 24; it must be a power of two >= 16"):
        MoELaunchConfig(block_m=16, block_n=32, block_k=24)
    with pytest.raises(ValueError, match="block_n is 16; it must be a power of two >= 32"):
        MoELaunchConfig(block_m=16, block_n=16, block_k=32)


# ---- the kernel under the interpreter ------------------------------------------------------

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


@in_child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    [
        # Hidden 48 and intermediate 40 are not multiples of the tiles: masked edges.
        MoELaunchConfig(block_m=16, block_n=32, block_k=32),
        MoELaunchConfig(block_m=32, block_n=64, block_k=16, group_m=2),
    ],
)
def test_interpreter_kernel_matches_torch_path(
    dtype: torch.dtype, config: MoELaunchConfig
) -> None:
    x, w13, w2, ids, weights = moe_inputs(19, 48, 40, 6, 3, dtype, seed=4)
    out = fused_moe_triton(x, w13, w2, ids, weights.to(dtype), config)
    expected = fused_moe_torch(x, w13, w2, ids, weights.to(dtype))
    assert out.dtype == dtype and out.shape == (19, 48)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol)


@in_child_only
@pytest.mark.parametrize(("num_tokens", "num_experts", "block_m"), [(37, 6, 16), (300, 10, 4)])
def test_interpreter_align_kernel_places_rows_like_torch(
    num_tokens: int, num_experts: int, block_m: int
) -> None:
    # More rows than one 1024-wide loop step (the second case), ids held elsewhere (-1), an
    # expert nobody chose, and experts padded by several tiles.
    gen = torch.Generator().manual_seed(num_tokens)
    topk_ids = torch.randint(-1, num_experts - 1, (num_tokens, 4), generator=gen)
    expected = align_rows_by_expert_torch(topk_ids, num_experts, block_m)
    aligned = align_rows_by_expert(topk_ids, num_experts, block_m)
    total = int(expected.num_padded_rows)
    assert aligned.num_padded_rows.tolist() == [total]
    assert torch.equal(aligned.tile_expert[: total // block_m],
                       expected.tile_expert[: total // block_m])
    assert aligned.sorted_rows.shape == expected.sorted_rows.shape
    # The same rows in each expert's run (their order within it is the atomics' to pick),
    # and padding everywhere else.
    tile_experts = expected.tile_expert[: total // block_m].tolist()
    for expert in set(tile_experts):
        run = [t for t, e in enumerate(tile_experts) if e == expert]
        start, end = run[0] * block_m, (run[-1] + 1) * block_m
        got, want = aligned.sorted_rows[start:end], expected.sorted_rows[start:end]
        assert sorted(got.tolist()) == sorted(want.tolist()), expert
    assert (aligned.sorted_rows[total:] == topk_ids.numel()).all()


@in_child_only
@pytest.mark.parametrize(
    "routing",
    [
        Routing(top_k=2, renormalize=True),  # Qwen3-MoE: weights back in the model dtype
        Routing(top_k=4, scaling=1.5, float32_logits=True),  # DeepSeek's greedy: float32
    ],
)
def test_interpreter_routing_kernel_matches_torch(routing: Routing) -> None:
    gen = torch.Generator().manual_seed(routing.top_k)
    # 60 experts (Qwen1.5-MoE's count): padded to 64 in the kernel. Each row a permutation
    # of distinct multiples of 1/8, exact in bf16: no ties, which either side may break its
    # own way.
    logits = torch.stack([torch.randperm(60, generator=gen) for _ in range(37)]) / 8 - 3.0
    if not routing.float32_logits:
        logits = logits.to(torch.bfloat16)
    expected_weights, expected_ids = routing.select(logits)
    dtype = expected_weights.dtype
    weights, ids = softmax_topk_triton(
        logits, routing.top_k, routing.renormalize, routing.scaling, dtype
    )
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    assert torch.equal(ids, expected_ids)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(weights.float(), expected_weights.float(), rtol=rtol, atol=atol)


@in_child_only
def test_interpreter_dropped_experts_contribute_nothing() -> None:
    # Expert parallelism: ids -1 (held by another rank) are skipped, as the torch path does.
    x, w13, w2, ids, weights = moe_inputs(9, 32, 16, 4, 2, torch.float32, seed=5)
    ids = torch.where(ids == 1, -1, ids)
    config = MoELaunchConfig(block_m=16, block_n=32, block_k=16)
    out = fused_moe_triton(x, w13, w2, ids, weights, config)
    torch.testing.assert_close(out, fused_moe_torch(x, w13, w2, ids, weights), rtol=1e-5, atol=1e-5)


@in_child_only
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_interpreter_model_forward_wired_to_the_kernel(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CUDA wiring of a whole model (stacked weights straight from the loader, routing
    # weights in the model dtype or float32, shared experts beside the kernel's output) runs
    # only on a GPU; here fused_moe is pointed at the kernel for CPU tensors, and a prefill
    # and a decode step are compared with the torch path. DeepSeek also attends through the
    # Triton backend: MLA's absorbed form over the latent cache.
    from fixtures_models import PagedRequest, build_meta, make_tiny_checkpoint, new_caches
    from omni.stages.llm.models import load_model, moe

    model, _ = load_model(str(make_tiny_checkpoint(arch, tmp_path / arch)))
    prompt, next_token = torch.tensor([5, 17, 3, 250, 9, 41, 8]), torch.tensor([77])

    def prefill_then_decode(backend: str) -> torch.Tensor:
        caches, request = new_caches(model), PagedRequest([3, 1, 6])
        with torch.no_grad():
            prefill = model(prompt, torch.arange(7), caches, build_meta([request], [7]), backend)
            decode = model(
                next_token, torch.tensor([7]), caches, build_meta([request], [1]), backend
            )
        return torch.cat([prefill, decode])

    expected = prefill_then_decode("torch")
    monkeypatch.setattr(moe, "use_moe_kernels", lambda tensor: True)
    fused = prefill_then_decode("triton" if arch == "deepseek_v2" else "torch")
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)


# ---- compiled for the GPU ------------------------------------------------------------------


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="compiles for CUDA; the child interprets")
def test_kernel_compiles_for_sm90_within_shared_memory() -> None:
    # The tile shapes choose_moe_config picks for one token, a 256-token decode batch and a
    # prefill chunk, for both GEMMs of Qwen3-30B-A3B's geometry, built for sm_90 on this
    # GPU-less machine (Triton ships ptxas): each compiles, uses the tensor cores (wgmma or
    # mma), and fits an H100/H200 SM's 227 KiB of shared memory, which a launch would
    # otherwise refuse only on the GPU.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        **dict.fromkeys(
            ["a_ptr", "w_ptr", "c_ptr"], "*bf16"
        ),
        "topk_weights_ptr": "*fp32",
        "sorted_rows_ptr": "*i32",
        "tile_expert_ptr": "*i32",
        "num_padded_rows_ptr": "*i32",
        **dict.fromkeys(
            ["num_rows", "num_tiles_m", "N", "K", "stride_a_row", "stride_w_expert",
             "stride_w_n", "stride_c_row"],
            "i32",
        ),
    }
    configs = {choose_moe_config(tokens, 128, 768, 8) for tokens in (1, 256, 8192)}
    assert len(configs) == 3
    for config in configs:
        for gated in (True, False):
            constexprs = {
                "A_ROWS_PER_ROW": 8 if gated else 1,
                "GATED": gated,
                "MUL_ROUTED_WEIGHT": not gated,
                "BLOCK_M": config.block_m,
                "BLOCK_N": config.block_n // 2 if gated else config.block_n,
                "BLOCK_K": config.block_k,
                "GROUP_M": config.group_m,
                "DOT_PRECISION": "tf32",
                "DOT_IN_FP32": False,
            }
            full_signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
            source = ASTSource(fn=fused_moe_kernel, signature=full_signature,
                               constexprs=constexprs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            ptx = str(compiled.asm["ptx"])
            assert "wgmma" in ptx or "mma.sync" in ptx, (config, gated)
            assert 0 < compiled.metadata.shared <= 227 * 1024, (config, gated)

    # The row sort, as align_rows_by_expert launches it for 128 experts.
    align_signature = {
        "topk_ids_ptr": "*i64",
        **dict.fromkeys(["counts_ptr", "cursor_ptr", "sorted_rows_ptr", "tile_expert_ptr",
                         "num_padded_rows_ptr"], "*i32"),
        "num_rows": "i32",
        "max_padded": "i32",
    }
    constexprs = {"NUM_EXPERTS": 128, "EXPERTS_PAD": 128, "BLOCK_M": 16, "BLOCK": 1024,
                  "BLOCK_TILES": 64}
    align_signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=align_rows_kernel, signature=align_signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    ptx = str(compiled.asm["ptx"])
    assert "atom.global" in ptx and "bar.sync" in ptx

    # Routing for Qwen3-30B-A3B: bf16 logits over 128 experts, top 8, renormalised.
    routing_signature = {"logits_ptr": "*bf16", "weights_ptr": "*bf16", "ids_ptr": "*i64",
                         "num_tokens": "i32", "stride_logits": "i32", "scaling": "fp32"}
    constexprs = {"NUM_EXPERTS": 128, "EXPERTS_PAD": 128, "TOP_K": 8, "TOP_K_PAD": 8,
                  "RENORMALIZE": True, "BLOCK_T": 32}
    routing_signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=softmax_topk_kernel, signature=routing_signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
