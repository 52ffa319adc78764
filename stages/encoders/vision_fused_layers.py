"""The Qwen2.5-VL vision tower's norms and MLPs on the shared fused kernels
(`omni.stages.kernels.fused_ops`), on CUDA; transformers' own code runs everywhere else.

Measured on an H200 with transformers' eager tower (16 448x448 images, 16k tokens a forward,
about 140 ms, CUDA graphs or not): the matmuls were about a third of the GPU time and
elementwise kernels over the [tokens, 1280-3420] activations the rest. transformers' RMSNorm
is seven kernels with a float32 copy of its input, SiLU-and-multiply two, and the vision
rotary (`PackedVisionAttention`'s `rotary`, also taken from the shared kernels) about fifteen
over float32 copies of q and k. Each becomes one kernel with torch's rounding steps.
"""

from __future__ import annotations

import torch
from omni.stages.kernels.fused_ops import rms_norm, silu_mul
from torch import nn


class FusedRMSNorm(nn.Module):
    """Drop-in for `Qwen2_5_VLRMSNorm`, sharing its weight."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.weight = getattr(original, "weight")  # noqa: B009
        self.eps = float(getattr(original, "variance_epsilon"))  # noqa: B009

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps)


class SiluMulMLP(nn.Module):
    """Drop-in for `Qwen2_5_VLMLP` with a SiLU activation, sharing its three projections:
    `down(silu(gate(x)) * up(x))` with the activation and product in one kernel."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.gate_proj: nn.Module = getattr(original, "gate_proj")  # noqa: B009
        self.up_proj: nn.Module = getattr(original, "up_proj")  # noqa: B009
        self.down_proj: nn.Module = getattr(original, "down_proj")  # noqa: B009

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(hidden_states), self.up_proj(hidden_states)))


def _is_rms_norm(module: nn.Module) -> bool:
    # transformers' Qwen RMSNorms: a weight, an epsilon, no bias (LayerNorm has `eps`).
    return hasattr(module, "variance_epsilon") and isinstance(
        getattr(module, "weight", None), nn.Parameter
    )


# torch's SiLU and transformers' `ACT2FN["silu"]`; both are `F.silu`.
_SILU_CLASSES = ("SiLU", "SiLUActivation")


def _is_silu_mlp(module: nn.Module) -> bool:
    projections = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
    return projections and type(getattr(module, "act_fn", None)).__name__ in _SILU_CLASSES


def fuse_vision_layers(tower: nn.Module) -> int:
    """Replaces the RMSNorms and SiLU MLPs of `tower`'s blocks and merger with the fused
    modules; returns how many were replaced (0 for Qwen2-VL's LayerNorm / GELU tower)."""
    replaced = 0
    owners = [*getattr(tower, "blocks", ()), getattr(tower, "merger", None)]
    for owner in owners:
        if owner is None:
            continue
        for name, child in list(owner.named_children()):
            if _is_rms_norm(child):
                setattr(owner, name, FusedRMSNorm(child))
                replaced += 1
            elif _is_silu_mlp(child):
                setattr(owner, name, SiluMulMLP(child))
                replaced += 1
    return replaced
