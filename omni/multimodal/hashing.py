"""The content hash of one media item: the key of the encoder-output cache and the extra key
folded into prefix-cache block hashes.

Media intake's `hash_image` / `hash_audio` (blake3 over modality, mode, shape, dtype, bytes
and the processor settings) do the hashing; this module only brings the processor's settings
into the plain form they accept, so the same image under different resize bounds or the same
clip under different mel settings gets a different key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from omni.media import hash_audio, hash_image

# Palette images carry indices, not colours; media's hash refuses them. Expanding the palette
# keeps every pixel's colour (and the alpha channel, which RGB would drop).
_PALETTE_MODES = frozenset({"P", "PA"})


def plain_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` as JSON types only (tuples to lists, enums and paths to strings)."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    return plain


def image_item_hash(image: Image.Image, processor_settings: Mapping[str, Any]) -> str:
    """Hex blake3 content hash of `image` as processed under `processor_settings`."""
    if image.mode in _PALETTE_MODES:
        image = image.convert("RGBA")
    return hash_image(image, plain_settings(processor_settings))


def audio_item_hash(
    samples: np.ndarray, sampling_rate: int, processor_settings: Mapping[str, Any]
) -> str:
    """Hex blake3 content hash of mono `samples` at `sampling_rate` Hz as processed under
    `processor_settings`."""
    return hash_audio(samples, sampling_rate, plain_settings(processor_settings))
