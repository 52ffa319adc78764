"""The vision encoder stage: Qwen2-VL / Qwen2.5-VL's vision tower, batched across requests.

In process:

    encoder = VisionEncoder.from_pretrained(model_folder, device="cuda:0", dtype="auto")
    per_request = encoder.encode_batch([(pixel_values, image_grid_thw), ...])

where `pixel_values` `[patches, C*T*P*P]` and `image_grid_thw` int `[num_images, 3]` are one
request's images concatenated (`Qwen2VLPrompt.pixel_values` / `.image_grid_thw` from
`omni.multimodal.qwen2_vl`), and each result is that request's embeddings
`[num_image_tokens, hidden]`, the images in order: the rows to write over the request's image
placeholder tokens. They equal transformers' `get_image_features` on the same inputs.

As a stage (role "vision", `omni stage vision --model FOLDER`), requests follow the vision
contract (`omni.stages.contracts.vision`): one image as the client sent it (decoded, checked
and preprocessed here, with the checkpoint's own image processor, on a small thread pool), or
the two tensors `pixel_values` and `image_grid_thw` already made; the reply is one finished
output with the tensor `embeddings`. Requests queued together run in one forward (patches
concatenated, grid rows stacked; the tower attends within each image, so batching changes
nothing), bounded by the `max_batch_patches` option.

The tower is transformers' own module (`Qwen2_5_VisionTransformerPretrainedModel` or
`Qwen2VisionTransformerPretrainedModel`) built from `config.vision_config`, with only the
checkpoint's `visual.*` (or `model.visual.*`) tensors read, through safetensors; its attention
is replaced by `PackedVisionAttention` (vision_attention.py), which attends every window or
image of a length in one call instead of one call each, and its Conv3d patch embedding by the
equivalent GEMM (vision_patch_embed.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omni.stages.checkpoint import load_module, resolve_dtype, resolve_model_path
from omni.stages.contracts.vision import (
    CONTRACT,
    IMAGE,
    IMAGE_GRID_THW,
    PIXEL_VALUES,
    ROLE,
    EncodeImage,
)
from omni.stages.encoders.batching import BatchingEncoderWorker, EncodeOne, Inputs
from omni.stages.encoders.vision_attention import RotaryFn, pack_vision_attention
from omni.stages.encoders.vision_fused_layers import fuse_vision_layers
from omni.stages.encoders.vision_graphs import CAPTURE_AFTER, VisionTowerGraphs, batch_grids
from omni.stages.encoders.vision_patch_embed import LinearPatchEmbed
from omni.stages.encoders.vision_preprocess import Qwen2VLPixels
from omni.stages.kernels.fused_ops import vision_rotary
from omni.stages.runtime.options import parse_option
from omni.stages.runtime.worker import WorkerOptions, WorkerRequest, register_worker
from torch import nn

from omni.media import MediaError, MediaLimits, load_image

logger = logging.getLogger(__name__)

# Checkpoint prefixes of the vision tower: released Qwen checkpoints and transformers'
# save_pretrained write `visual.*`; transformers 5's module layout is `model.visual.*`.
VISION_PREFIXES = ("model.visual.", "visual.")
DEFAULT_MAX_BATCH_PATCHES = 16384


def _vision_tower_class(model_type: str) -> tuple[type[nn.Module], RotaryFn]:
    """transformers' tower class for `model_type`, and the rotary function its attention
    applies (kept by `PackedVisionAttention`, which replaces that attention): both towers'
    `apply_rotary_pos_emb_vision`, which `vision_rotary` computes in one kernel on CUDA and
    with transformers' own arithmetic elsewhere."""
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5_vl

        return qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel, vision_rotary
    if model_type == "qwen2_vl":
        from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

        return qwen2_vl.Qwen2VisionTransformerPretrainedModel, vision_rotary
    raise ValueError(
        f"model_type {model_type!r} has no supported vision tower; supported: qwen2_vl, qwen2_5_vl"
    )


@dataclass(frozen=True)
class VisionGeometry:
    """What input validation needs from the vision config."""

    patch_dim: int  # in_channels * temporal_patch_size * patch_size**2
    spatial_merge_size: int

    @classmethod
    def from_config(cls, vision_config: Any) -> VisionGeometry:
        patch_dim = (
            int(vision_config.in_channels)
            * int(vision_config.temporal_patch_size)
            * int(vision_config.patch_size) ** 2
        )
        return cls(patch_dim, int(vision_config.spatial_merge_size))


class VisionEncoder(EncodeOne):
    """Qwen2(.5)-VL vision tower: pixel patches in, merged image embeddings out."""

    def __init__(self, tower: nn.Module, geometry: VisionGeometry) -> None:
        self.tower = tower
        self.geometry = geometry
        parameter = next(tower.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.graphs: VisionTowerGraphs | None = None

    def use_graphs(
        self, max_batch_patches: int, capture: bool = True, capture_after: int = CAPTURE_AFTER
    ) -> None:
        """Run batches of same-size images through CUDA graphs of the tower (vision_graphs.py);
        `capture=False` runs the same fixed-buffer forward without graphs."""
        self.graphs = VisionTowerGraphs(self.tower, max_batch_patches, capture, capture_after)

    @classmethod
    def from_pretrained(
        cls, model: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"
    ) -> VisionEncoder:
        from transformers import AutoConfig

        folder = resolve_model_path(model)
        config = AutoConfig.from_pretrained(folder)
        vision_config = getattr(config, "vision_config", None)
        if vision_config is None:
            raise ValueError(f"{model!r} has no vision_config; it is not a vision-language model")
        tower_class, rotary = _vision_tower_class(str(config.model_type))
        torch_dtype = resolve_dtype(dtype, config)
        with torch.device(device):
            tower = tower_class._from_config(vision_config, dtype=torch_dtype)  # type: ignore[attr-defined]
        load_module(tower, folder, VISION_PREFIXES, "vision tower")
        pack_vision_attention(tower, rotary)
        tower.patch_embed = LinearPatchEmbed(tower.patch_embed)
        fuse_vision_layers(tower)
        logger.info("loaded %s from %s (%s, %s)", tower_class.__name__, folder, torch_dtype, device)
        return cls(tower, VisionGeometry.from_config(vision_config))

    def check_inputs(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> None:
        """ValueError naming what is wrong with one request's inputs."""
        patch_dim, merge = self.geometry.patch_dim, self.geometry.spatial_merge_size
        if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; "
                f"expected [patches, {patch_dim}]"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        if (
            image_grid_thw.dim() != 2
            or image_grid_thw.shape[1] != 3
            or image_grid_thw.shape[0] < 1
            or image_grid_thw.is_floating_point()
        ):
            raise ValueError(
                f"image_grid_thw must be integer [num_images, 3], got "
                f"{image_grid_thw.dtype} {tuple(image_grid_thw.shape)}"
            )
        for index, (t, h, w) in enumerate(image_grid_thw.tolist()):
            if min(t, h, w) < 1 or h % merge or w % merge:
                raise ValueError(
                    f"image {index} has grid {(t, h, w)}; t, h and w must be positive and h, w "
                    f"multiples of the merge size {merge}"
                )
        expected = int(image_grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches; image_grid_thw needs {expected}"
            )

    def num_image_tokens(self, image_grid_thw: torch.Tensor) -> int:
        return int(image_grid_thw.prod(-1).sum()) // self.geometry.spatial_merge_size**2

    @torch.no_grad()
    def encode_batch(
        self, requests: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Embeddings `[num_image_tokens, hidden]` per request, from one forward over all of
        them. Inputs must have passed `check_inputs`."""
        if not requests:
            return []
        pixel_values = torch.cat([pixels for pixels, _ in requests]).to(self.device, self.dtype)
        grids = torch.cat([grid for _, grid in requests])
        embeddings = None
        if self.graphs is not None:
            embeddings = self.graphs.run(
                pixel_values, batch_grids(grids), self.geometry.spatial_merge_size
            )
        if embeddings is None:
            grid_thw = grids.to(self.device, torch.int64)
            embeddings = self.tower(pixel_values, grid_thw=grid_thw).pooler_output
        sizes = [self.num_image_tokens(grid) for _, grid in requests]
        return list(torch.split(embeddings, sizes))


@register_worker(ROLE)
class VisionWorker(BatchingEncoderWorker):
    """The vision encoder behind the stage runtime. Options: `dtype` (auto, float32,
    bfloat16, float16), `max_batch_patches` (patches per forward; a larger single request
    still runs, alone) and `cuda_graphs` (true: same-size images run through CUDA graphs of
    the tower on a GPU)."""

    ENCODER_CLASS = VisionEncoder
    EXTRA_OPTIONS = ("cuda_graphs",)
    ROLE = ROLE
    MODEL_KIND = "a Qwen2-VL or Qwen2.5-VL folder"
    INPUT_NAMES = (PIXEL_VALUES, IMAGE_GRID_THW)
    BUDGET_OPTION = "max_batch_patches"
    DEFAULT_BUDGET = DEFAULT_MAX_BATCH_PATCHES
    # Decoding and preprocessing an image is milliseconds of CPU, mostly outside the GIL.
    PREPARE_THREADS = 4

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        text = options.extra.get("cuda_graphs", "true")
        self.cuda_graphs: bool = parse_option("cuda_graphs", text, bool)

    def load(self) -> None:
        from transformers import AutoImageProcessor

        super().load()
        encoder = self.encoder
        if encoder.device.type == "cuda" and self.cuda_graphs:
            encoder.use_graphs(self.max_batch_cost)
        self.image_processor = AutoImageProcessor.from_pretrained(
            resolve_model_path(self.options.model)
        )
        # transformers' own call, where the direct one does not cover its settings.
        self.preprocess = Qwen2VLPixels.for_processor(self.image_processor) or (
            lambda image: self.image_processor(images=[image], return_tensors="pt")
        )

    def cost(self, inputs: Inputs) -> int:
        return int(inputs[PIXEL_VALUES].shape[0])

    def close(self) -> None:
        encoder = self._encoder
        if encoder is not None and encoder.graphs is not None:
            encoder.graphs.close()
        super().close()

    def can_prepare(self, request: WorkerRequest) -> bool:
        return IMAGE in request.inputs

    def prepare(self, request: WorkerRequest) -> Inputs:
        """An image as the client sent it (or a rendered page) to the tower's inputs."""
        spec = CONTRACT.decode_request(request.body)
        data = request.inputs.get(IMAGE)
        if data is None or data.dtype != torch.uint8:
            raise ValueError(
                f"{spec.item or 'the image'}: the request has no uint8 {IMAGE!r} tensor"
            )
        image = _decode(spec, data)
        out = self.preprocess(image)
        grid = [int(v) for v in out["image_grid_thw"][0]]
        if spec.grid_thw and grid != list(spec.grid_thw):
            raise ValueError(
                f"{spec.item}: the image processor made a {tuple(grid)} patch grid where the "
                f"prompt was sized for {tuple(spec.grid_thw)}"
            )
        return {PIXEL_VALUES: out["pixel_values"], IMAGE_GRID_THW: out["image_grid_thw"]}


def _decode(spec: EncodeImage, data: torch.Tensor) -> Any:
    """The RGB image of a request, refused (ValueError naming the item) if it is not the
    image whose header the server checked."""
    from PIL import Image

    name = spec.item or "the image"
    if spec.source == "rgb":
        if data.dim() != 3 or data.shape[2] != 3:
            raise ValueError(
                f"{name}: rgb pixels must be [height, width, 3], got {tuple(data.shape)}"
            )
        image = Image.fromarray(np.ascontiguousarray(data.numpy()), mode="RGB")
    else:
        limits = MediaLimits(max_image_bytes=max(1, data.numel()), max_image_pixels=spec.max_pixels)
        try:
            image = load_image(data.numpy().tobytes(), name=name, limits=limits)
        except MediaError as exc:
            raise ValueError(str(exc)) from None
    if image.size != (spec.width, spec.height):
        raise ValueError(
            f"{name} decoded to {image.size[0]}x{image.size[1]} pixels; its header said "
            f"{spec.width}x{spec.height}"
        )
    return image
