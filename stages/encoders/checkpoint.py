"""Loading an encoder's modules from the tensors of a multi-modal checkpoint.

An encoder stage reads only its own tensors (the vision tower's, the audio tower's and its
projector's) out of the checkpoint's safetensors, selected by name prefix, and loads them
strictly into transformers' own modules built from the config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omni.stages.llm.models.loader import safetensors_files
from torch import nn


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
