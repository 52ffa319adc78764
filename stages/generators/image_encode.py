"""Generated pixels to PNG or JPEG bytes.

PIL's encoders run in C with the GIL released, so the image stage runs them on a small thread
pool beside the next batch's denoising.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# zlib level 1: on generated images levels 6-9 save a few percent of bytes for two to four
# times the CPU time, and PNG encoding is the one serial CPU cost on a request's path.
DEFAULT_PNG_COMPRESS_LEVEL = 1
# PIL's own default; above 95 files grow a lot for no visible gain.
DEFAULT_JPEG_QUALITY = 75


def encode_image(
    pixels: np.ndarray,
    output_format: str,
    quality: int | None = None,
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
) -> bytes:
    """Encode one `[height, width, 3]` uint8 RGB image."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8 pixels, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    elif output_format == "jpeg":
        jpeg_quality = DEFAULT_JPEG_QUALITY if quality is None else quality
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"output format {output_format!r} is not png or jpeg")
    return buffer.getvalue()
