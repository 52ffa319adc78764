"""Multimodal rotary embedding (M-RoPE) of Qwen2-VL and Qwen2.5-VL.

Each token has three positions, (temporal, height, width), given as int64 `[3, T]`. The
head_dim/2 rotary frequencies are split into three consecutive sections
(`rope_parameters["mrope_section"]`, e.g. [16, 24, 24] for head_dim 128): frequency j rotates
by the position of the row its section belongs to. Text tokens carry the same value in all
three rows, which makes M-RoPE equal to ordinary 1-D rotary for them.

cos/sin are built once per forward as transformers builds them (float32 `position x inv_freq`,
then cos/sin, then the cast to the model dtype), so the CPU path matches it bit for bit. The
fused CUDA rotary kernel takes one position per token, so this model always rotates with the
torch code (correctness first; a 3-row kernel is a later optimisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omni.stages.llm.models.fused_ops import apply_rotary_torch
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


@dataclass(frozen=True)
class MRotaryAngles(RotaryAngles):
    """Rotary inputs for one forward where cos/sin are always precomputed tables."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        # [T, head_dim/2]: frequency j takes its position from row row_of_freq[j].
        per_freq_positions = positions.t().gather(
            1, self.row_of_freq.unsqueeze(0).expand(positions.shape[1], -1)
        )
        freqs = per_freq_positions.to(torch.float32) * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None, :]
        return MRotaryAngles(positions, self.inv_freq, self.attention_scaling, (cos, sin))
