"""The image generator stage (role "image"): a prompt in, PNG or JPEG files out.

A request is `ImageParams` and no tensors. Its one reply is finished, is `ImageReply`, and
carries the tensors `image_tensor(0)` ... `image_tensor(n - 1)`: each the bytes of one encoded
file (uint8), or with `output_format="raw"` the uint8 pixels `[height, width, 3]` themselves.
Image k was drawn with `ImageReply.seeds[k]`. A refused request fails with an error that starts
with the field it is about and says the limit ("width 500 is not a multiple of 8"); a batch that
failed in the pipeline fails with one starting `GENERATION_FAILED` (the server's fault).

`ImageParams.check` holds a request to `ImageLimits`; the HTTP edge runs it too, so a client
hears about a bad field without a round trip to the stage, and the stage runs it again because
any client of the transport can reach it (and it knows the pipeline's own size multiple).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated

import msgspec
from omni.stages.contracts import Contract

ROLE = "image"
# Starts the error of a request whose batch failed (out of memory, a kernel error): the
# server's fault, where every other refusal is about the request's parameters.
GENERATION_FAILED = "image generation failed"
# torch.Generator.manual_seed takes 64-bit seeds; image k of a request is drawn with seed + k,
# so seeds stop at 2**63 - 1 and seed + k never wraps.
MAX_SEED = 2**63 - 1
# "raw": the pixels themselves, uint8 [height, width, 3], for a stage that consumes images
# rather than a client that stores them (and for measuring the stage without an encoder).
OUTPUT_FORMATS = ("png", "jpeg", "raw")

Count = Annotated[int, msgspec.Meta(ge=0)]


def image_tensor(index: int) -> str:
    """The reply tensor holding image `index` of a request."""
    return f"image_{index}"


class ImageParamError(ValueError):
    """A parameter outside what the stage serves; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ImageLimits:
    """The bounds a stage (and the HTTP edge) holds requests to."""

    # Pixels of one image. Memory grows with it (attention over latents is quadratic in it);
    # 2 MP covers SDXL's and Flux's native sizes (1024x1024, 1344x768, ...).
    max_pixels: int = 2 * 1024 * 1024
    max_steps: int = 200
    # Images per request: OpenAI's own bound for `n`.
    max_images: int = 10
    # OpenAI's DALL-E 3 bound. The text encoder sees only its own window (CLIP: 77 tokens);
    # past it a prompt is truncated, as in diffusers.
    max_prompt_chars: int = 4000
    max_guidance_scale: float = 100.0
    # Width and height must be multiples of this: the VAE downsamples by 8 (Flux packs 2x2
    # latents, so 16 there; the stage raises it to what its pipeline needs).
    size_multiple: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"{f.name} is {value}; it must be > 0")


class ImageParams(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One request: `n` images of one prompt. None means "the model's default".

    Decoding checks the types (`steps` must be an integer; a bool is not one); `check` the
    values, against limits that differ from stage to stage.
    """

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    n: int = 1
    # Image k is drawn from a generator seeded `seed + k`; None: the stage draws a seed (and
    # reports it, so the image can be made again).
    seed: int | None = None
    output_format: str = "png"
    # JPEG quality 0-100 (OpenAI's name for it); None: the encoder's default. PNG ignores it.
    output_compression: int | None = None

    def check(self, limits: ImageLimits) -> None:
        """ImageParamError for the first field outside `limits`."""
        _check_text("prompt", self.prompt, limits, required=True)
        if self.negative_prompt is not None:
            _check_text("negative_prompt", self.negative_prompt, limits, required=False)
        for name in ("width", "height"):
            side = getattr(self, name)
            if side is None:
                continue
            multiple = limits.size_multiple
            if side < multiple:
                raise ImageParamError(
                    name, f"{name} {side} is too small; the minimum is {multiple}"
                )
            if side % multiple:
                raise ImageParamError(name, f"{name} {side} is not a multiple of {multiple}")
        if self.width is not None and self.height is not None:
            pixels = self.width * self.height
            if pixels > limits.max_pixels:
                raise ImageParamError(
                    "size",
                    f"size {self.width}x{self.height} is {pixels} pixels; "
                    f"the limit is {limits.max_pixels}",
                )
        _check_range("steps", self.steps, 1, limits.max_steps)
        _check_range("n", self.n, 1, limits.max_images)
        _check_range("seed", self.seed, 0, MAX_SEED)
        _check_range("output_compression", self.output_compression, 0, 100)
        guidance = self.guidance_scale
        if guidance is not None and not (
            math.isfinite(guidance) and 0 <= guidance <= limits.max_guidance_scale
        ):
            raise ImageParamError(
                "guidance_scale",
                f"guidance_scale {guidance} is out of range; it must be in "
                f"[0, {limits.max_guidance_scale}]",
            )
        if self.output_format not in OUTPUT_FORMATS:
            raise ImageParamError(
                "output_format",
                f"output_format {self.output_format!r} is not served; use one of "
                f"{list(OUTPUT_FORMATS)}",
            )


class ImageReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What was drawn: the request's parameters with the model's defaults filled in."""

    format: str
    width: Annotated[int, msgspec.Meta(ge=1)]
    height: Annotated[int, msgspec.Meta(ge=1)]
    steps: Annotated[int, msgspec.Meta(ge=1)]
    guidance_scale: float | None
    # Image k's seed (the request's seed + k, or drawn by the stage).
    seeds: list[Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]]
    # Images drawn in the same pipeline call (this request's and its batch mates').
    batch_images: Annotated[int, msgspec.Meta(ge=1)]


class ImageStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Requests waiting for a pipeline call, images generated, and the calls that drew them
    # (images_generated / pipeline_calls is the batch size the stage achieves).
    requests_queued: Count = 0
    images_generated: Count = 0
    pipeline_calls: Count = 0


CONTRACT: Contract[ImageParams, ImageReply, ImageStats] = Contract(
    ROLE, ImageParams, ImageReply, ImageStats
)


def _check_text(name: str, text: str, limits: ImageLimits, required: bool) -> None:
    if required and not text.strip():
        raise ImageParamError(name, f"{name} is empty; describe the image to generate")
    if len(text) > limits.max_prompt_chars:
        raise ImageParamError(
            name, f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}"
        )


def _check_range(name: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise ImageParamError(
            name, f"{name} {value} is out of range; it must be in [{low}, {high}]"
        )
