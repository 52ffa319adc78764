"""Triton kernels for paged attention: the KV-cache write and one unified attention kernel.

The unified kernel serves prefill chunks and decode tokens in a single launch (the scheme of
vLLM's triton_unified_attention). The grid is (query tiles across all requests, kv heads,
kv splits). A program owns BLOCK_Q consecutive query tokens of one request and packs them
with the Q_PER_KV query heads that share its kv head into a BLOCK_M = BLOCK_Q * Q_PER_KV row
tile, so a GQA decode step reads each KV block once for all of that group's query heads, and
the first matmul has enough rows for the tensor cores even when a request has one new token.
It then streams TILE context positions at a time through the block table up to the tile's
causal limit, with an fp32 online softmax in base 2.

Everything the kernels need to find their work is read on the device (query_start_loc,
seq_lens, block_tables), and the grid comes from host ints, so a launch never syncs and a
fixed-shape decode batch can be captured in a CUDA graph.

With NUM_SPLITS > 1 (flash-decoding) each program covers one slice of the context and writes
an unnormalised partial result; `merge_splits_kernel` folds the slices together.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    key_stride_token,
    key_stride_head,
    value_stride_token,
    value_stride_head,
    cache_stride_block,
    cache_stride_offset,
    cache_stride_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per new token: copy all its kv heads into the slot the runner assigned."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token of a fixed-size batch
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = (
        block * cache_stride_block
        + offset * cache_stride_offset
        + heads[:, None] * cache_stride_head
        + dims[None, :]
    )
    k_src = token * key_stride_token + heads[:, None] * key_stride_head + dims[None, :]
    v_src = token * value_stride_token + heads[:, None] * value_stride_head + dims[None, :]
    k = tl.load(key_ptr + k_src, mask=mask)
    v = tl.load(value_ptr + v_src, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _find_request(query_start_loc_ptr, q_block_idx, num_reqs, BLOCK_Q: tl.constexpr):
    """The request owning global query tile `q_block_idx`.

    Request r's tiles start at query_start_loc[r] // BLOCK_Q + r: one spare tile per request
    absorbs its partial last tile, so the total tile count is bounded by
    num_tokens // BLOCK_Q + num_reqs, a host-side number. Binary search for the last r whose
    first tile is at or before q_block_idx.
    """
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(
    q,
    m_i,
    l_i,
    acc,
    tile_lo,
    tile_hi,
    kv_end,
    query_pos,
    row_valid,
    block_table_row,
    k_head_ptr,
    v_head_ptr,
    cache_stride_block,
    cache_stride_offset,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Online-softmax over context tiles [tile_lo, tile_hi) through the block table.

    MASKED applies the causal mask and bounds checks; unmasked tiles must lie wholly before
    every query row's position (and so inside the context).
    """
    offs_t = tl.arange(0, TILE)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE + offs_t
        if MASKED:  # noqa: SIM108 (a constexpr branch reads clearer in a kernel)
            key_valid = key_pos < kv_end
        else:
            key_valid = offs_t < TILE  # all true; folds away
        block_ids = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        slot_offset = (
            block_ids.to(tl.int64) * cache_stride_block
            + (key_pos % BLOCK_SIZE) * cache_stride_offset
        )
        k = tl.load(  # [HEAD_DIM_PAD, TILE], transposed for Q @ K^T
            k_head_ptr + slot_offset[None, :] + dims[:, None],
            mask=dim_valid[:, None] & key_valid[None, :],
            other=0.0,
        )
        v = tl.load(
            v_head_ptr + slot_offset[:, None] + dims[None, :],
            mask=key_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            visible = row_valid[:, None] & (key_pos[None, :] <= query_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps max -inf; subtract 0 instead so that
            # exp2(-inf - -inf) never makes a NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


# num_reqs changes every step: left unspecialised, it never triggers a recompile.
@triton.jit(do_not_specialize=["num_reqs"])
def unified_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    scale_log2,
    num_reqs,
    q_stride_token,
    q_stride_head,
    out_stride_token,
    out_stride_head,
    block_table_stride,
    cache_stride_block,
    cache_stride_offset,
    cache_stride_head,
    NUM_HEADS: tl.constexpr,
    Q_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    q_block_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    req = _find_request(query_start_loc_ptr, q_block_idx, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    query_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    local_q_block = q_block_idx - (q_start // BLOCK_Q + req)
    if local_q_block * BLOCK_Q >= query_len:
        return  # a spare tile: this request has fewer query tiles than the bound allows
    seq_len = tl.load(seq_lens_ptr + req)
    prefix_len = seq_len - query_len

    # Row m of the tile is query token (m // Q_PER_KV) of this tile, query head
    # kv_head * Q_PER_KV + m % Q_PER_KV.
    rows = tl.arange(0, BLOCK_M)
    q_in_req = local_q_block * BLOCK_Q + rows // Q_PER_KV
    head = kv_head * Q_PER_KV + rows % Q_PER_KV
    row_valid = (rows < BLOCK_Q * Q_PER_KV) & (q_in_req < query_len)
    token = (q_start + q_in_req).to(tl.int64)
    query_pos = prefix_len + q_in_req

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * q_stride_token + head[:, None] * q_stride_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # Causal limit of the whole tile: one past the position of its last query token.
    kv_end = tl.minimum(prefix_len + (local_q_block + 1) * BLOCK_Q, seq_len)
    num_tiles = tl.cdiv(kv_end, TILE)
    if NUM_SPLITS > 1:
        tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + req.to(tl.int64) * block_table_stride
    k_head_ptr = k_cache_ptr + kv_head * cache_stride_head
    v_head_ptr = v_cache_ptr + kv_head * cache_stride_head
    # Tiles that end at or before this tile's first query position are visible to every
    # row: they skip the causal mask and the bounds checks. Only the last few are masked.
    first_query_pos = prefix_len + local_q_block * BLOCK_Q
    num_full_tiles = (first_query_pos + 1) // TILE
    m_i, l_i, acc = _attend_tiles(
        q, m_i, l_i, acc, tile_lo, tl.minimum(tile_hi, num_full_tiles), kv_end, query_pos,
        row_valid, block_table_row, k_head_ptr, v_head_ptr, cache_stride_block,
        cache_stride_offset, scale_log2, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE,
        DOT_PRECISION, DOT_IN_FP32, False,
    )
    m_i, l_i, acc = _attend_tiles(
        q, m_i, l_i, acc, tl.maximum(tile_lo, num_full_tiles), tile_hi, kv_end, query_pos,
        row_valid, block_table_row, k_head_ptr, v_head_ptr, cache_stride_block,
        cache_stride_offset, scale_log2, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE,
        DOT_PRECISION, DOT_IN_FP32, True,
    )

    if NUM_SPLITS > 1:
        partial = (token * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(
            partial_out_ptr + partial[:, None] * HEAD_DIM_PAD + dims[None, :],
            acc,
            mask=row_valid[:, None],
        )
        tl.store(partial_max_ptr + partial, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + partial, l_i, mask=row_valid)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + token[:, None] * out_stride_token + head[:, None] * out_stride_head
            + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )


@triton.jit(do_not_specialize=["num_reqs"])
def merge_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    query_start_loc_ptr,
    num_reqs,
    out_stride_token,
    out_stride_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Fold the per-split partial results of one (token, query head) into the output."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    out_offset = token * out_stride_token + head * out_stride_head + dims
    num_owned_tokens = tl.load(query_start_loc_ptr + num_reqs)
    if token >= num_owned_tokens:
        # Padding past the last request: no partials were written for it.
        zeros = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
        tl.store(out_ptr + out_offset, zeros.to(out_ptr.dtype.element_ty), mask=dim_valid)
        return
    splits = tl.arange(0, NUM_SPLITS)
    base = (token * NUM_HEADS + head) * NUM_SPLITS
    split_max = tl.load(partial_max_ptr + base + splits)
    split_sum = tl.load(partial_sum_ptr + base + splits)
    global_max = tl.max(split_max, 0)
    # Splits that saw no visible key carry max -inf and weigh exactly 0.
    weight = tl.exp2(split_max - global_max)
    denom = tl.sum(split_sum * weight, 0)
    partial_acc = tl.load(
        partial_out_ptr + (base + splits)[:, None] * HEAD_DIM_PAD + dims[None, :]
    )
    out = tl.sum(partial_acc * weight[:, None], 0) / denom
    tl.store(out_ptr + out_offset, out.to(out_ptr.dtype.element_ty), mask=dim_valid)
