"""Parsing the values of `omni serve`'s structured flags (and their config-file keys):
device lists, media domains and Ray resources."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def parse_devices(text: str) -> dict[str, tuple[str, ...]]:
    """`llm=0,1;vision=cpu` or `llm=0,1,vision=2` to {role: devices}; a bare number is a
    CUDA index."""
    devices: dict[str, list[str]] = {}
    role = ""
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            role, _, item = item.partition("=")
            role = role.strip()
            if not role:
                raise ValueError(f"--devices {text!r}: a role name is missing before '='")
        if not role:
            raise ValueError(f"--devices {text!r} must look like llm=0,1")
        devices.setdefault(role, []).append(_device_name(item.strip()))
    return {role: tuple(names) for role, names in devices.items()}


def parse_domains(value: object) -> tuple[str, ...]:
    """`a.com,b.org` (the flag) or a YAML list to lower-case host names."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"allowed_media_domains is {value!r}; give host names like a.com,b.org")
    return tuple(str(item).strip().lower() for item in items if str(item).strip())


def _device_name(item: str) -> str:
    if item.isdigit():
        return f"cuda:{item}"
    if item == "cpu" or item.startswith("cuda"):
        return item
    raise ValueError(f"device {item!r} must be a GPU index, cuda:N or cpu")


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def parse_resources(name: str, value: object) -> dict[str, float]:
    """`GPU=1,CPU=4,big_mem=1` (the flag) or a YAML mapping to {resource: amount}."""
    if isinstance(value, Mapping):
        items = [(str(key), amount) for key, amount in value.items()]
    elif isinstance(value, str):
        items = []
        for pair in value.split(","):
            key, sep, amount = pair.strip().partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{name} {value!r} must look like GPU=1,CPU=4")
            items.append((key.strip(), amount.strip()))
    else:
        raise ValueError(f"{name} is {value!r}; give resources like GPU=1,CPU=4")
    resources = {}
    for key, amount in items:
        try:
            number = float(amount)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: {key}={amount!r} is not a number") from None
        if not number >= 0:
            raise ValueError(f"{name}: {key}={amount} must be >= 0")
        resources[key] = number
    return resources
