"""Build a native model from a Hugging Face folder (or hub id) and fill its weights.

Weights come only from safetensors (`safe_open`, no pickle), sharded (an index json) or not.
The model is constructed directly on the target device in the target dtype with uninitialised
parameters, then either loaded tensor by tensor (cast on copy) or, for `load_format="dummy"`,
filled with seeded random values on the device: a 7B geometry never touches the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from omni.stages.llm.models.base import CausalLM
from omni.stages.llm.models.registry import get_model_class
from transformers import AutoConfig, PretrainedConfig

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# What a hub download fetches: configs, safetensors and tokenizer files, never pickled *.bin.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The most missing tensor names an error message lists.
_MAX_NAMES_IN_ERROR = 8


def resolve_model_path(model: str, include_weights: bool = True) -> str:
    """A local folder for `model`: the folder itself, or a hub snapshot of an `org/name` id.

    Raises ValueError naming `model` when it is neither an existing folder nor downloadable
    (as on a machine with no hub access).
    """
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return expanded
    if not _HUB_ID.match(model):
        raise ValueError(
            f"model path {model!r} does not exist (expected a folder or an org/name hub id)"
        )
    from huggingface_hub import snapshot_download

    patterns = HUB_ALLOW_PATTERNS if include_weights else ["*.json"]
    try:
        return str(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all mean "not available here"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"model {model!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({type(exc).__name__}: {reason}); pass a local folder instead"
        ) from exc


def resolve_dtype(dtype: str | torch.dtype, config: PretrainedConfig) -> torch.dtype:
    """`"auto"` means the checkpoint's own dtype (config `dtype`, formerly `torch_dtype`),
    float32 when the config names none."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if configured is None:
            return torch.float32
        if isinstance(configured, torch.dtype):
            resolved = configured
        else:
            resolved = _DTYPE_NAMES.get(str(configured).removeprefix("torch."), torch.float32)
    elif dtype in _DTYPE_NAMES:
        resolved = _DTYPE_NAMES[dtype]
    else:
        raise ValueError(f"dtype {dtype!r} is not one of {['auto', *_DTYPE_NAMES]}")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {resolved} is not supported; use float32, bfloat16 or float16")
    return resolved


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: those an index json names, else every *.safetensors."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt")
        )
        hint = (
            f" (found {pickled[:3]}, which would need pickle; convert to safetensors)"
            if pickled
            else ""
        )
        raise ValueError(f"no *.safetensors files in {str(folder)!r}{hint}")
    return files


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, read lazily one at a time on the CPU."""
    from safetensors import safe_open

    for path in files:
        if not path.is_file():
            raise ValueError(f"checkpoint file {str(path)!r} named by the index does not exist")
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, handle.get_tensor(name)


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
