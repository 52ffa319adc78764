"""Host side of the fused mixture-of-experts path: sorting rows by expert, tile sizes, launches.

`fused_moe_triton` runs an MoE layer's experts in two grouped GEMMs (see fused_moe_kernels.py):

    rows = T * top_k (token t's k-th choice is row t * top_k + k)
    1. align:   sort the rows by expert, pad each expert's run to a multiple of BLOCK_M
    2. GEMM 1:  act[r]  = silu(x[r // top_k] @ w13[e_r, :I]^T) * (x[r // top_k] @ w13[e_r, I:]^T)
    3. GEMM 2:  out[r]  = topk_weight[r] * act[r] @ w2[e_r]^T
    4. reduce:  y[t]    = sum_k out[t * top_k + k]

Routing (softmax, top-k, renormalisation) and the sort are one small kernel each
(`softmax_topk_kernel`, `align_rows_kernel`): in torch they are some 40 kernels of a few
microseconds each a layer, by estimate (not measured) several milliseconds of a 48-layer
decode step, CUDA graph or not. Every size here comes from
host ints and nothing reads a device value back, so a decode step with MoE layers can be
captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
from omni.stages.llm.models.fused_moe_kernels import (
    align_rows_kernel,
    fused_moe_kernel,
    softmax_topk_kernel,
)

# tl.dot needs at least 16 rows, columns and inner elements.
MIN_DOT_DIM = 16


@dataclass(frozen=True)
class MoELaunchConfig:
    """Tile shape of both grouped GEMMs (they share the row sort, so they share BLOCK_M).

    block_n counts output columns of the projection: of w2, or of w13's gate and up together
    (vLLM's convention), so the gated GEMM gives each half block_n // 2 columns.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name, least in (("block_m", MIN_DOT_DIM), ("block_n", 2 * MIN_DOT_DIM),
                            ("block_k", MIN_DOT_DIM)):  # fmt: skip
            value = getattr(self, name)
            if value < least or value & (value - 1):
                raise ValueError(f"{name} is {value}; it must be a power of two >= {least}")
        if self.group_m < 1:
            raise ValueError(f"group_m is {self.group_m}; it must be >= 1")

    def shared_memory_bytes(self, element_size: int = 2) -> int:
        """What the software pipeline keeps in shared memory: num_stages copies of an A tile
        and a weight tile."""
        per_stage = self.block_m * self.block_k + self.block_k * self.block_n
        return self.num_stages * per_stage * element_size


# The tile shapes vLLM's tuning measured fastest on an H200 for 128 experts of intermediate
# size 768 in bf16 (Qwen3-30B-A3B on one GPU; vLLM's
# fused_moe/configs/E=128,N=768,device_name=NVIDIA_H200.json), by the number of tokens in
# the batch: (block_m, block_n, block_k, group_m, num_warps, num_stages). A batch takes the
# entry with the nearest token count, as vLLM does.
_TUNED_E128_I768 = {
    1: (16, 64, 64, 1, 4, 5),
    2: (16, 64, 64, 1, 4, 4),
    4: (16, 64, 128, 16, 4, 2),
    8: (16, 64, 128, 1, 4, 3),
    16: (16, 64, 256, 1, 4, 2),
    24: (16, 64, 128, 1, 4, 4),
    32: (16, 64, 128, 16, 4, 2),
    48: (16, 128, 128, 16, 4, 3),
    64: (16, 256, 128, 1, 8, 2),
    96: (16, 128, 128, 1, 4, 2),
    128: (16, 128, 128, 1, 4, 2),
    256: (32, 256, 128, 16, 4, 2),
    512: (64, 128, 64, 1, 4, 3),
    1024: (128, 256, 64, 16, 8, 4),
    1536: (128, 256, 64, 1, 8, 4),
    2048: (128, 256, 64, 1, 8, 4),
    3072: (128, 256, 64, 1, 8, 4),
    4096: (128, 256, 64, 16, 8, 4),
}


# What the pipeline may keep in shared memory: an H100/H200 SM has 227 KiB, and Triton needs
# some beside the pipelined tiles.
SHARED_MEMORY_BUDGET = 200 * 1024


@functools.lru_cache(maxsize=256)
def choose_moe_config(
    num_tokens: int, num_experts: int, intermediate_size: int, top_k: int, element_size: int = 2
) -> MoELaunchConfig:
    """Tiles for a batch of `num_tokens` tokens of `element_size`-byte values.

    Qwen3-30B-A3B's geometry takes vLLM's measured H200 table. Any other falls back to tiles
    by rows per expert: a few (decode) get BLOCK_M 16, the smallest tile the tensor cores
    take, so padding wastes little, and wide BLOCK_K slices to stream the weights, which
    dominate the traffic; hundreds (prefill) get 64-row tiles that reuse each weight tile over
    many rows, with GROUP_M ordering to keep weight tiles in L2 across neighbours. Wider
    values (float32) get narrower BLOCK_K slices until the pipeline fits shared memory.
    """
    config = _tiles_for(num_tokens, num_experts, intermediate_size, top_k)
    while (
        config.shared_memory_bytes(element_size) > SHARED_MEMORY_BUDGET
        and config.block_k > MIN_DOT_DIM
    ):
        config = dataclasses.replace(config, block_k=config.block_k // 2)
    return config


def _tiles_for(
    num_tokens: int, num_experts: int, intermediate_size: int, top_k: int
) -> MoELaunchConfig:
    if (num_experts, intermediate_size) == (128, 768):
        nearest = min(_TUNED_E128_I768, key=lambda tokens: abs(tokens - num_tokens))
        block_m, block_n, block_k, group_m, warps, stages = _TUNED_E128_I768[nearest]
        return MoELaunchConfig(block_m, block_n, block_k, group_m, warps, stages)
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        return MoELaunchConfig(block_m=16, block_n=128, block_k=128, group_m=1, num_warps=4)
    if rows_per_expert <= 96:
        return MoELaunchConfig(block_m=32, block_n=128, block_k=128, group_m=8, num_warps=4)
    return MoELaunchConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8)


@dataclass(frozen=True)
class AlignedRows:
    """The rows sorted by expert, each expert's run padded to a multiple of block_m.

    sorted_rows: int32 [max_padded]; a row index, or num_rows for padding.
    tile_expert: int32 [max_padded // block_m]; the expert of each BLOCK_M tile.
    num_padded_rows: int32 [1]; where the last expert's padded run ends (a device value).
    """

    sorted_rows: torch.Tensor
    tile_expert: torch.Tensor
    num_padded_rows: torch.Tensor
    block_m: int

    @property
    def num_tiles(self) -> int:
        return int(self.tile_expert.shape[0])


def _max_padded_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """Slots for the worst case, every expert's run one row short of a full tile."""
    return triton.cdiv(num_rows + num_experts * (block_m - 1), block_m) * block_m


def align_rows_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRows:
    """Sort the T * top_k rows by expert: one Triton program (`align_rows_kernel`). Within an
    expert the rows' order may vary from run to run; everything else equals
    `align_rows_by_expert_torch`."""
    flat = topk_ids.reshape(-1)
    num_rows = flat.numel()
    device = flat.device
    max_padded = _max_padded_rows(num_rows, num_experts, block_m)
    experts_pad = triton.next_power_of_2(num_experts)
    counts = torch.empty(experts_pad, dtype=torch.int32, device=device)
    cursor = torch.empty(experts_pad, dtype=torch.int32, device=device)
    sorted_rows = torch.empty(max_padded, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded_rows = torch.empty(1, dtype=torch.int32, device=device)
    align_rows_kernel[(1,)](
        flat,
        counts,
        cursor,
        sorted_rows,
        tile_expert,
        num_padded_rows,
        num_rows,
        max_padded,
        NUM_EXPERTS=num_experts,
        EXPERTS_PAD=experts_pad,
        BLOCK_M=block_m,
        BLOCK=1024,
        # [tiles x experts] comparisons in registers: about 8K elements a loop step.
        BLOCK_TILES=max(16, 8192 // experts_pad),
        num_warps=8,
    )
    return AlignedRows(sorted_rows, tile_expert, num_padded_rows, block_m)


def align_rows_by_expert_torch(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> AlignedRows:
    """Sort the T * top_k rows by expert with fixed-size torch ops (no host sync): the
    reference for the kernel, each expert's rows in row order.

    Ids outside [0, num_experts) (experts on another rank) are dropped: they get no slot.
    The output is sized for the worst case, every expert's run one row short of a full tile:
    rows + num_experts * (block_m - 1), rounded up to a tile.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_rows = flat.numel()
    device = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    # Dropped rows go to an extra bucket E that gets no tiles.
    bucket = torch.where(valid, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    # Start of each bucket among the sorted rows, and among the padded slots; bucket E's
    # slot start is the trash slot past the end.
    max_padded = _max_padded_rows(num_rows, num_experts, block_m)
    count_start = torch.cumsum(counts, 0) - counts
    slot_start = torch.cat([padded_end - padded, padded.new_full((1,), max_padded)])

    order = torch.argsort(bucket, stable=True)  # by expert, each expert's rows in order
    sorted_bucket = bucket[order]
    rank = torch.arange(num_rows, device=device) - count_start[sorted_bucket]
    slot = torch.where(
        sorted_bucket < num_experts, slot_start[sorted_bucket] + rank, max_padded
    )
    sorted_rows = torch.full((max_padded + 1,), num_rows, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, slot, order.to(torch.int32))

    tile_starts = torch.arange(0, max_padded, block_m, device=device)
    tile_expert = torch.searchsorted(padded_end, tile_starts, right=True)
    # Tiles past the end are skipped by the kernel; clamp them to a real expert anyway.
    tile_expert = tile_expert.clamp_(max=num_experts - 1).to(torch.int32)
    return AlignedRows(
        sorted_rows=sorted_rows[:max_padded],
        tile_expert=tile_expert,
        num_padded_rows=padded_end[-1:].to(torch.int32),
        block_m=block_m,
    )


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    aligned: AlignedRows,
    top_k: int,
    config: MoELaunchConfig,
    *,
    gated: bool,
    topk_weights: torch.Tensor | None = None,
) -> None:
    """out[r] = (silu-gated) A[r // a_rows_per_row] @ w[e_r]^T for every sorted row r, scaled
    by topk_weights[r] when given. `a` holds tokens (top_k rows each) when gated, else rows."""
    num_rows = out.shape[0]
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2]
    if out.shape[1] != n or a.shape[1] != k:
        raise ValueError(f"grouped_gemm: A {tuple(a.shape)}, W {tuple(w.shape)} and out "
                         f"{tuple(out.shape)} do not fit (gated={gated})")
    # The CPU interpreter multiplies bf16 operands as raw bits; widen them there.
    dot_in_fp32 = not a.is_cuda and a.dtype == torch.bfloat16
    # block_n counts the projection's output columns; gated, those are gate's and up's.
    block_n = config.block_n // 2 if gated else config.block_n
    grid = (aligned.num_tiles * triton.cdiv(n, block_n),)
    fused_moe_kernel[grid](
        a,
        w,
        out,
        topk_weights if topk_weights is not None else out,
        aligned.sorted_rows,
        aligned.tile_expert,
        aligned.num_padded_rows,
        num_rows,
        aligned.num_tiles,
        n,
        k,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        A_ROWS_PER_ROW=top_k if gated else 1,
        GATED=gated,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        # fp32 stays fp32: TF32 would cost ~1e-3 relative error.
        DOT_PRECISION="ieee" if a.dtype == torch.float32 or dot_in_fp32 else "tf32",
        DOT_IN_FP32=dot_in_fp32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def fused_moe_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: MoELaunchConfig | None = None,
    ids_may_be_dropped: bool = True,
) -> torch.Tensor:
    """The experts of one MoE layer in two grouped GEMMs; [T, H] in hidden's dtype. Ids
    outside [0, E) contribute nothing (see `fused_moe`) when `ids_may_be_dropped`; without
    it every id must be a local expert, and the per-row outputs skip their zero fill (at a
    prefill chunk of 8192 tokens, 256 MiB written a layer for nothing)."""
    for name, tensor in (("hidden", hidden), ("w13", w13), ("w2", w2)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"fused_moe_triton needs {name} contiguous in its last dim")
        if tensor.dtype != hidden.dtype:
            raise ValueError(
                f"fused_moe_triton: {name} is {tensor.dtype}; hidden is {hidden.dtype}"
            )
    num_tokens, hidden_size = hidden.shape
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_rows = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    if config is None:
        config = choose_moe_config(
            num_tokens, num_experts, intermediate, top_k, hidden.element_size()
        )
    aligned = align_rows_by_expert(topk_ids, num_experts, config.block_m)
    act = torch.empty(num_rows, intermediate, dtype=hidden.dtype, device=hidden.device)
    grouped_gemm(hidden, w13, act, aligned, top_k, config, gated=True)
    # Zero-filled when a row's expert may live on another rank: that row is never written.
    alloc = torch.zeros if ids_may_be_dropped else torch.empty
    rows_out = alloc(num_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)
    # In their own dtype (the model's for Qwen, float32 for DeepSeek): the epilogue widens them.
    weights = topk_weights.reshape(-1)
    grouped_gemm(act, w2, rows_out, aligned, top_k, config, gated=False, topk_weights=weights)
    return rows_out.view(num_tokens, top_k, hidden_size).sum(dim=1)


def softmax_topk_triton(
    logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float,
    weights_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] in weights_dtype, ids [T, top_k] int64): `Routing.select` without
    expert groups, in one kernel instead of five."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(
            f"softmax_topk: logits must be [T, E] with a contiguous last dim, got "
            f"{tuple(logits.shape)}"
        )
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=weights_dtype, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    experts_pad = triton.next_power_of_2(num_experts)
    # A program's [tokens x experts] tile stays around 4K float32 values.
    block_t = max(1, min(64, 4096 // experts_pad))
    softmax_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits,
        weights,
        ids,
        num_tokens,
        logits.stride(0),
        scaling,
        NUM_EXPERTS=num_experts,
        EXPERTS_PAD=experts_pad,
        TOP_K=top_k,
        TOP_K_PAD=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return weights, ids
