"""Content hashes of media items: the key of the encoder-output cache and of multi-modal KV.

A hash covers everything that changes the encoder's output: the modality, the pixel or sample
layout (mode, shape, dtype), the raw bytes, and the processor settings (resize target,
normalisation, sampling rate, ...). Bytes alone are not enough: the same 16 bytes as a 2x8
and as a 4x4 image are different images.

The digest is blake3 over a msgpack header followed by the raw bytes. msgpack with sorted
keys (not Python's `hash()`, which is salted per process, and not pickle) makes the digest
the same in every process and on every node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import blake3
import msgpack
import numpy as np
from PIL import Image

# Bumped whenever the hashed layout changes, so old digests can never alias new ones.
_HASH_VERSION = "omni-media-v1"
# Multithreaded hashing pays off only for large buffers (a 4K RGB image is 25 MB).
_THREADED_HASH_BYTES = 1 << 20
# `np.asarray` on these modes yields palette indices without the palette, which would let
# two different images share a hash.
_UNHASHABLE_MODES = frozenset({"P", "PA"})

_EMPTY_SETTINGS: Mapping[str, Any] = {}


def hash_image(image: Image.Image, processor_settings: Mapping[str, Any] = _EMPTY_SETTINGS) -> str:
    """Hex blake3 digest of a decoded image (mode, size and pixels) and the processor settings."""
    if image.mode in _UNHASHABLE_MODES:
        raise ValueError(f"cannot hash an image in mode {image.mode!r}; convert it to RGB first")
    return hash_media_item("image", image.mode, np.asarray(image), processor_settings)


def hash_audio(
    samples: np.ndarray,
    sampling_rate: int,
    processor_settings: Mapping[str, Any] = _EMPTY_SETTINGS,
) -> str:
    """Hex blake3 digest of audio samples at `sampling_rate` Hz and the processor settings."""
    if sampling_rate < 1:
        raise ValueError(f"sampling_rate is {sampling_rate}; it must be positive")
    return hash_media_item("audio", f"{sampling_rate}Hz", samples, processor_settings)


def hash_media_item(
    modality: str,
    mode: str,
    array: np.ndarray,
    processor_settings: Mapping[str, Any] = _EMPTY_SETTINGS,
) -> str:
    """Hex blake3 digest over modality, mode, shape, dtype, bytes and processor settings.

    The other hash functions build on this one; a new modality (a rendered PDF page, a video
    frame stack) calls it directly with its own `modality` name.
    """
    contiguous = np.ascontiguousarray(array)
    if contiguous.dtype.hasobject:
        raise ValueError(f"cannot hash a {modality} item of dtype object")
    header = msgpack.packb(
        [
            _HASH_VERSION,
            modality,
            mode,
            list(contiguous.shape),
            contiguous.dtype.str,
            _canonical(processor_settings, "processor_settings"),
        ],
        use_bin_type=True,
    )
    threads = blake3.blake3.AUTO if contiguous.nbytes >= _THREADED_HASH_BYTES else 1
    hasher = blake3.blake3(max_threads=threads)
    # The header's length goes first so that no header/bytes split can collide with another.
    hasher.update(len(header).to_bytes(8, "little"))
    hasher.update(header)
    hasher.update(contiguous.reshape(-1).view(np.uint8).data)
    return hasher.hexdigest()


def _canonical(value: Any, where: str) -> Any:
    """`value` with every mapping's keys sorted, so equal settings always pack the same.

    Only plain msgpack types are allowed: anything else has no stable byte form.
    """
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{where} has key {key!r}; keys must be strings")
        return {key: _canonical(value[key], f"{where}[{key!r}]") for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise ValueError(
        f"{where} is a {type(value).__name__}; settings must be None, bool, int, float, str, "
        "bytes, lists or string-keyed mappings"
    )
