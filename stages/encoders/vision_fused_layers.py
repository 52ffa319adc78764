"""The Qwen2.5-VL vision tower's norms and MLPs on the shared fused kernels
(`omni.stages.kernels.fused_ops`), on CUDA; transformers' own code runs everywhere else.

transformers' RMSNorm is seven kernels with a float32 copy of its input, SiLU-and-multiply two,
and the vision rotary (`PackedVisionAttention`'s `rotary`, also taken from the shared kernels)
about fifteen over float32 copies of q and k; each becomes one kernel with torch's rounding
steps. Measured on an H200 (448x448 images, CUDA graphs, 16 a forward), these kernels and the
attention views took the tower from 8.6 to 6.0 ms an image; the MLP's padding (`SiluMulMLP`)
then took it to 3.4 ms.
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


# Intermediate sizes are padded to a multiple of this on CUDA (see `SiluMulMLP`).
PAD_INTERMEDIATE_TO = 64


class SiluMulMLP(nn.Module):
    """Drop-in for `Qwen2_5_VLMLP` with a SiLU activation, sharing its three projections:
    `down(silu(gate(x)) * up(x))` with the activation and product in one kernel.

    On CUDA an intermediate size that is not a multiple of 8 (Qwen2.5-VL's 3420) is padded
    with zero weights to a multiple of `PAD_INTERMEDIATE_TO`: with rows of 3420 bf16 values
    the operands are only 8-byte aligned and cuBLAS falls back to an sm80 CUTLASS kernel
    ("align2"); measured on an H200 those three GEMMs took 68% of the tower's GPU time, at a
    quarter of the rate of the aligned ones. The padding adds zeros to every sum (silu(0) * 0 = 0,
    and the down projection's extra columns are 0), and the projections' weights become views
    of the padded ones, so the model keeps one copy and its state dict is unchanged."""

    def __init__(self, original: nn.Module, pad: bool | None = None) -> None:
        """`pad`: None pads where it helps (CUDA weights, a size not a multiple of 8)."""
        super().__init__()
        self.gate_proj: nn.Linear = getattr(original, "gate_proj")  # noqa: B009
        self.up_proj: nn.Linear = getattr(original, "up_proj")  # noqa: B009
        self.down_proj: nn.Linear = getattr(original, "down_proj")  # noqa: B009
        self.padded: tuple[nn.Linear, nn.Linear, nn.Linear] | None = None
        intermediate = self.gate_proj.out_features
        if pad is None:
            pad = self.gate_proj.weight.is_cuda and intermediate % 8 != 0
        if pad:
            size = -(-intermediate // PAD_INTERMEDIATE_TO) * PAD_INTERMEDIATE_TO
            self.padded = (
                _pad_rows(self.gate_proj, size),
                _pad_rows(self.up_proj, size),
                _pad_columns(self.down_proj, size),
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate_proj, up_proj, down_proj = self.padded or (
            self.gate_proj, self.up_proj, self.down_proj
        )
        return down_proj(silu_mul(gate_proj(hidden_states), up_proj(hidden_states)))


def _pad_rows(linear: nn.Linear, size: int) -> nn.Linear:
    """A linear layer of `size` outputs whose first ones are `linear`'s and the rest zero;
    `linear`'s weight and bias become views of it."""
    weight = linear.weight.new_zeros(size, linear.in_features)
    weight[: linear.out_features] = linear.weight
    padded = nn.Linear(linear.in_features, size, bias=linear.bias is not None, device="meta")
    padded.weight = nn.Parameter(weight, requires_grad=False)
    linear.weight = nn.Parameter(weight[: linear.out_features], requires_grad=False)
    if linear.bias is not None:
        bias = linear.bias.new_zeros(size)
        bias[: linear.out_features] = linear.bias
        padded.bias = nn.Parameter(bias, requires_grad=False)
        linear.bias = nn.Parameter(bias[: linear.out_features], requires_grad=False)
    return padded


def _pad_columns(linear: nn.Linear, size: int) -> nn.Linear:
    """A linear layer of `size` inputs whose extra ones have zero weights."""
    weight = linear.weight.new_zeros(linear.out_features, size)
    weight[:, : linear.in_features] = linear.weight
    padded = nn.Linear(size, linear.out_features, bias=False, device="meta")
    padded.weight = nn.Parameter(weight, requires_grad=False)
    padded.bias = linear.bias
    linear.weight = nn.Parameter(weight[:, : linear.in_features], requires_grad=False)
    return padded


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
