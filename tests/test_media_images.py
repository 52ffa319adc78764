"""Image intake: every accepted format decodes to RGB, and bad images get exact errors."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from omni.media import MediaError, MediaLimits, check_item_count, decode_data_url, load_image

LIMITS = MediaLimits()


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def gradient(width: int = 6, height: int = 4) -> Image.Image:
    """An RGB image whose every pixel differs, so a transposed decode cannot pass."""
    pixels = (np.arange(height * width * 3) * 7 % 251).astype(np.uint8)
    return Image.fromarray(pixels.reshape(height, width, 3))


def png_chunk(kind: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int, *, ihdr_only: bool = False) -> bytes:
    """A PNG signature and a valid IHDR chunk claiming width x height, and no image data.

    An empty IDAT and IEND follow unless `ihdr_only`: PIL's header parser reads up to the
    first IDAT, so without one the file is a cut-short PNG rather than a well-formed header.
    """
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    tail = b"" if ihdr_only else png_chunk(b"IDAT") + png_chunk(b"IEND")
    return b"\x89PNG\r\n\x1a\n" + header + tail


def refusal(data: bytes, name: str = "image 2", limits: MediaLimits = LIMITS) -> MediaError:
    with pytest.raises(MediaError) as caught:
        load_image(data, name=name, limits=limits)
    assert caught.value.item == name
    return caught.value


@pytest.mark.parametrize(
    ("image_format", "options"),
    [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("GIF", {})],
)
def test_lossless_formats_decode_to_the_exact_rgb_pixels(image_format, options):
    source = gradient()
    if image_format == "GIF":
        # GIF is palette based; a 4-colour image survives it exactly.
        source = Image.fromarray(
            np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [9, 9, 9]]], dtype=np.uint8)
        )
    image = load_image(encode(source, image_format, **options), name="image 0", limits=LIMITS)
    assert image.mode == "RGB"
    assert image.size == source.size
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_jpeg_decodes_to_rgb_of_the_right_size():
    data = encode(Image.new("RGB", (8, 8), (128, 64, 32)), "JPEG", quality=95)
    image = load_image(data, name="image 0", limits=LIMITS)
    assert (image.mode, image.size) == ("RGB", (8, 8))
    # Lossy, but a flat colour comes back within one step per channel.
    assert np.abs(np.asarray(image).astype(int) - [128, 64, 32]).max() <= 1


@pytest.mark.parametrize("image_format", ["GIF", "WEBP"])
def test_animations_give_their_first_frame(image_format):
    frames = [Image.new("RGB", (3, 2), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(
        buffer, format=image_format, save_all=True, append_images=frames[1:], lossless=True
    )
    image = load_image(buffer.getvalue(), name="image 0", limits=LIMITS)
    assert np.asarray(image).tolist() == [[[255, 0, 0]] * 3] * 2


def test_modes_are_converted_to_rgb_with_transparency_over_white():
    rgba = Image.fromarray(
        np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    )
    image = load_image(encode(rgba, "PNG"), name="image 0", limits=LIMITS)
    # 128/255 of (200, 100, 0) over white: 255 + (c - 255) * 128 / 255, truncated by PIL.
    assert np.asarray(image).tolist() == [[[10, 20, 30], [255, 255, 255], [227, 177, 127]]]

    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    image = load_image(encode(grey, "PNG"), name="image 0", limits=LIMITS)
    assert np.asarray(image).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]

    palette = grey.convert("P")
    image = load_image(encode(palette, "BMP"), name="image 0", limits=LIMITS)
    assert np.asarray(image).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_zero_bytes():
    assert str(refusal(b"")) == "image 2 is empty (0 bytes)"
    assert refusal(b"").limit is None


def test_too_many_bytes_is_refused_before_parsing():
    data = encode(gradient(), "BMP")
    error = refusal(data, limits=MediaLimits(max_image_bytes=100))
    assert str(error) == f"image 2 is {len(data)} bytes; the limit is 100 bytes"
    assert error.limit == "max_image_bytes"


def test_header_claiming_100000_squared_pixels_is_refused_without_decoding(monkeypatch):
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    error = refusal(png_header_only(100_000, 100_000))
    assert str(error) == "image 2 is 100000x100000 pixels; the limit is 40000000 pixels"
    assert error.limit == "max_image_pixels"
    # Below PIL's own bomb guard, our limit is what refuses it.
    error = refusal(png_header_only(7000, 6000))
    assert str(error) == "image 2 is 7000x6000 pixels; the limit is 40000000 pixels"
    error = refusal(encode(gradient(6, 4), "PNG"), limits=MediaLimits(max_image_pixels=23))
    assert str(error) == "image 2 is 6x4 pixels; the limit is 23 pixels"
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS


def test_a_header_with_no_image_data_is_truncated():
    truncated = "image 2 could not be decoded: the file is truncated or corrupt"
    assert str(refusal(png_header_only(4, 4))) == truncated
    assert str(refusal(png_header_only(100_000, 100_000, ihdr_only=True))) == truncated
    assert str(refusal(b"\x89PNG\r\n\x1a\n")) == truncated


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_truncated_files(image_format):
    data = encode(gradient(64, 64), image_format)
    error = refusal(data[: len(data) // 2])
    assert str(error) == "image 2 could not be decoded: the file is truncated or corrupt"
    assert error.limit is None


def test_text_renamed_to_png_and_unaccepted_formats():
    assert str(refusal(b"hello, this is not a picture\n")) == (
        "image 2 is not a PNG, JPEG, WebP, GIF or BMP image"
    )
    # PIL reads TIFF, but intake does not accept it.
    assert str(refusal(encode(gradient(), "TIFF"))) == (
        "image 2 is not a PNG, JPEG, WebP, GIF or BMP image"
    )


def test_limits_are_validated():
    with pytest.raises(ValueError, match=r"^max_image_pixels is 0; it must be positive$"):
        MediaLimits(max_image_pixels=0)
    with pytest.raises(ValueError, match=r"^max_items_per_request is 2.5; it must be an integer$"):
        MediaLimits(max_items_per_request=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^max_audio_seconds is inf; it must be finite$"):
        MediaLimits(max_audio_seconds=float("inf"))
    with pytest.raises(ValueError, match=r"^max_audio_seconds is '9'; it must be a number$"):
        MediaLimits(max_audio_seconds="9")  # type: ignore[arg-type]
    assert MediaLimits(max_audio_seconds=1).max_audio_seconds == 1


def test_item_count_limit():
    check_item_count(16, LIMITS)
    with pytest.raises(
        MediaError, match=r"^request has 17 media items; the limit is 16$"
    ) as caught:
        check_item_count(17, LIMITS)
    assert caught.value.limit == "max_items_per_request"


def test_data_urls():
    png = encode(gradient(), "PNG")
    url = "data:image/PNG;base64," + base64.b64encode(png).decode()
    assert decode_data_url(url, name="image 0", limits=LIMITS) == ("image/png", png)
    assert decode_data_url("data:audio/wav;rate=16000,%00%FFa", name="audio 0", limits=LIMITS) == (
        "audio/wav",
        b"\x00\xffa",
    )

    def refused(url: str, limits: MediaLimits = LIMITS) -> str:
        with pytest.raises(MediaError) as caught:
            decode_data_url(url, name="image 0", limits=limits)
        return str(caught.value)

    small = MediaLimits(max_image_bytes=10, max_audio_bytes=4)
    eleven = base64.b64encode(b"x" * 11).decode()
    assert refused("data:image/png;base64," + eleven, small) == (
        "image 0 is 11 bytes; the limit is 10 bytes"
    )
    assert refused("data:audio/mp3;base64," + eleven, small) == (
        "image 0 is 11 bytes; the limit is 4 bytes"
    )
    assert refused("data:image/png;base64,") == "image 0 is empty (0 bytes)"
    assert refused("data:image/png;base64,abc") == (
        "image 0 is a data: URL whose base64 data is invalid"
    )
    assert refused("data:image/png;base64,ab!=") == (
        "image 0 is a data: URL whose base64 data is invalid"
    )
    assert refused("data:,hello") == (
        "image 0 has media type 'text/plain'; only image/* and audio/* data URLs are accepted"
    )
    assert refused("data:text/html;base64,aGk=") == (
        "image 0 has media type 'text/html'; only image/* and audio/* data URLs are accepted"
    )
    assert refused("https://example.com/a.png") == "image 0 is not a data: URL"
    assert (
        refused("data:image/png;base64") == "image 0 is a data: URL without a ',' before its data"
    )
