"""Build a native model from a Hugging Face folder (or hub id) and fill its weights.

Weights come only from safetensors (`safe_open`, no pickle), sharded (an index json) or not.
The model is constructed directly on the target device in the target dtype with uninitialised
parameters, then either loaded tensor by tensor (cast on copy) or, for `load_format="dummy"`,
filled with seeded random values on the device: a 7B geometry never touches the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from omni.stages.checkpoint import (
    iterate_safetensors,
    resolve_dtype,
    resolve_model_path,
    safetensors_files,
)
from omni.stages.llm.models.base import CausalLM
from omni.stages.llm.models.registry import get_model_class
from omni.stages.llm.parallel.group import TensorParallel, building_with
from transformers import AutoConfig, PretrainedConfig

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
# The most missing tensor names an error message lists.
_MAX_NAMES_IN_ERROR = 8


def load_model(
    model_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> tuple[CausalLM, PretrainedConfig]:
    """Build the native model for `model_path` on `device` and fill its weights.

    load_format: "auto"/"safetensors" read the checkpoint; "dummy" needs only config.json and
    fills seeded random weights (deterministic for a given seed and device).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {LOAD_FORMATS}")
    folder = resolve_model_path(model_path, include_weights=load_format != "dummy")
    config = AutoConfig.from_pretrained(folder)
    model_class = get_model_class(config)
    torch_dtype = resolve_dtype(dtype, config)
    target = torch.device(device)

    with torch.device(target):
        model = model_class(config, torch_dtype)
    model.requires_grad_(False)
    model.eval()

    if load_format == "dummy":
        initialize_dummy_weights(model, seed)
    else:
        load_checkpoint(model, folder)
    logger.info(
        "loaded %s from %s (%s, %s, %s)",
        model_class.__name__,
        folder,
        torch_dtype,
        target,
        load_format,
    )
    return model, config


def check_shardable(model_path: str, tensor_parallel_size: int, expert_parallel: bool) -> None:
    """ValueError naming the first dimension of the model that `tensor_parallel_size` ranks
    cannot split (heads, KV heads, intermediate features, experts): the model is built on
    the meta device, as rank 0 would shape it, without memory or weights."""
    config = AutoConfig.from_pretrained(resolve_model_path(model_path, include_weights=False))
    group = TensorParallel.layout(0, tensor_parallel_size, expert_parallel)
    with torch.device("meta"), building_with(group):
        get_model_class(config)(config, torch.float32)


def load_checkpoint(model: CausalLM, folder: str) -> None:
    """Fill every parameter of `model` from the safetensors in `folder`; ValueError listing
    the missing checkpoint tensors (and the folder) when some parameter gets no data."""
    files = safetensors_files(folder)
    seen: set[str] = set()

    def tracked() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iterate_safetensors(files):
            seen.add(name)
            yield name, tensor

    with torch.no_grad():
        loaded = model.load_weights(tracked())
    unfilled = sorted(set(dict(model.named_parameters())) - loaded)
    if unfilled:
        missing = [
            name for param in unfilled for name in model.checkpoint_names(param) if name not in seen
        ]
        shown = ", ".join(missing[:_MAX_NAMES_IN_ERROR])
        more = (
            f" and {len(missing) - _MAX_NAMES_IN_ERROR} more"
            if len(missing) > _MAX_NAMES_IN_ERROR
            else ""
        )
        raise ValueError(
            f"checkpoint {folder!r} is missing {len(missing)} tensor(s) the model needs: "
            f"{shown}{more}"
        )


@torch.no_grad()
def initialize_dummy_weights(model: CausalLM, seed: int, scale: float | None = None) -> None:
    """Seeded random weights generated on the model's device: norms at 1 (so activations stay
    in range over many layers), biases at 0, everything else uniform in [-scale, scale]
    (default: the config's `initializer_range`, else 0.02)."""
    if scale is None:
        scale = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.uniform_(-scale, scale, generator=generator)
