"""Qwen2-VL prompts know each image's patch grid from its size alone and make pixels only for
the images that get encoded."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fixtures_vl import build_vl_processor, build_vl_tokenizer, noise_image

from omni.multimodal import Qwen2VLPromptProcessor

# Sizes across smart_resize's cases: exact multiples of 28, rounding up and down, below the
# minimum pixel count, above the maximum, and tall and wide aspect ratios.
SIZES = [(56, 56), (57, 83), (100, 30), (9, 9), (640, 480), (1000, 1000), (30, 300), (301, 29)]


class CountingImageProcessor:
    """Wraps the real image processor and counts its calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def hf_processor() -> Any:
    return build_vl_processor(build_vl_tokenizer())


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_grid_from_size_equals_the_image_processor(hf_processor: Any, width: int, height: int):
    image = noise_image(width, height, seed=width * 1000 + height)
    counting = CountingImageProcessor(hf_processor.image_processor)
    processor = Qwen2VLPromptProcessor(hf_processor.tokenizer, counting)
    prompt = processor.prepare(
        prompt="<|vision_start|><|image_pad|><|vision_end|>hi", images=[image]
    )
    assert counting.calls == 0
    reference = hf_processor.image_processor(images=[image], return_tensors="pt")
    assert prompt.images[0].grid_thw == tuple(reference["image_grid_thw"][0].tolist())
    assert torch.equal(prompt.images[0].pixel_values, reference["pixel_values"])
    assert counting.calls == 1


def test_only_the_images_asked_for_are_processed(hf_processor: Any) -> None:
    counting = CountingImageProcessor(hf_processor.image_processor)
    processor = Qwen2VLPromptProcessor(hf_processor.tokenizer, counting)
    images = [noise_image(56, 84, seed=1), noise_image(84, 56, seed=2)]
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = processor.prepare(prompt=f"{pad} and {pad}", images=images)
    pixels, grid = prompt.encoder_inputs([1])
    assert counting.calls == 1
    assert grid.tolist() == [list(prompt.images[1].grid_thw)]
    assert pixels.shape[0] == int(grid.prod())
