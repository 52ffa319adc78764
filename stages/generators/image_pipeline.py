"""One diffusers pipeline behind a batch interface: many requests' images in one `__call__`.

Written against the pipeline call API that the Stable Diffusion, SDXL, PixArt/DiT and Flux
families share (`prompt`, `negative_prompt`, `width`, `height`, `num_inference_steps`,
`guidance_scale`, `generator`, `output_type`), so any `DiffusionPipeline.from_pretrained`
folder or hub id with that call works; what a family lacks (a negative prompt, a guidance
scale) is read from its call signature, and its defaults come from there too.

Batching keeps each image's own noise: diffusers accepts one `torch.Generator` per image and
draws each image's latents from its own generator, so an image drawn inside a batch equals the
same image drawn alone (up to float rounding of the batched kernels). Generators live on the
CPU, diffusers' reproducible choice: a seed gives the same image on any device.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
from omni.stages.checkpoint import dtype_named
from omni.stages.contracts.image import ImageParamError, ImageParams
from omni.stages.generators.cuda_graphs import GraphedForward

logger = logging.getLogger(__name__)

# Denoiser rows (images times two with classifier-free guidance) up to which a forward is
# replayed as a CUDA graph. At SD 1.5 size on an H100 a forward of 8 rows is about as long on
# the GPU as its launches on the host; beyond that the GPU is the bottleneck anyway.
MAX_GRAPH_BATCH = 8


@dataclass(frozen=True)
class BatchShape:
    """What images must share to be drawn in one pipeline call."""

    width: int
    height: int
    steps: int
    guidance_scale: float | None
    # Whether a negative prompt is given. Not the same as an empty one: SDXL and others use
    # zero embeddings for "none", so the two cannot share a call.
    negative: bool

    @classmethod
    def of(cls, params: ImageParams) -> BatchShape:
        """The shape of a request with its defaults resolved (`DiffusionImageGenerator.resolve`)."""
        if params.width is None or params.height is None or params.steps is None:
            raise ValueError("resolve the request's defaults before batching it")
        return cls(
            params.width,
            params.height,
            params.steps,
            params.guidance_scale,
            params.negative_prompt is not None,
        )


@dataclass(frozen=True)
class ImageJob:
    """One image to draw; everything else comes from its batch's `BatchShape`."""

    prompt: str
    negative_prompt: str | None
    seed: int


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 on a GPU (fp16 VAEs overflow to NaN on some checkpoints; bf16 has
    fp32's range at the same speed) and float32 on the CPU, where half precision is slow."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return dtype_named(name)


class DiffusionImageGenerator:
    """A loaded pipeline, its defaults and limits, and `generate` for one batch."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.device = pipeline.device
        call = inspect.signature(pipeline.__call__).parameters
        missing = [name for name in ("prompt", "generator", "output_type") if name not in call]
        if missing:
            raise ValueError(
                f"{type(pipeline).__name__} is not a text-to-image pipeline: its call "
                f"takes no {missing}"
            )
        self._call = call
        self.takes_negative_prompt = "negative_prompt" in call
        self.takes_guidance_scale = "guidance_scale" in call
        self.default_steps = int(_default(call, "num_inference_steps", 50))
        guidance = _default(call, "guidance_scale", None)
        self.default_guidance_scale = None if guidance is None else float(guidance)
        self.default_height, self.default_width = _default_size(pipeline)
        # Pixels per latent side (times 2 where latents are packed 2x2, as in Flux): the
        # pipeline's image processor is configured with exactly that.
        processor = getattr(pipeline, "image_processor", None)
        factor = getattr(getattr(processor, "config", None), "vae_scale_factor", 8)
        self.size_multiple = max(8, int(factor))

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str = "cpu",
        dtype: str = "auto",
        channels_last: bool = False,
        fuse_qkv: bool | None = None,
        cuda_graphs: bool | None = None,
    ) -> DiffusionImageGenerator:
        """Load `model` (a folder or hub id) from safetensors only, never pickle.

        Speed settings: `cuda_graphs` (None: on for CUDA) replays the denoiser's forward as a
        CUDA graph for small batches, which are launch-bound (`cuda_graphs.GraphedForward`).
        `fuse_qkv` (None: on for CUDA) runs each attention's projections as one matmul, fewer
        launches again.
        `channels_last` puts the UNet and VAE in NHWC, the layout cuDNN's fast convolutions
        want; off by default because torch's CUDA GroupNorm returns NCHW, so every norm in
        a UNet would pay two layout copies (measure before turning it on).
        """
        from diffusers import DiffusionPipeline

        torch_dtype = resolve_dtype(dtype, device)
        with warnings.catch_warnings():
            # `torch_dtype` works on every diffusers release from 0.35; newer ones suggest
            # `dtype`, which older ones ignore.
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            pipeline = DiffusionPipeline.from_pretrained(
                model, torch_dtype=torch_dtype, use_safetensors=True
            )
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        on_gpu = torch.device(device).type == "cuda"
        if channels_last:
            for name in ("unet", "vae"):
                module = getattr(pipeline, name, None)
                if isinstance(module, torch.nn.Module):
                    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if (fuse_qkv if fuse_qkv is not None else on_gpu) and hasattr(
            pipeline, "fuse_qkv_projections"
        ):
            pipeline.fuse_qkv_projections()
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        if (cuda_graphs if cuda_graphs is not None else on_gpu) and isinstance(
            denoiser, torch.nn.Module
        ):
            # An instance attribute: Module.__call__ (and its hooks) still run around it.
            denoiser.forward = GraphedForward(denoiser.forward, max_batch=MAX_GRAPH_BATCH)
        name = type(pipeline).__name__
        logger.info("loaded %s from %s (%s, %s)", name, model, torch_dtype, device)
        return cls(pipeline)

    def resolve(self, params: ImageParams) -> ImageParams:
        """`params` with the model's defaults in place of the fields left out; an
        ImageParamError for a field this pipeline does not take. Limits are `check`'s job."""
        if params.negative_prompt is not None and not self.takes_negative_prompt:
            raise ImageParamError(
                "negative_prompt",
                f"negative_prompt is not taken by {type(self.pipeline).__name__}",
            )
        guidance = params.guidance_scale
        if guidance is not None and not self.takes_guidance_scale:
            raise ImageParamError(
                "guidance_scale", f"guidance_scale is not taken by {type(self.pipeline).__name__}"
            )
        return msgspec.structs.replace(
            params,
            width=self.default_width if params.width is None else params.width,
            height=self.default_height if params.height is None else params.height,
            steps=self.default_steps if params.steps is None else params.steps,
            guidance_scale=self.default_guidance_scale if guidance is None else guidance,
        )

    @torch.inference_mode()
    def generate(self, shape: BatchShape, jobs: Sequence[ImageJob]) -> torch.Tensor:
        """The images of `jobs`, drawn in one pipeline call: uint8 `[N, height, width, 3]` on
        the CPU, the same pixels as the pipeline's own PIL output."""
        kwargs: dict[str, Any] = {
            "prompt": [job.prompt for job in jobs],
            "width": shape.width,
            "height": shape.height,
            "num_inference_steps": shape.steps,
            "generator": [torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            # Tensors on the device: the conversion to uint8 below stays there, and only the
            # final bytes cross to the host (diffusers' own PIL path copies floats first).
            "output_type": "pt",
        }
        if shape.guidance_scale is not None and self.takes_guidance_scale:
            kwargs["guidance_scale"] = shape.guidance_scale
        if shape.negative:
            kwargs["negative_prompt"] = [job.negative_prompt or "" for job in jobs]
        images = self.pipeline(**kwargs).images
        # diffusers' numpy_to_pil in float32: (x * 255).round(), then uint8.
        pixels = (images.float() * 255).round().clamp_(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().cpu()


def _default(call: Any, name: str, fallback: Any) -> Any:
    parameter = call.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def _default_size(pipeline: Any) -> tuple[int, int]:
    """(height, width) the pipeline draws when none is given, by the same rule diffusers'
    pipelines use: the denoiser's native latent size times the VAE factor."""
    factor = int(getattr(pipeline, "vae_scale_factor", 8))
    sample = getattr(pipeline, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None) or 64
    if isinstance(sample, list | tuple):
        return int(sample[0]) * factor, int(sample[1]) * factor
    return int(sample) * factor, int(sample) * factor
