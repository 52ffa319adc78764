"""Image intake: bytes to a fully decoded RGB `PIL.Image`, with limits checked first.

The order matters. The byte count is checked before PIL sees the data, and the pixel count is
checked from the header (`Image.open` parses only the header; decoding waits for `.load()`),
so a 1 KB file that claims 100000 x 100000 pixels costs microseconds, not gigabytes.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from omni.media.errors import MediaError
from omni.media.limits import MediaLimits, check_num_bytes

# Formats accepted from requests. Everything else PIL can read (TIFF, PSD, EPS through
# Ghostscript, ...) is refused: each plugin is attack surface, and no model needs them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_FORMAT_NAMES = "a PNG, JPEG, WebP, GIF or BMP image"

# What PIL raises on a truncated or corrupt stream, from the header parser or the decoder.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

# Transparent pixels become white, as the Hugging Face image processors do
# (`transformers.image_transforms.convert_to_rgb`), so that a transparent PNG gives the
# model the same pixels here as there.
_BACKGROUND = (255, 255, 255)
# Grey modes wider than 8 bits (16-bit PNGs open as "I;16").
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class EncodedImage:
    """An image as the client sent it, its header checked but its pixels not decoded: the
    vision stage decodes it. `name` is the request item it came from."""

    data: bytes
    width: int
    height: int
    name: str


def probe_image(data: bytes, *, name: str, limits: MediaLimits) -> EncodedImage:
    """Check one image's bytes and its header's size against `limits` without decoding it
    (MediaError naming `name` otherwise): microseconds, whatever the image."""
    check_num_bytes(len(data), limits.max_image_bytes, "max_image_bytes", name=name)
    image = _open_header(data, name=name, limits=limits)
    _check_pixels(image.size, name=name, limits=limits)
    width, height = image.size
    return EncodedImage(data, width, height, name)


def load_image(data: bytes, *, name: str, limits: MediaLimits) -> Image.Image:
    """Decode one image to RGB, refusing it (MediaError naming `name`) past `limits`.

    GIF and animated WebP give their first frame. The result is fully decoded, so using it
    raises nothing later.
    """
    check_num_bytes(len(data), limits.max_image_bytes, "max_image_bytes", name=name)
    image = _open_header(data, name=name, limits=limits)
    _check_pixels(image.size, name=name, limits=limits)
    try:
        image.load()
        return to_rgb(image)
    except Image.DecompressionBombError as error:
        # A header can understate what a later frame or chunk claims; PIL's own guard fires.
        raise MediaError(
            f"{name} could not be decoded: {error}", item=name, limit="max_image_pixels"
        ) from error
    except _DECODE_ERRORS as error:
        raise MediaError(
            f"{name} could not be decoded: the file is truncated or corrupt", item=name
        ) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB, with any transparency composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY:
        # PIL clips wide grey at 255 when it converts (a mid-grey of 30000 in a 16-bit PNG
        # becomes white); scale the 16-bit range down to 8 bits instead. (16-bit PNGs open as
        # "I;16", or as "I" holding the same 0-65535 values.)
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _open_header(data: bytes, *, name: str, limits: MediaLimits) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        # PIL refuses headers past twice its MAX_IMAGE_PIXELS before we can read the size;
        # read the header again without that guard so the message can name the dimensions.
        size = _header_size(data)
        if size is not None:
            _check_pixels(size, name=name, limits=limits)
        raise MediaError(
            f"{name} could not be decoded: {error}", item=name, limit="max_image_pixels"
        ) from error
    except Image.UnidentifiedImageError as error:
        if _claimed_format(data) is not None:
            # The signature is right but the header is cut short (a PNG with no chunk after
            # IHDR, a JPEG with no frame header).
            raise MediaError(
                f"{name} could not be decoded: the file is truncated or corrupt", item=name
            ) from error
        raise MediaError(f"{name} is not {_FORMAT_NAMES}", item=name) from error
    except _DECODE_ERRORS as error:
        raise MediaError(
            f"{name} could not be decoded: the file is truncated or corrupt", item=name
        ) from error


def _claimed_format(data: bytes) -> str | None:
    """The accepted format whose signature `data` starts with, if any."""
    for format_name in IMAGE_FORMATS:
        if format_name not in Image.OPEN:
            Image.init()
        accept = Image.OPEN[format_name][1]
        if accept is not None and accept(data[:16]):
            return format_name
    return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) a header claims, parsed by PIL's plugin without decoding."""
    format_name = _claimed_format(data)
    if format_name is None:
        return None
    factory = Image.OPEN[format_name][0]
    try:
        # The plugin's constructor parses only the header, as Image.open does before it
        # applies the decompression-bomb check.
        return factory(io.BytesIO(data), "").size
    except _DECODE_ERRORS:
        return None


def _check_pixels(size: tuple[int, int], *, name: str, limits: MediaLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise MediaError(f"{name} is {width}x{height} pixels; it has no pixels", item=name)
    if width * height > limits.max_image_pixels:
        raise MediaError(
            f"{name} is {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels",
            item=name,
            limit="max_image_pixels",
        )
