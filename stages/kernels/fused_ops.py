"""Fused elementwise ops of a decoder layer: one Triton kernel each on CUDA (the kernels are in
`fused_kernels.py`; this module validates, launches and dispatches).

Why: under a CUDA graph a batch-1 decode step is bound by kernel count, not by bandwidth. In
plain torch, RMSNorm is 8 kernels, neox rotary ~10, SiLU-and-multiply 2, and every residual add
one more; each costs ~2 us even when replayed from a graph. Here each of those is one kernel.

Numerics: every kernel reproduces the rounding steps of the torch code it replaces (the code in
`layers.py`, which follows transformers): values are widened to float32, each intermediate that
torch rounds to the model dtype is rounded to it here too, and FMA contraction is disabled so
`a * b + c` rounds twice as it does in torch. On CUDA tensors `cos`, `sin`, `exp` and `rsqrt`
come from libdevice, the same implementations CUDA's `cosf`/`expf`/`rsqrtf` (and so torch's
kernels) use, and RMSNorm's mean is the sum times a float32 1/N, as torch's CUDA mean does it.
What can still differ is the order of the float32 sum of squares (a tree here, torch's own
reduction order there): an ulp or so in the variance, which occasionally moves a bf16 output by
one ulp. (The bit-exactness of the other steps is argued from the PTX, which the tests check;
it has not been measured on a GPU by these tests.)

Dispatch: the public functions run the kernel for CUDA tensors and the original torch code
otherwise, so CPU numerics (compared bit for bit against transformers in the tests) never
change. The `*_triton` functions launch the kernel unconditionally; the tests run them on CPU
tensors under Triton's interpreter (`TRITON_INTERPRET=1`), where libdevice does not exist and
numpy's `cos`/`exp` stand in.

Every launch has a grid computed from shapes alone and no host synchronisation, so all of them
can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import triton
from omni.stages.kernels.fused_kernels import (
    rms_norm_kernel,
    rotary_qk_kernel,
    silu_and_mul_kernel,
    vision_rotary_kernel,
)

# ---- launch helpers ------------------------------------------------------------------------

# Compile options that give torch's floating-point semantics: keep `a * b + c` as two roundings,
# as in torch's separate kernels (Triton contracts to FMA by default), and link libdevice's
# IEEE-denormal variants (Triton picks the flush-to-zero ones by default; torch is built
# without -ftz). The interpreter ignores both; it never fuses and numpy keeps denormals.
_TORCH_FP_OPTIONS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


# OMNI_FUSED_OPS=0 falls back to the plain torch ops on CUDA too: a switch for bisecting a
# numerical difference, or for a GPU where these kernels misbehave.
FUSED_OPS_ENABLED = os.environ.get("OMNI_FUSED_OPS", "1") != "0"


def use_fused_kernels(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor (CUDA, unless switched off)."""
    return tensor.is_cuda and FUSED_OPS_ENABLED


def _num_warps(block: int) -> int:
    """Enough warps that each thread holds a handful of elements of a row-sized block."""
    return max(1, min(8, block // 256))


def _float32_reciprocal(n: int) -> float:
    """1/n divided in float32, as torch's CUDA mean computes its factor (`float(1) / n`)."""
    return float(np.float32(1.0) / np.float32(n))


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    """`x` as a [tokens, heads, cols] view (no copy when the layout allows it)."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _check_rows(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{name}: weight has shape {tuple(weight.shape)}; it must be "
            f"[{x.shape[-1]}] (the last dim of the input)"
        )
    if x.stride(-1) != 1:
        raise ValueError(f"{name}: the input's last dim must be contiguous (stride 1)")


# ---- RMSNorm -------------------------------------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference (transformers' arithmetic): float32 norm, cast back, weight multiply."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(input_dtype)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_rows("rms_norm", x, weight)
    heads_view = _as_heads(x)
    num_rows = heads_view.shape[0] * heads_view.shape[1]
    n_cols = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"add_rms_norm: residual is {residual.dtype} {tuple(residual.shape)}; it must "
                f"match the input, {x.dtype} {tuple(x.shape)}"
            )
        residual = residual.contiguous()
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(n_cols)
    rms_norm_kernel[(num_rows,)](
        heads_view,
        residual if residual is not None else heads_view,
        weight,
        out,
        residual_out if residual_out is not None else out,
        heads_view.shape[1],
        heads_view.stride(0),
        heads_view.stride(1),
        n_cols,
        _float32_reciprocal(n_cols),
        eps,
        HAS_RESIDUAL=residual is not None,
        USE_LIBDEVICE=x.is_cuda,
        BLOCK=block,
        num_warps=_num_warps(block),
        **_TORCH_FP_OPTIONS,
    )
    return out, residual_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in one kernel; `x` may be a strided [T, heads, D] view."""
    out, _ = _launch_rms_norm(x, None, weight, eps)
    return out


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`new_residual = residual + x` (in x's dtype) and RMSNorm of it, in one kernel."""
    out, residual_out = _launch_rms_norm(x, residual, weight, eps)
    assert residual_out is not None
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: one kernel on CUDA, transformers' torch code elsewhere."""
    if use_fused_kernels(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x): the pre-norm residual add fused with the next
    norm on CUDA; on CPU exactly torch's add followed by the reference norm."""
    if use_fused_kernels(x):
        return add_rms_norm_triton(x, residual, weight, eps)
    new_residual = residual + x
    return rms_norm_torch(new_residual, weight, eps), new_residual


# ---- rotary --------------------------------------------------------------------------------


def rotary_cos_sin_torch(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, head_dim] in `dtype`, transformers' float32 arithmetic."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    return cos[:, None, :], sin[:, None, :]


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, heads, head_dim] by the angles whose cos/sin are given ([T, 1, head_dim])."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def _check_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"rotary_qk_: q and k must be [T, heads, head_dim]; got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    num_tokens, head_dim = q.shape[0], q.shape[2]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(
            f"rotary_qk_: q {tuple(q.shape)}, k {tuple(k.shape)} and positions "
            f"{tuple(positions.shape)} must agree on T and head_dim"
        )
    if head_dim % 2 or inv_freq.shape != (head_dim // 2,):
        raise ValueError(
            f"rotary_qk_: inv_freq has shape {tuple(inv_freq.shape)}; head_dim {head_dim} "
            f"needs [{head_dim // 2}] (and must be even)"
        )
    if q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_qk_: q and k need one dtype and a contiguous head_dim")
    if inv_freq.dtype != torch.float32:
        raise ValueError(f"rotary_qk_: inv_freq must be float32, got {inv_freq.dtype}")


def rotary_qk_triton_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
) -> None:
    """Neox rotary on q [T, Hq, D] and k [T, Hk, D] in place, in one kernel, with the angles
    `positions x inv_freq` computed in float32 inside it (no per-step cos/sin tensors). q and
    k may be strided views (e.g. of the fused qkv projection)."""
    _check_rotary(q, k, positions, inv_freq)
    launch_rotary_qk(rotary_qk_kernel, q, k, (positions, inv_freq), scaling)


def launch_rotary_qk(
    kernel: Any, q: torch.Tensor, k: torch.Tensor, angle_args: tuple[Any, ...], scaling: float
) -> None:
    """One program per token of a rotary kernel over checked q [T, Hq, D] and k [T, Hk, D]:
    `rotary_qk_kernel` or M-RoPE's, whose arguments differ only in `angle_args` (what
    the kernel reads its angles from, passed between k and the strides of q)."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_q_heads = triton.next_power_of_2(num_q_heads)
    block_half = triton.next_power_of_2(half)
    kernel[(num_tokens,)](
        q,
        k,
        *angle_args,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        num_q_heads,
        k.shape[1],
        float(scaling),
        half=half,
        USE_LIBDEVICE=q.is_cuda,
        BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=block_half,
        num_warps=_num_warps(block_q_heads * block_half),
        **_TORCH_FP_OPTIONS,
    )


def rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k). CUDA: in place, one kernel. Elsewhere: the torch code, using `cos_sin`
    when the caller precomputed it once for all layers."""
    if use_fused_kernels(q):
        rotary_qk_triton_(q, k, positions, inv_freq, scaling)
        return q, k
    if cos_sin is None:
        cos_sin = rotary_cos_sin_torch(positions, inv_freq, scaling, q.dtype)
    cos, sin = cos_sin
    return apply_rotary_torch(q, cos, sin), apply_rotary_torch(k, cos, sin)


# ---- SiLU and multiply ---------------------------------------------------------------------

_SILU_BLOCK = 1024


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` over a fused [T, 2I] tensor (gate first), in one kernel."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(
            f"silu_and_mul: gate_up must be [T, 2*I] with a contiguous last dim; got shape "
            f"{tuple(gate_up.shape)}"
        )
    gate, up = gate_up.chunk(2, dim=-1)
    return silu_mul_triton(gate, up)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for two [T, I] tensors with contiguous rows, in one kernel."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError(
            f"silu_mul: gate and up must be [T, I] of one shape with contiguous rows; got "
            f"{tuple(gate.shape)} and {tuple(up.shape)}"
        )
    num_tokens, intermediate_size = gate.shape
    out = torch.empty(num_tokens, intermediate_size, dtype=gate.dtype, device=gate.device)
    if num_tokens == 0:
        return out
    block = min(_SILU_BLOCK, triton.next_power_of_2(intermediate_size))
    silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate_size, block))](
        gate,
        up,
        out,
        gate.stride(0),
        up.stride(0),
        intermediate_size,
        USE_LIBDEVICE=gate.is_cuda,
        BLOCK=block,
        num_warps=_num_warps(block),
        **_TORCH_FP_OPTIONS,
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation over the fused gate/up output: one kernel on CUDA."""
    if use_fused_kernels(gate_up):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_torch(gate_up)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for separate projections' outputs: one kernel on CUDA."""
    if use_fused_kernels(gate):
        return silu_mul_triton(gate, up)
    return F.silu(gate) * up


# ---- the vision tower's rotary -------------------------------------------------------------


def vision_rotary_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb_vision`: q, k `[T, heads, D]`, cos, sin `[T, D]`."""
    q32, k32 = q.float(), k.float()
    cos32, sin32 = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    q_embed = (q32 * cos32) + (rotate_half(q32) * sin32)
    k_embed = (k32 * cos32) + (rotate_half(k32) * sin32)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def vision_rotary_triton_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`vision_rotary_torch` in one kernel, in place on `q` and `k` (returned)."""
    if q.dim() != 3 or q.shape != k.shape or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(
            f"vision_rotary: q and k must be [T, heads, head_dim] of one shape with a "
            f"contiguous last dim; got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    tokens, heads, head_dim = q.shape
    if head_dim % 2 or cos.shape != (tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(
            f"vision_rotary: cos and sin must be [{tokens}, {head_dim}] (an even head_dim); got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("vision_rotary: cos and sin need a contiguous last dim")
    if tokens == 0:
        return q, k
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    vision_rotary_kernel[(tokens,)](
        q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        heads,
        half=half,
        BLOCK_HEADS=triton.next_power_of_2(heads),
        BLOCK_HALF=block_half,
        num_warps=_num_warps(triton.next_power_of_2(heads) * block_half),
        **_TORCH_FP_OPTIONS,
    )  # fmt: skip
    return q, k


def vision_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's rotary: one in-place kernel on CUDA, transformers' code elsewhere."""
    if use_fused_kernels(q):
        return vision_rotary_triton_(q, k, cos, sin)
    return vision_rotary_torch(q, k, cos, sin)
