"""The vision stage's direct Qwen2-VL preprocessing gives transformers' processor output bit
for bit: upscaled, downscaled, exact-fit and extreme-aspect images, at two pixel budgets; a
processor with other settings keeps transformers' path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from fixtures_vl import noise_image
from omni.stages.encoders.vision_preprocess import Qwen2VLPixels
from PIL import Image

SIZES = [(448, 448), (300, 200), (1000, 700), (57, 1003), (28, 28), (643, 97)]


@pytest.fixture(scope="module", params=[(3136, 200704), (56 * 56, 14 * 14 * 4 * 1280)])
def processor(request: pytest.FixtureRequest) -> Any:
    from transformers import Qwen2VLImageProcessor

    min_pixels, max_pixels = request.param
    return Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=14, merge_size=2,
    )  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
def test_equal_to_transformers(processor: Any, size: tuple[int, int]) -> None:
    fast = Qwen2VLPixels.for_processor(processor)
    assert fast is not None
    image = noise_image(*size, seed=size[0])
    expected = processor(images=[image], return_tensors="pt")
    got = fast(image)
    assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert got["pixel_values"].dtype == expected["pixel_values"].dtype
    assert torch.equal(got["pixel_values"], expected["pixel_values"])


def test_other_settings_keep_transformers_path(processor: Any) -> None:
    for change in ({"resample": 2}, {"do_normalize": False}, {"do_resize": False}):
        changed = type(processor)(**{**processor.to_dict(), **change})
        assert Qwen2VLPixels.for_processor(changed) is None, change
    fast = Qwen2VLPixels.for_processor(processor)
    assert fast is not None
    with pytest.raises(ValueError, match="expected an RGB image, got mode L"):
        fast(Image.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L"))
