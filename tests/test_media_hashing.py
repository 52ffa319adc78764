"""Content hashes: layout and settings are part of the key; equal pixels hash equal."""

from __future__ import annotations

import io

import blake3
import msgpack
import numpy as np
import pytest
from PIL import Image

from omni.media import MediaLimits, hash_audio, hash_image, hash_media_item, load_image

SIXTEEN_BYTES = bytes(range(0, 160, 10))


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def test_same_bytes_in_two_shapes_hash_differently():
    wide = Image.frombytes("L", (8, 2), SIXTEEN_BYTES)
    square = Image.frombytes("L", (4, 4), SIXTEEN_BYTES)
    assert wide.tobytes() == square.tobytes()
    assert hash_image(wide) != hash_image(square)
    flat = np.frombuffer(SIXTEEN_BYTES, dtype=np.uint8)
    assert hash_media_item("image", "L", flat.reshape(2, 8)) != hash_media_item(
        "image", "L", flat.reshape(4, 4)
    )


def test_mode_modality_and_dtype_are_part_of_the_hash():
    flat = np.frombuffer(SIXTEEN_BYTES, dtype=np.uint8)
    base = hash_media_item("image", "L", flat)
    assert hash_media_item("audio", "L", flat) != base
    assert hash_media_item("image", "P", flat) != base
    assert hash_media_item("image", "L", flat.view(np.int8)) != base
    assert hash_media_item("image", "L", flat.copy()) == base


def test_same_pixels_from_png_and_bmp_hash_the_same():
    pixels = (np.arange(5 * 3 * 3) * 11 % 256).astype(np.uint8).reshape(5, 3, 3)
    source = Image.fromarray(pixels)
    limits = MediaLimits()
    from_png = load_image(encoded(source, "PNG"), name="image 0", limits=limits)
    from_bmp = load_image(encoded(source, "BMP"), name="image 1", limits=limits)
    assert hash_image(from_png) == hash_image(from_bmp) == hash_image(source)
    # A view with different strides (a crop) hashes as its own contiguous pixels.
    assert hash_media_item("image", "RGB", pixels[1:3]) == hash_image(source.crop((0, 1, 3, 3)))


def test_processor_settings_change_the_hash_but_not_their_order():
    image = Image.frombytes("L", (4, 4), SIXTEEN_BYTES)
    plain = hash_image(image)
    settings = {"size": {"height": 224, "width": 224}, "do_normalize": True}
    with_settings = hash_image(image, settings)
    assert with_settings != plain
    assert hash_image(image, {}) == plain
    reordered = {"do_normalize": True, "size": {"width": 224, "height": 224}}
    assert hash_image(image, reordered) == with_settings
    assert hash_image(image, {**settings, "size": {"height": 336, "width": 224}}) != with_settings
    # msgpack packs tuples and lists alike, so a setting may be either.
    assert hash_image(image, {"mean": (0.5, 0.5)}) == hash_image(image, {"mean": [0.5, 0.5]})
    assert hash_image(image, {"mean": (0.5, 0.5)}) != hash_image(image, {"mean": (0.5, 0.25)})


def test_exact_digest_of_a_fixed_tiny_image():
    # Fixed forever: a change here means every cache key (encoder outputs, multi-modal KV
    # blocks) changes too, so bump the hash version on purpose rather than by accident.
    image = Image.frombytes("RGB", (2, 2), bytes(range(12)))
    assert hash_image(image) == ("708aa372774a0690abade8ec21edba3174a08152d464094ff7ee0fbebb34e4ef")
    assert hash_image(image, {"size": 224}) == (
        "947420477985943719d5361ff72a1000403ce976f38a74a075628ca199c0ced4"
    )


def test_digest_is_blake3_over_the_documented_layout():
    # 8-byte little-endian header length, msgpack header, raw bytes: recomputed by hand here
    # so that another process (or language) can produce the same keys.
    header = msgpack.packb(
        ["omni-media-v1", "image", "RGB", [2, 2, 3], "|u1", {"a": 1, "b": [2.5, None]}]
    )
    expected = blake3.blake3(len(header).to_bytes(8, "little") + header + bytes(range(12)))
    image = Image.frombytes("RGB", (2, 2), bytes(range(12)))
    assert hash_image(image, {"b": (2.5, None), "a": 1}) == expected.hexdigest()


def test_exact_digest_of_a_large_image_hashed_on_several_threads():
    pixels = (np.arange(1024 * 512 * 3) % 251).astype(np.uint8).reshape(1024, 512, 3)
    assert pixels.nbytes >= 1 << 20  # past the multithreaded-hash threshold
    assert hash_image(Image.fromarray(pixels)) == (
        "c62ae85e4f141a37fa6224a531813a126022d764e9d7aff737ba45801b0fdf9f"
    )


def test_audio_hash_covers_rate_dtype_and_settings():
    samples = np.linspace(-1, 1, 32, dtype=np.float32)
    base = hash_audio(samples, 16_000)
    assert len(base) == 64 and int(base, 16) >= 0
    assert hash_audio(samples, 16_000) == base
    assert hash_audio(samples, 24_000) != base
    assert hash_audio(samples.astype(np.float64), 16_000) != base
    assert hash_audio(samples, 16_000, {"feature_size": 80}) != base
    assert hash_audio(samples, 16_000) == (
        "913795b62dfb1e50876953940fbb1fc6e612d70b17d58ec4c95efd8561845707"
    )


def test_bad_inputs():
    palette = Image.new("P", (2, 2))
    with pytest.raises(ValueError, match=r"^cannot hash an image in mode 'P'; convert it to RGB"):
        hash_image(palette)
    image = Image.new("RGB", (2, 2))
    with pytest.raises(
        ValueError, match=r"^processor_settings\['crop'\] is a object; settings must be None"
    ):
        hash_image(image, {"crop": object()})
    with pytest.raises(ValueError, match=r"^processor_settings has key 3; keys must be strings$"):
        hash_image(image, {3: "x"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"^sampling_rate is 0; it must be positive$"):
        hash_audio(np.zeros(4, dtype=np.float32), 0)
    with pytest.raises(ValueError, match=r"^cannot hash a audio item of dtype object$"):
        hash_media_item("audio", "mono", np.array([None, 1], dtype=object))
