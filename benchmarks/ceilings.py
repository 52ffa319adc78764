"""The two hardware ceilings (bf16 matmul rate, device-to-device copy bandwidth) measured on
the GPU at hand, and the decoder workload floors the benchmarks compare against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# ---- the two hardware ceilings ----------------------------------------------------------------


def measure_matmul_tflops() -> float:
    n = 8192
    mats = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    for _ in range(3):
        mats[0] @ mats[1]
    times = []
    for i in range(20):
        a, b = mats[i % 2], mats[2 + i % 2]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def measure_copy_bandwidth() -> float:
    """Bytes read plus bytes written per second for a 2 GiB device-to-device copy."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n / times[len(times) // 2]


# ---- the workload's floor -----------------------------------------------------------------------


@dataclass
class Geometry:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_linear_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.inter

    @property
    def weight_bytes(self) -> int:
        # Every parameter except the embedding table, of which a step reads only its rows.
        return 2 * (self.layers * self.layer_linear_params + self.hidden * self.vocab)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def token_flops(self, context: int) -> float:
        """Linear layers plus attention (QK and PV) for one token attending to `context`."""
        return 2 * self.layers * self.layer_linear_params + 4 * self.layers * context * self.hidden

    def step_weight_bytes(self, batch: int) -> int:
        """Weights a decode step of `batch` tokens reads: all of them, for a dense model."""
        return self.weight_bytes


class FloorGeometry(Protocol):
    """What `workload_floor` needs of a model geometry (dense `Geometry`, or the MoE one of
    moe_throughput.py, whose steps read only the experts their tokens chose)."""

    @property
    def hidden(self) -> int: ...

    @property
    def vocab(self) -> int: ...

    @property
    def kv_bytes_per_token(self) -> int: ...

    def token_flops(self, context: int) -> float: ...

    def step_weight_bytes(self, batch: int) -> int | float: ...


def workload_floor(
    g: FloorGeometry, batch: int, prompt: int, output: int, flops_rate: float, bandwidth: float
) -> float:
    """Seconds the workload needs at the two ceilings: prefill at the matmul rate, then each
    decode step at the slower of its FLOPs and its bytes (weights read plus every request's
    whole KV context)."""
    # Prefill: every prompt token, attending causally (mean context prompt / 2), plus the
    # vocabulary projection of the last token.
    prefill = batch * (prompt * g.token_flops(prompt // 2) + 2 * g.hidden * g.vocab)
    seconds = prefill / flops_rate
    for step in range(1, output):
        context = prompt + step
        flops = batch * (g.token_flops(context) + 2 * g.hidden * g.vocab)
        bytes_moved = g.step_weight_bytes(batch) + batch * context * g.kv_bytes_per_token
        seconds += max(flops / flops_rate, bytes_moved / bandwidth)
    return seconds


# ---- the two engines ----------------------------------------------------------------------------
