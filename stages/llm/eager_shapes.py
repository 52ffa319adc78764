"""The token counts eager (prefill) steps run at, and warming their GEMMs up at load.

Every distinct token count is a new shape for each of a step's GEMMs, and cuBLAS picks a kernel
for a new shape on the host, as the caching allocator sizes new blocks for new activation
sizes. Eager steps are rounded up to a multiple of EAGER_TOKEN_MULTIPLE (see
step_inputs.pad_tokens), and the runner runs every linear layer shape at each such count once
at load, so serving meets none of them for the first time.
"""

from __future__ import annotations

import torch
from omni.stages.llm.models.parallel_layers import ColumnParallelLinear, RowParallelLinear

# Eager (prefill) steps' token counts are rounded up to this: at most 63 padded rows a step,
# and 128 distinct counts up to the default token budget of 8192.
EAGER_TOKEN_MULTIPLE = 64


@torch.inference_mode()
def warm_up_gemms(
    model: torch.nn.Module, max_tokens: int, multiple: int, above: int = 0
) -> None:
    """Runs every distinct linear layer shape of `model` once at each rounded token count an
    eager step can have, so that serving never meets a GEMM shape for the first time (cuBLAS
    chooses a kernel on the host for each new shape). Counts up to `above` are skipped: steps
    that small replay CUDA graphs, whose capture ran those shapes already. Weights are read in
    place; no collective runs (each tensor-parallel rank warms its own shards)."""
    layers: dict[tuple[int, int, bool, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, torch.nn.Linear)):
            continue
        weight, bias = module.weight, getattr(module, "bias", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            bias = bias if isinstance(bias, torch.Tensor) else None
            layers.setdefault((*weight.shape, bias is not None, weight.dtype), (weight, bias))
    if not layers:
        return
    most = -(-max_tokens // multiple) * multiple
    # Contiguous inputs of each width, as a step's are: the leading dimension is part of the
    # shape cuBLAS chooses for.
    device = next(iter(layers.values()))[0].device
    scratch = {
        (weight.dtype, weight.shape[1]): torch.zeros(
            most, weight.shape[1], dtype=weight.dtype, device=weight.device
        )
        for weight, _ in layers.values()
    }
    for rows in range(above + multiple - above % multiple, most + 1, multiple):
        for weight, bias in layers.values():
            x = scratch[weight.dtype, weight.shape[1]][:rows]
            torch.nn.functional.linear(x, weight, bias)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
