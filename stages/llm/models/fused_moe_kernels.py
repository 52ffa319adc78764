"""The Triton kernel of the fused mixture-of-experts path: one grouped GEMM over all experts.

The scheme is vLLM's and SGLang's fused_moe. Each (token, k) pair of the routing is one row
of the problem; `fused_moe_triton.align_rows_by_expert` sorts the rows by expert and pads each
expert's run to a multiple of BLOCK_M, so every BLOCK_M-row tile belongs to one expert:

    sorted_rows  [ e0 e0 e0 pad | e1 e1 e1 e1 | e1 pad pad pad | e3 ... ]   (BLOCK_M = 4)
    tile_expert  [      0       |      1      |       1        |   3  ... ]

A program computes one BLOCK_M x BLOCK_N tile of `C = A[rows] @ W[expert]^T`: it gathers its
rows of A (a row r reads A row r // A_ROWS_PER_ROW: the token for the first GEMM, whose A is the
hidden states, and r itself for the second, whose A is the first's output), streams the
expert's weight [N, K] through BLOCK_K-wide slices, and accumulates in float32. Padding rows
(index = num_rows) load zeros and store nothing. Tiles past the padded total exit at once: the
grid is sized from host ints (an upper bound), so a launch never syncs and can be captured
in a CUDA graph.

Two epilogues:
- GATED (first GEMM, W = w13 [E, 2I, H]): the program holds two accumulators, the gate rows
  n and the up rows I + n of the same tile, and stores silu(gate) * up, so the [rows, 2I]
  intermediate never reaches memory.
- MUL_ROUTED_WEIGHT (second GEMM, W = w2 [E, H, I]): each row is scaled by its routing weight
  before the store; the caller sums the top_k rows of each token.

Programs are ordered in GROUP_M-tall column groups (Triton's matmul tutorial) so consecutive
programs reuse the same weight tiles from L2.
"""

from __future__ import annotations

import triton
import triton.language as tl


# The row and tile counts change with every step's batch: left unspecialised, they never
# trigger a recompile.
@triton.jit(do_not_specialize=["num_rows", "num_tiles_m"])
def fused_moe_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    topk_weights_ptr,
    sorted_rows_ptr,
    tile_expert_ptr,
    num_padded_rows_ptr,
    num_rows,
    num_tiles_m,
    N,
    K,
    stride_a_row,
    stride_w_expert,
    stride_w_n,
    stride_c_row,
    A_ROWS_PER_ROW: tl.constexpr,
    GATED: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # ---- which tile: grouped ordering over (tile_m, tile_n) --------------------------------
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % tiles_per_group) % group_rows
    tile_n = (pid % tiles_per_group) // group_rows
    if tile_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
        return  # past the last expert's padded run

    # ---- this tile's rows and expert -------------------------------------------------------
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_rows_ptr + offs_m)
    row_valid = rows < num_rows
    a_rows = (rows // A_ROWS_PER_ROW).to(tl.int64)
    expert = tl.load(tile_expert_ptr + tile_m).to(tl.int64)

    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a_row + offs_k[None, :]
    # W is [E, N(, +N), K] with K contiguous; the tile is read as [BLOCK_K, BLOCK_N] for A @ W^T.
    w_ptrs = w_ptr + expert * stride_w_expert + offs_n[None, :] * stride_w_n + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_valid = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if DOT_IN_FP32:  # the CPU interpreter cannot multiply bf16 operands
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            # The up rows sit N rows below the gate rows of the same expert.
            w_up = tl.load(
                w_ptrs + N * stride_w_n, mask=k_valid[:, None] & n_valid[None, :], other=0.0
            )
            if DOT_IN_FP32:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # ---- epilogue --------------------------------------------------------------------------
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, in float32
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + rows, mask=row_valid, other=0.0)
        acc = acc * weight.to(tl.float32)[:, None]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_c_row + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_valid[:, None] & n_valid[None, :])
