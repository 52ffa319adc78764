"""Pipeline settings from a YAML file (`omni serve --config pipeline.yaml`).

The file holds the same settings as the flags, under the flags' names (dashes or
underscores), for example:

    model: /models/qwen2.5-7b
    llm-replicas: 2
    devices: {llm: [0, 1]}
    max-model-len: 8192
    options: {enable_prefix_caching: true}

Flags given on the command line win over the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from omni.server.config import ServeConfig

# vLLM's engine flags that `omni serve` takes as they are (`--dtype`, `--block-size`, ...):
# each is the LLM engine option (an EngineConfig field) of the same name, in a file too.
ENGINE_FLAGS = (
    "dtype", "gpu_memory_utilization", "enforce_eager", "max_num_batched_tokens", "block_size",
    "enable_prefix_caching", "tensor_parallel_size", "enable_expert_parallel",
)  # fmt: skip

# ServeConfig fields that `omni serve` sets itself, not a file.
_NOT_SETTINGS = frozenset({"engine_options", "api_server_rank", "api_server_dir"})
# Settings a file may hold, by their canonical (underscore) names: every ServeConfig field (so
# every flag has its key), the engine flags, and `options`.
KNOWN_KEYS = (
    frozenset(f.name for f in dataclasses.fields(ServeConfig)) - _NOT_SETTINGS
    | frozenset(ENGINE_FLAGS)
    | {"options"}
)
# What the serve command's flags may set, under the same names as ServeConfig's fields.
FLAG_SETTINGS = frozenset(f.name for f in dataclasses.fields(ServeConfig)) - {"engine_options"}



def load_config_file(path: str | Path) -> dict[str, Any]:
    """The file's settings with canonical names; `devices` as `role=a,b;...` text and
    `options` as {key: text}. ValueError names the file and the bad entry."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)  # safe_load: plain values only, never objects
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    settings: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in KNOWN_KEYS:
            raise ValueError(f"config file {path}: unknown setting {raw_key!r}")
        settings[key] = value
    if "devices" in settings:
        settings["devices"] = _devices_text(path, settings["devices"])
    if "options" in settings:
        options = settings["options"]
        if not isinstance(options, dict):
            raise ValueError(f"config file {path}: options must be a mapping of key: value")
        settings["options"] = {str(k): _option_text(v) for k, v in options.items()}
    engine = {key: _option_text(settings.pop(key)) for key in ENGINE_FLAGS if key in settings}
    if engine:
        settings["options"] = {**settings.get("options", {}), **engine}
    return settings


def _devices_text(path: str | Path, devices: Any) -> str:
    if isinstance(devices, str):
        return devices
    if not isinstance(devices, dict):
        raise ValueError(f"config file {path}: devices must be a mapping like {{llm: [0, 1]}}")
    parts = []
    for role, names in devices.items():
        items = names if isinstance(names, list) else [names]
        parts.append(f"{role}=" + ",".join(str(name) for name in items))
    return ";".join(parts)


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)
