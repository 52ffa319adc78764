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


# The row and tile counts change with every step's batch: left unspecialised.
@triton.jit(do_not_specialize=["num_rows", "max_padded"])
def align_rows_kernel(
    topk_ids_ptr,
    counts_ptr,
    cursor_ptr,
    sorted_rows_ptr,
    tile_expert_ptr,
    num_padded_rows_ptr,
    num_rows,
    max_padded,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_TILES: tl.constexpr,
):
    """Sort the routing's rows by expert in one program (the torch equivalent is about 35
    small kernels, a few microseconds each, per MoE layer and step).

    Four phases, separated by barriers (a barrier also orders the block's global-memory
    accesses, so each phase sees the last one's writes):
    1. zero the per-expert counts; fill sorted_rows with the padding marker (num_rows);
    2. count each expert's rows (atomic adds);
    3. pad each count to a multiple of BLOCK_M, prefix-sum them: each expert's first slot
       (its write cursor), the padded total, and the expert of every BLOCK_M tile;
    4. place each row at its expert's cursor, bumping the cursor (atomic add).
    Within an expert the rows land in whatever order the atomics resolve; each row's result
    does not depend on its tile-mates, so the output is the same either way. Ids outside
    [0, NUM_EXPERTS) (experts held by another rank) are counted nowhere and placed nowhere.
    """
    experts = tl.arange(0, EXPERTS_PAD)
    tl.store(counts_ptr + experts, tl.zeros([EXPERTS_PAD], dtype=tl.int32))
    for start in range(0, max_padded, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        pad = tl.full([BLOCK], 0, dtype=tl.int32) + num_rows
        tl.store(sorted_rows_ptr + offs, pad, mask=offs < max_padded)
    tl.debug_barrier()

    for start in range(0, num_rows, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_rows, other=-1)
        valid = (ids >= 0) & (ids < NUM_EXPERTS)
        tl.atomic_add(counts_ptr + ids, 1, mask=valid)
    tl.debug_barrier()

    # .cg: read through L2, where the atomics landed, never a stale L1 line.
    counts = tl.load(counts_ptr + experts, cache_modifier=".cg")
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + experts, padded_end - padded)
    tl.store(num_padded_rows_ptr, tl.sum(padded, 0))
    # Tile t starting at row t * BLOCK_M belongs to the expert whose padded run contains it:
    # the number of runs that end at or before that row. Empty runs end where the previous
    # one did and are counted with it; tiles past the total are skipped by the GEMMs, so
    # their expert is clamped to a real one.
    num_tiles = max_padded // BLOCK_M
    for start in range(0, num_tiles, BLOCK_TILES):
        tiles = start + tl.arange(0, BLOCK_TILES)
        first_row = tiles * BLOCK_M
        ended = (padded_end[None, :] <= first_row[:, None]).to(tl.int32)
        expert = tl.minimum(tl.sum(ended, 1), NUM_EXPERTS - 1)
        tl.store(tile_expert_ptr + tiles, expert, mask=tiles < num_tiles)
    tl.debug_barrier()

    for start in range(0, num_rows, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_rows, other=-1)
        valid = (ids >= 0) & (ids < NUM_EXPERTS)
        slot = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
        tl.store(sorted_rows_ptr + slot, offs, mask=valid)


@triton.jit
def softmax_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    stride_logits,
    scaling,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_PAD: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_K_PAD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Routing in one kernel: float32 softmax over each token's router logits, the TOP_K
    largest probabilities (highest first; a tie goes to the lower expert id), optionally
    renormalised to sum to 1, times `scaling`. One program holds BLOCK_T tokens' whole rows."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_valid = tokens < num_tokens
    experts = tl.arange(0, EXPERTS_PAD)
    mask = token_valid[:, None] & (experts[None, :] < NUM_EXPERTS)
    logits = tl.load(
        logits_ptr + tokens.to(tl.int64)[:, None] * stride_logits + experts[None, :],
        mask=mask,
        other=float("-inf"),
    ).to(tl.float32)
    # Rows past the last token are all -inf: give them a finite max and a unit sum, so they
    # compute (and then store nothing) without NaNs.
    row_max = tl.where(token_valid, tl.max(logits, 1), 0.0)
    exp = tl.where(mask, tl.exp(logits - row_max[:, None]), 0.0)
    row_sum = tl.where(token_valid, tl.sum(exp, 1), 1.0)
    probs = exp / row_sum[:, None]
    probs = tl.where(mask, probs, -1.0)  # padding experts are never picked

    slots = tl.arange(0, TOP_K_PAD)
    weights = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, 1)
        # The lowest expert id among those at the maximum.
        best_id = tl.min(tl.where(probs == best[:, None], experts[None, :], EXPERTS_PAD), 1)
        weights = tl.where(slots[None, :] == k, best[:, None], weights)
        ids = tl.where(slots[None, :] == k, best_id[:, None], ids)
        probs = tl.where(experts[None, :] == best_id[:, None], -1.0, probs)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]
    weights = weights * scaling
    out = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_mask = token_valid[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out, ids.to(ids_ptr.dtype.element_ty), mask=out_mask)
