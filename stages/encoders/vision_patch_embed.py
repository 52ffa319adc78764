"""The Qwen2-VL / Qwen2.5-VL patch embedding as the matrix product it is.

transformers embeds patches with an `nn.Conv3d` whose stride equals its kernel, over input
already cut into one row per patch: each output is a dot product of a patch's
`C * T * P * P` values with each filter. cuDNN has no good algorithm for that degenerate shape
in bf16 on several GPU and library versions and falls back to slow paths (PyTorch issue
174051: 10-20x on the vision forward; vLLM's `Conv3dLayer` and transformers' fusion mapping
make the same substitution). One GEMM computes exactly the same sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearPatchEmbed(nn.Module):
    """Drop-in for transformers' `PatchEmbed` / `Qwen2_5_VisionPatchEmbed`, keeping its `proj`
    (so the checkpoint's `patch_embed.proj.weight` stays where it was loaded)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        proj = getattr(original, "proj")  # noqa: B009
        if not isinstance(proj, nn.Conv3d) or proj.kernel_size != proj.stride:
            raise ValueError(f"expected a Conv3d with stride equal to its kernel, got {proj!r}")
        self.proj = proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        # [embed, C, T, P, P] -> [embed, C*T*P*P]: the order the rows of pixel_values use.
        return F.linear(
            hidden_states.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias
        )
