"""What an image request may ask for, checked before any work is done.

`ImageParams` travels as the stage request's `params` (plain msgpack values, see `to_wire`) and
is read back strictly by `from_wire`: an unknown key or a value of the wrong type is refused,
never coerced. `check` then holds it to `ImageLimits`; every refusal is an `ImageParamError`
whose message starts with the field it is about and says the limit, e.g.
"width 500 is not a multiple of 8". The HTTP edge runs the same checks, so a client hears about
a bad field without a round trip to the stage; the stage checks again because it can be reached
by any client of the transport, and fills in the model's own defaults for fields left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# torch.Generator.manual_seed takes 64-bit seeds; image k of a request is drawn with seed + k,
# so seeds stop at 2**63 - 1 and seed + k never wraps.
MAX_SEED = 2**63 - 1
# "raw": the pixels themselves, uint8 [height, width, 3], for a stage that consumes images
# rather than a client that stores them (and for measuring the stage without an encoder).
OUTPUT_FORMATS = ("png", "jpeg", "raw")


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


@dataclass(frozen=True)
class ImageParams:
    """One request: `n` images of one prompt. None means "the model's default"."""

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

    def to_wire(self) -> dict[str, Any]:
        """The stage request's `params`: plain values, fields left at None omitted."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_wire(cls, params: Mapping[str, Any]) -> ImageParams:
        """Read `to_wire`'s output back, refusing unknown keys and wrongly typed values."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ImageParamError(unknown[0], f"unknown image parameters {unknown}")
        if "prompt" not in params:
            raise ImageParamError("prompt", "prompt is missing")
        values: dict[str, Any] = {}
        for name, value in params.items():
            kind = _WIRE_TYPES[name]
            if value is None:
                continue
            if kind is float and _is_int(value):
                value = float(value)
            if not (_is_int(value) if kind is int else isinstance(value, kind)):
                raise ImageParamError(
                    name, f"{name} must be {_KIND_NAMES[kind]}, got {type(value).__name__}"
                )
            values[name] = value
        return cls(**values)

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


_WIRE_TYPES: dict[str, type] = {
    "prompt": str,
    "negative_prompt": str,
    "width": int,
    "height": int,
    "steps": int,
    "guidance_scale": float,
    "n": int,
    "seed": int,
    "output_format": str,
    "output_compression": int,
}
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number"}


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `true` is never a step count.
    return isinstance(value, int) and not isinstance(value, bool)


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
