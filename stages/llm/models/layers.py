"""Building blocks shared by the native decoder-only models.

Parameters are created with `torch.empty` (never a random init): the loader builds the model
directly on the target device in the target dtype and then either copies checkpoint tensors in
or fills dummy values, so a 7B geometry costs no CPU initialisation pass.

Numerics follow Hugging Face transformers on purpose (RMSNorm in float32 then cast back,
cos/sin computed in float32, residual adds in the model dtype): the correctness bar is that
greedy tokens match transformers on the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from omni.stages.kernels.fused_ops import (
    add_rms_norm,
    apply_rotary_torch,
    rms_norm,
    rotary_cos_sin_torch,
    rotary_qk,
    silu_and_mul,
    use_fused_kernels,
)
from omni.stages.llm.models.parallel_layers import ColumnParallelLinear, RowParallelLinear
from omni.stages.llm.parallel.group import Shard, current_group
from torch import nn


class Linear(ColumnParallelLinear):
    """`y = x @ W.T + b` with uninitialised parameters (the loader fills them), held whole on
    every rank (a mixture-of-experts router, for one)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, [Shard(0, out_features, out_features)], bias, dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight multiply, like transformers.

    Applied over the last dimension, so the same module serves a hidden vector and Qwen3's
    per-head q/k norms ([T, heads, head_dim]). On CUDA each call is one fused Triton kernel
    (`fused_ops`); elsewhere it is the torch code, unchanged.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the pre-norm residual add, fused with this norm
        on CUDA. The sum is rounded to the model dtype exactly as torch's `+` rounds it."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class GatedMLP(nn.Module):
    """SwiGLU MLP with gate and up projections fused into one matmul (`gate_up_proj`). Under
    tensor parallelism the intermediate features are split across ranks: gate_up is column-
    parallel (each rank its slice of gate and of up), down is row-parallel (one all-reduce)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        act: str,
        dtype: torch.dtype,
        reduce: bool = True,
    ) -> None:
        """`reduce=False` leaves each rank's partial output for the caller to sum (a
        mixture-of-experts block sums its shared expert's with the routed experts')."""
        super().__init__()
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' is")
        shard = current_group().split(intermediate_size, "intermediate_size")
        self.intermediate_size = shard.size
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [shard, shard], bias, dtype, part_names=("gate", "up")
        )
        self.down_proj = RowParallelLinear(shard, hidden_size, bias, dtype, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


# Rope types whose inverse frequencies depend only on the config (never on the running
# sequence length), so one table serves every position. "dynamic" and "longrope" rescale with
# the sequence length and are not supported.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """The rope settings as transformers 5 stores them: `config.rope_parameters`, a dict with
    `rope_type`, `rope_theta` and the type's own keys (older configs' `rope_theta` /
    `rope_scaling` are folded into it by transformers when the config is built)."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            raise ValueError("config has neither rope_parameters nor rope_theta")
        params = {"rope_type": "default", "rope_theta": theta}
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def compute_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, [rotary_dim // 2]) and the cos/sin scale for `config`."""
    params = rope_parameters_of(config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {supported}")
    if rope_type == "yarn":
        # YaRN's ramp and attention factor have several config fallbacks; transformers' own
        # function is the reference, and the result is still a static table.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))
        return inv_freq.to(torch.float32), float(attention_scaling)

    base = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise ValueError(
            f"partial_rotary_factor {params['partial_rotary_factor']} is not supported"
        )
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, params)
    return inv_freq, 1.0


def _llama3_scale(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent rescaling: long wavelengths are divided by `factor`,
    short ones kept, and the band in between interpolated smoothly."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class RotaryAngles:
    """One forward's rotary inputs, built once and shared by every layer.

    On CUDA the fused kernel derives cos/sin from `positions x inv_freq` itself, so no tables
    are built; elsewhere `cos_sin` holds them ([T, 1, head_dim] each, in the model dtype).
    """

    positions: torch.Tensor
    inv_freq: torch.Tensor
    scaling: float
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k) for q [T, heads, head_dim] and k [T, kv_heads, head_dim]; on CUDA
        q and k are rotated in place (they may be views of the fused qkv output)."""
        return rotary_qk(q, k, self.positions, self.inv_freq, self.scaling, self.cos_sin)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate-half) at arbitrary int64 positions.

    cos/sin are computed per step from the positions rather than read from a precomputed
    table: it costs T x head_dim/2 multiplies, has no maximum length, and reproduces
    transformers' float32 arithmetic exactly. Off CUDA the model computes them once per
    forward and every layer reuses them; on CUDA the fused rotary kernel computes them inline.
    """

    def __init__(self, config: Any, head_dim: int) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = compute_inv_freq(config, head_dim)
        # Built under the loader's `torch.device(...)` context: land the table there too.
        inv_freq = inv_freq.to(torch.get_default_device())
        # Non-persistent: derived from the config, never read from or written to checkpoints.
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """The rotary inputs for `positions` [T] in a model of `dtype`."""
        cos_sin = (
            None
            if use_fused_kernels(positions)
            else rotary_cos_sin_torch(positions, self.inv_freq, self.attention_scaling, dtype)
        )
        return RotaryAngles(positions, self.inv_freq, self.attention_scaling, cos_sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, heads, head_dim] by the angles whose cos/sin are given ([T, 1, head_dim])."""
    return apply_rotary_torch(x, cos, sin)
