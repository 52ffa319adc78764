"""Content hashes of multi-modal items: the key of the encoder-output cache and the extra key
folded into prefix-cache block hashes.

A stand-in until the media-intake module lands: it hashes the decoded pixels (mode, size and
raw bytes) together with the processor settings that change the embedding, so the same image
under different resize bounds or normalisation gets a different key. Swap this one function
when the media module provides its own hash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from blake3 import blake3
from PIL import Image


def image_item_hash(image: Image.Image, processor_settings: Mapping[str, Any]) -> str:
    """Hex blake3 of b"image", the pixel mode and size, the raw pixels and the settings."""
    settings = json.dumps(dict(processor_settings), sort_keys=True, default=str)
    hasher = blake3()
    hasher.update(b"image\0")
    hasher.update(f"{image.mode}\0{image.width}x{image.height}\0".encode())
    hasher.update(settings.encode())
    hasher.update(b"\0")
    hasher.update(image.tobytes())
    return hasher.hexdigest()
