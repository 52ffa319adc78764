"""The Triton kernels behind `fused_ops` (host wrappers, dispatch and references live there).

Each kernel mirrors the rounding steps of the torch code it replaces: values are widened to
float32 and every intermediate torch stores in the model dtype is rounded to it here as well.
`USE_LIBDEVICE` is a compile-time switch: on CUDA, cos/sin/exp/rsqrt come from libdevice
(CUDA's own `cosf`, `expf`, ... that torch's kernels call); Triton's interpreter has no
libdevice, so CPU tensors under `TRITON_INTERPRET=1` take `tl.*` (numpy) instead.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    num_heads,
    stride_x_token,
    stride_x_head,
    n_cols,
    inv_n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per row. A row is (token, head) of a [T, heads, n_cols] view whose last dim
    # is contiguous; a plain [T, n_cols] input has one head. Outputs are contiguous.
    row = tl.program_id(0)
    token = row // num_heads
    head = row % num_heads
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_offsets = token.to(tl.int64) * stride_x_token + head * stride_x_head + cols
    row_offsets = row.to(tl.int64) * n_cols + cols
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # torch's `residual + x`: the exact float32 sum rounded once to the model dtype.
        residual = tl.load(residual_ptr + row_offsets, mask=mask, other=0.0)
        x = (residual.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row_offsets, x, mask=mask)
    x32 = x.to(tl.float32)
    # torch's CUDA mean multiplies the sum by a float32 1/N (a plain `/` here would also be
    # Triton's approximate div.full.f32).
    variance = tl.sum(x32 * x32, axis=0) * inv_n_cols
    if USE_LIBDEVICE:  # noqa: SIM108 (a constexpr branch: libdevice exists only on CUDA)
        inv_rms = libdevice.rsqrt(variance + eps)
    else:
        inv_rms = tl.math.rsqrt(variance + eps)
    # Cast back to the input dtype before the weight multiply, as transformers does; the
    # product of two values of that dtype is exact in float32, so one rounding to the output
    # dtype equals torch's half-precision multiply.
    normed = (x32 * inv_rms).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = weight * normed
    tl.store(out_ptr + row_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(
    base_ptr,
    stride_token,
    stride_head,
    token,
    num_heads,
    cos,
    sin,
    half: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Neox rotate-half of every head of one token, in place:
    `x1' = x1*cos - x2*sin`, `x2' = x2*cos + x1*sin`, each product rounded to the model dtype
    before the sum (torch computes `x*cos` and `rotate_half(x)*sin` as separate kernels)."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < half)
    first = base_ptr + token.to(tl.int64) * stride_token + heads * stride_head + dims
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + half, mask=mask, other=0.0)
    dtype = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    x1_cos = (x1f * cos).to(dtype).to(tl.float32)
    x2_sin = (x2f * sin).to(dtype).to(tl.float32)
    x2_cos = (x2f * cos).to(dtype).to(tl.float32)
    x1_sin = (x1f * sin).to(dtype).to(tl.float32)
    tl.store(first, (x1_cos - x2_sin).to(dtype), mask=mask)
    tl.store(first + half, (x2_cos + x1_sin).to(dtype), mask=mask)


@triton.jit
def rotate_token_qk(
    q_ptr,
    k_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    token,
    num_q_heads,
    num_k_heads,
    freqs,
    scaling,
    half: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate every q and k head of one token in place by the float32 angles `freqs`
    [BLOCK_HALF]: what 1-D rotary and M-RoPE share once each has its angles."""
    if USE_LIBDEVICE:
        cos32 = libdevice.cos(freqs)
        sin32 = libdevice.sin(freqs)
    else:
        cos32 = tl.cos(freqs)
        sin32 = tl.sin(freqs)
    # The tables torch builds are scaled in float32 and then cast to the model dtype.
    dtype = q_ptr.dtype.element_ty
    cos = (cos32 * scaling).to(dtype).to(tl.float32)[None, :]
    sin = (sin32 * scaling).to(dtype).to(tl.float32)[None, :]
    _rotate_heads(
        q_ptr, stride_q_token, stride_q_head, token, num_q_heads, cos, sin, half,
        BLOCK_Q_HEADS, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, stride_k_token, stride_k_head, token, num_k_heads, cos, sin, half,
        BLOCK_K_HEADS, BLOCK_HALF,
    )  # fmt: skip


@triton.jit
def rotary_qk_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    inv_freq_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    num_q_heads,
    num_k_heads,
    scaling,
    half: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per token: the angles are computed once and applied to all q and k heads.
    token = tl.program_id(0)
    dims = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + dims, mask=dims < half, other=0.0)
    position = tl.load(positions_ptr + token).to(tl.float32)
    rotate_token_qk(
        q_ptr, k_ptr, stride_q_token, stride_q_head, stride_k_token, stride_k_head, token,
        num_q_heads, num_k_heads, position * inv_freq, scaling, half, USE_LIBDEVICE,
        BLOCK_Q_HEADS, BLOCK_K_HEADS, BLOCK_HALF,
    )  # fmt: skip


@triton.jit
def silu_and_mul_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    stride_gate_token,
    stride_up_token,
    intermediate_size,
    USE_LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # `gate` and `up` are two [T, I] views with contiguous rows: the halves of one fused
    # gate/up projection (the LLM) or two projections' outputs (the vision tower's MLP).
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    row = token.to(tl.int64)
    gate_raw = tl.load(gate_ptr + row * stride_gate_token + cols, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * stride_up_token + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = gate_raw.dtype
    gate = gate_raw.to(tl.float32)
    if USE_LIBDEVICE:  # noqa: SIM108 (a constexpr branch: libdevice exists only on CUDA)
        exp_neg = libdevice.exp(-gate)
    else:
        exp_neg = tl.exp(-gate)
    # torch's silu is `x / (1 + exp(-x))` with an IEEE division, rounded to the model dtype;
    # the multiply by `up` is a second kernel there, so a second rounding here.
    silu = tl.math.div_rn(gate, 1.0 + exp_neg).to(dtype).to(tl.float32)
    out = (silu * up).to(dtype)
    tl.store(out_ptr + token.to(tl.int64) * intermediate_size + cols, out, mask=mask)


@triton.jit
def _rotate_vision_heads(
    base_ptr,
    stride_token,
    stride_head,
    token,
    mask,
    cos1,
    cos2,
    sin1,
    sin2,
    half: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    first = base_ptr + token.to(tl.int64) * stride_token + heads * stride_head + dims
    x1_raw = tl.load(first, mask=mask, other=0.0)
    x1 = x1_raw.to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) is (-x2, x1), and (-x2) * sin rounds as -(x2 * sin) does.
    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
    tl.store(first, out1.to(x1_raw.dtype), mask=mask)
    tl.store(first + half, out2.to(x1_raw.dtype), mask=mask)


@triton.jit
def vision_rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_cos_token,
    stride_sin_token,
    num_heads,
    half: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """The vision tower's rotary, in place on one token's q and k heads: transformers'
    `apply_rotary_pos_emb_vision`, which widens q, k, cos and sin to float32, computes
    `q * cos + rotate_half(q) * sin` there and rounds once to the model dtype. With FMA
    contraction off, each product and the sum round as torch's separate kernels do."""
    token = tl.program_id(0)
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    mask = (heads < num_heads) & dim_mask
    cos_row = cos_ptr + token.to(tl.int64) * stride_cos_token + dims
    sin_row = sin_ptr + token.to(tl.int64) * stride_sin_token + dims
    cos1 = tl.load(cos_row, mask=dim_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + half, mask=dim_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row, mask=dim_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + half, mask=dim_mask, other=0.0).to(tl.float32)
    _rotate_vision_heads(
        q_ptr, stride_q_token, stride_q_head, token, mask, cos1, cos2, sin1, sin2, half,
        BLOCK_HEADS, BLOCK_HALF,
    )  # fmt: skip
    _rotate_vision_heads(
        k_ptr, stride_k_token, stride_k_head, token, mask, cos1, cos2, sin1, sin2, half,
        BLOCK_HEADS, BLOCK_HALF,
    )  # fmt: skip
