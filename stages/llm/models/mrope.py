"""Multimodal rotary embedding (M-RoPE) of Qwen2-VL and Qwen2.5-VL.

Each token has three positions, (temporal, height, width), given as int64 `[3, T]`. The
head_dim/2 rotary frequencies are split into three consecutive sections
(`rope_parameters["mrope_section"]`, e.g. [16, 24, 24] for head_dim 128): frequency j rotates
by the position of the row its section belongs to. Text tokens carry the same value in all
three rows, which makes M-RoPE equal to ordinary 1-D rotary for them.

Off CUDA, cos/sin are built once per forward as transformers builds them (float32
`position x inv_freq`, then cos/sin, then the cast to the model dtype), so the CPU path matches
it bit for bit. On CUDA one Triton kernel per layer rotates q and k in place, computing each
frequency's angle from its section's position row inline, then rotating as the 1-D rotary
kernel does (`fused_kernels.rotate_token_qk`, the same rounding steps),
instead of ~10 elementwise torch kernels per layer. `OMNI_FUSED_OPS=0` switches it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from omni.stages.kernels.fused_kernels import rotate_token_qk
from omni.stages.kernels.fused_ops import (
    apply_rotary_torch,
    launch_rotary_qk,
    use_fused_kernels,
)
from omni.stages.llm.models.layers import RotaryAngles, RotaryEmbedding, rope_parameters_of

NUM_MROPE_ROWS = 3  # temporal, height, width


def mrope_section_of(config: Any, head_dim: int) -> list[int]:
    """The config's `mrope_section`, checked to cover the head_dim/2 rotary frequencies."""
    section = rope_parameters_of(config).get("mrope_section")
    if not section or len(section) != NUM_MROPE_ROWS:
        raise ValueError(
            f"rope_parameters.mrope_section is {section!r}; M-RoPE needs three sections "
            "(temporal, height, width)"
        )
    section = [int(s) for s in section]
    if sum(section) != head_dim // 2 or min(section) < 0:
        raise ValueError(
            f"mrope_section {section} adds up to {sum(section)}; it must add up to "
            f"head_dim / 2 = {head_dim // 2}"
        )
    return section


@triton.jit
def mrope_qk_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    row_of_freq_ptr,
    inv_freq_ptr,
    stride_positions_row,
    stride_positions_token,
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
    # One program per token, as `rotary_qk_kernel`; only the position differs per frequency.
    token = tl.program_id(0)
    dims = tl.arange(0, BLOCK_HALF)
    mask = dims < half
    inv_freq = tl.load(inv_freq_ptr + dims, mask=mask, other=0.0)
    rows = tl.load(row_of_freq_ptr + dims, mask=mask, other=0)
    position_offsets = rows * stride_positions_row + token.to(tl.int64) * stride_positions_token
    position = tl.load(positions_ptr + position_offsets, mask=mask, other=0).to(tl.float32)
    rotate_token_qk(
        q_ptr, k_ptr, stride_q_token, stride_q_head, stride_k_token, stride_k_head, token,
        num_q_heads, num_k_heads, position * inv_freq, scaling, half, USE_LIBDEVICE,
        BLOCK_Q_HEADS, BLOCK_K_HEADS, BLOCK_HALF,
    )  # fmt: skip


def mrope_qk_triton_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    row_of_freq: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
) -> None:
    """M-RoPE on q [T, Hq, D] and k [T, Hk, D] in place (strided views allowed), positions
    int64 [3, T], `row_of_freq` int64 [D/2] naming each frequency's position row."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"mrope_qk_: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, head_dim]"
        )
    num_tokens, _, head_dim = q.shape
    half = head_dim // 2
    if positions.dim() != 2 or tuple(positions.shape) != (NUM_MROPE_ROWS, num_tokens):
        raise ValueError(
            f"mrope_qk_: positions has shape {tuple(positions.shape)}; expected "
            f"({NUM_MROPE_ROWS}, {num_tokens})"
        )
    if head_dim % 2 or inv_freq.shape != (half,) or row_of_freq.shape != (half,):
        raise ValueError(
            f"mrope_qk_: inv_freq {tuple(inv_freq.shape)} and row_of_freq "
            f"{tuple(row_of_freq.shape)} must be [{half}] for head_dim {head_dim}"
        )
    if q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("mrope_qk_: q and k need one dtype and a contiguous head_dim")
    if inv_freq.dtype != torch.float32 or positions.dtype != torch.int64:
        raise ValueError("mrope_qk_: inv_freq must be float32 and positions int64")
    angle_args = (positions, row_of_freq, inv_freq, positions.stride(0), positions.stride(1))
    launch_rotary_qk(mrope_qk_kernel, q, k, angle_args, scaling)


@dataclass(frozen=True)
class MRotaryAngles(RotaryAngles):
    """One forward's M-RoPE inputs: positions [3, T]; cos/sin tables off CUDA only."""

    row_of_freq: torch.Tensor

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if use_fused_kernels(q):
            mrope_qk_triton_(q, k, self.positions, self.row_of_freq, self.inv_freq, self.scaling)
            return q, k
        assert self.cos_sin is not None
        cos, sin = self.cos_sin
        return apply_rotary_torch(q, cos, sin), apply_rotary_torch(k, cos, sin)


class MRotaryEmbedding(RotaryEmbedding):
    """Neox rotary whose frequencies read the temporal, height or width position by section."""

    def __init__(self, config: Any, head_dim: int) -> None:
        super().__init__(config, head_dim)
        section = mrope_section_of(config, head_dim)
        # Which position row (0 = temporal, 1 = height, 2 = width) drives each frequency.
        row_of_freq = torch.repeat_interleave(
            torch.arange(NUM_MROPE_ROWS), torch.tensor(section), output_size=head_dim // 2
        ).to(self.inv_freq.device)
        self.row_of_freq: torch.Tensor
        self.register_buffer("row_of_freq", row_of_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """Rotary inputs for `positions`: int64 `[3, T]`, or `[T]` for text-only batches
        (the same position in all three rows)."""
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(NUM_MROPE_ROWS, -1)
        if positions.dim() != 2 or positions.shape[0] != NUM_MROPE_ROWS:
            raise ValueError(
                f"M-RoPE positions must be [3, T] or [T]; got shape {tuple(positions.shape)}"
            )
        cos_sin = None if use_fused_kernels(positions) else self._cos_sin(positions, dtype)
        return MRotaryAngles(
            positions, self.inv_freq, self.attention_scaling, cos_sin, self.row_of_freq
        )

    def _cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim] in `dtype`, transformers' float32 arithmetic."""
        # [T, head_dim/2]: frequency j takes its position from row row_of_freq[j].
        per_freq_positions = positions.t().gather(
            1, self.row_of_freq.unsqueeze(0).expand(positions.shape[1], -1)
        )
        freqs = per_freq_positions.to(torch.float32) * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None, :]
        return cos, sin
