"""A tiny random-weight Qwen2.5-VL checkpoint with tokenizer and processor, built offline.

`make_tiny_qwen2_5_vl(path)` writes config.json, safetensors (vision tower and language model),
a byte-level BPE tokenizer carrying Qwen's vision special tokens, a chat template that renders
image content items the way Qwen's does, and the image/video processor configs, so that
transformers' `Qwen2_5_VLForConditionalGeneration`, `AutoProcessor` and omni's loaders all
read the same folder. Everything is seeded: the same call gives the same bytes.

Sizes: text hidden 64 (4 query / 2 KV heads, head_dim 16, mrope_section [2, 3, 3]), vision
hidden 32 with patch 14 and merge 2; one window-attention block and one full-attention block
(window 56 px, i.e. 2x2 merged patches), so the window permutation is exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fixtures_models import build_tokenizer, load_reference, save_random_model
from PIL import Image

# Qwen's special tokens; the BPE trainer numbers them first, in this order.
VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 3, 4, 5, 6
# Qwen2-VL's chat template, reduced to what the tests use: text and image content items.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "Describe this image. What is in the picture? A red square on a blue background.",
    "The capital of France is Paris. Compare the two images and count the objects.",
    "user assistant system: answer briefly. 0123456789",
] * 4
VL_VOCAB_SIZE = 320
# Image processor bounds in pixels: small enough that the test images stay a few patches.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 64


def build_vl_tokenizer() -> Any:
    fast = build_tokenizer(VL_VOCAB_SIZE, VL_SPECIAL_TOKENS, VL_CHAT_TEMPLATE, corpus=_CORPUS)
    ids = fast.convert_tokens_to_ids(VL_SPECIAL_TOKENS)
    assert ids == list(range(len(VL_SPECIAL_TOKENS))), ids
    return fast


def tiny_vl_config(vocab_size: int, family: str = "qwen2_5_vl") -> Any:
    """The tiny config of `family`: "qwen2_5_vl" (windowed vision attention, SwiGLU tower)
    or "qwen2_vl" (full vision attention, quick-GELU tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        # head_dim 16: the sections (temporal, height, width) cover its 8 frequencies.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
        },
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    tokens: dict[str, Any] = {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "tie_word_embeddings": False,
    }
    if family == "qwen2_vl":
        qwen2_vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        return Qwen2VLConfig(
            text_config=text,
            vision_config=qwen2_vision,
            architectures=["Qwen2VLForConditionalGeneration"],
            **tokens,
        )
    if family != "qwen2_5_vl":
        raise ValueError(f"unknown VL family {family!r}; choose qwen2_5_vl or qwen2_vl")
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        **tokens,
    )


def build_vl_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=VL_CHAT_TEMPLATE,
    )


def make_tiny_qwen2_5_vl(path: str | Path, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Write the tiny checkpoint, tokenizer and processor into `path`; returns the folder.

    Every parameter is random (norms near 1, the rest scaled noise), so a mis-mapped norm,
    bias or tower weight shows up in the comparisons. `family="qwen2_vl"` writes a Qwen2-VL
    checkpoint instead.
    """
    from transformers import AutoModelForImageTextToText

    tokenizer = build_vl_tokenizer()
    config = tiny_vl_config(len(tokenizer), family)
    return save_random_model(
        path,
        lambda: AutoModelForImageTextToText.from_config(config),
        build_vl_processor(tokenizer),
        seed,
    )


def load_reference_vl(folder: str | Path) -> Any:
    """transformers' model on the same folder, fp32, eager attention, eval mode."""
    from transformers import AutoModelForImageTextToText

    return load_reference(AutoModelForImageTextToText, folder)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noise RGB image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def processed_noise_images(
    folder: str | Path, sizes: list[tuple[int, int]]
) -> list[tuple[Any, Any]]:
    """(pixel_values, image_grid_thw) of a noise image per (width, height), by the folder's
    own image processor; image i is seeded with i."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    inputs = []
    for index, (width, height) in enumerate(sizes):
        out = processor(images=[noise_image(width, height, seed=index)], return_tensors="pt")
        inputs.append((out["pixel_values"], out["image_grid_thw"]))
    return inputs


def reference_image_embeddings(reference: Any, pixels: Any, grid: Any) -> Any:
    """transformers' merged image embeddings of one request's images, concatenated."""
    import torch

    with torch.no_grad():
        return torch.cat(reference.model.get_image_features(pixels, grid).pooler_output)
