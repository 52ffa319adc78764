"""Checkpoint helpers every stage may import: finding a model's folder, choosing its dtype, and
reading its safetensors (whole, or only the tensors under some name prefixes).

Stages never import each other; what two of them need from a Hugging Face checkpoint lives here
(the LLM stage loads its whole model with it, an encoder stage only its tower's tensors).
Weights come only from safetensors (`safe_open`, no pickle).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"
# What a hub download fetches: configs, safetensors and tokenizer files, never pickled *.bin.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
DTYPE_NAMES: dict[str, torch.dtype] = {
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


def dtype_named(name: str) -> torch.dtype:
    """The dtype a `--option dtype=NAME` names; ValueError listing the names otherwise."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {['auto', *DTYPE_NAMES]}") from None


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
            resolved = DTYPE_NAMES.get(str(configured).removeprefix("torch."), torch.float32)
    else:
        resolved = dtype_named(dtype)
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


def load_prefixed_state_dict(
    folder: str, prefixes: Sequence[str], what: str
) -> dict[str, torch.Tensor]:
    """The tensors whose names start with one of `prefixes` (the first that matches is
    removed); ValueError naming `what` when there are none. Nothing else is read from disk."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                prefix = next((p for p in prefixes if name.startswith(p)), None)
                if prefix is not None:
                    state[name.removeprefix(prefix)] = handle.get_tensor(name)
    if not state:
        raise ValueError(f"checkpoint {folder!r} has no {what} tensors ({tuple(prefixes)})")
    return state


def load_module(module: nn.Module, folder: str, prefixes: Sequence[str], what: str) -> None:
    """Fill `module` from the checkpoint's tensors under `prefixes`; ValueError listing the
    missing and unexpected names when they do not match it exactly."""
    state = load_prefixed_state_dict(folder, prefixes, what)
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Non-persistent buffers (rotary inv_freq) are built from the config, never stored.
    missing = [name for name in missing if "inv_freq" not in name]
    if missing or unexpected:
        raise ValueError(
            f"{what} tensors of {folder!r} do not match the config: missing "
            f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    module.requires_grad_(False)
    module.eval()
