"""Qwen2-VL's image preprocessing in five torch calls, equal to transformers' processor.

transformers' `Qwen2VLImageProcessor` (its torchvision backend) resizes an RGB image to the
"smart" size (multiples of patch * merge, within the pixel bounds), rescales and normalizes
it, and cuts it into rows of `C * T * P * P` values, one per patch, the image repeated over the
temporal patch. It gets there through kwargs validation, image grouping and reordering: about
8 ms of Python a 448x448 image, most of it holding the GIL. The vision stage prepares images on
a thread pool, and with `--colocate-encoders` that pool shares the LLM stage's process, so its
GIL time is taken from the LLM's step loop. The same torchvision and torch calls, made directly,
give the same tensors bit for bit (tests/test_vision_preprocess.py) in a fraction of the time.

Only the processor's default path is taken over (resize, rescale and normalize on, bicubic);
a checkpoint whose processor says otherwise keeps transformers' own.
"""

from __future__ import annotations

from typing import Any

import torch

_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the Qwen2-VL default


class Qwen2VLPixels:
    """`processor(images=[image])`'s pixel_values and image_grid_thw for one RGB image."""

    def __init__(self, processor: Any) -> None:
        size = processor.size
        self.min_pixels = int(size.shortest_edge)
        self.max_pixels = int(size.longest_edge)
        self.patch = int(processor.patch_size)
        self.merge = int(processor.merge_size)
        self.temporal = int(processor.temporal_patch_size)
        # transformers fuses the rescale into the normalization the same way.
        scale = 1.0 / float(processor.rescale_factor)
        self.mean = torch.tensor(processor.image_mean) * scale
        self.std = torch.tensor(processor.image_std) * scale

    @classmethod
    def for_processor(cls, processor: Any) -> Qwen2VLPixels | None:
        """The fast path for `processor`, or None where it does not apply."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        if type(processor) is not Qwen2VLImageProcessor:
            return None
        size: Any = processor.size  # a SizeDict
        if not (
            processor.do_resize
            and processor.do_rescale
            and processor.do_normalize
            and processor.do_convert_rgb
            and int(processor.resample) == _BICUBIC
            and size.shortest_edge
            and size.longest_edge
        ):
            return None
        return cls(processor)

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        """`image` is a PIL image in RGB mode."""
        import torchvision.transforms.v2.functional as tvF
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        pixels = tvF.pil_to_tensor(image).unsqueeze(0)  # uint8 [1, C, H, W]
        height, width = pixels.shape[-2:]
        height, width = smart_resize(
            height, width, factor=self.patch * self.merge,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels,
        )  # fmt: skip
        pixels = tvF.resize(
            pixels, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True
        )
        pixels = tvF.normalize(pixels.to(torch.float32), self.mean, self.std)
        grid_h, grid_w = height // self.patch, width // self.patch
        patches = pixels.reshape(
            1, 3, grid_h // self.merge, self.merge, self.patch,
            grid_w // self.merge, self.merge, self.patch,
        ).permute(0, 2, 5, 3, 6, 1, 4, 7)  # fmt: skip
        rows = (
            patches.unsqueeze(6)
            .expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)
            .reshape(grid_h * grid_w, 3 * self.temporal * self.patch * self.patch)
        )
        return {
            "pixel_values": rows,
            "image_grid_thw": torch.tensor([[1, grid_h, grid_w]], dtype=torch.long),
        }
