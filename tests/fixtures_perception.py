"""Media made on the spot for the perception tests: a PDF with a text layer, the same page as a
scan (an image in a PDF, no text layer), a photo of a sign, and one file of every image and
audio kind a client may send. Byte for byte the same on every run."""

from __future__ import annotations

import io
import math

import numpy as np
import pypdfium2 as pdfium
import soundfile
from fixtures_pdf import Page, minimal_pdf
from PIL import Image, ImageDraw, ImageFont

INVOICE = "Invoice number 4711, total 35 EUR"
SIGN_WORDS = ("EXIT 24", "Main Street")


def invoice_pdf() -> bytes:
    """A Letter page whose text layer says INVOICE."""
    return minimal_pdf([Page(612, 792, (1.0, 1.0, 1.0), INVOICE)])


def page_pixels(pdf: bytes, dpi: float = 100.0) -> Image.Image:
    document = pdfium.PdfDocument(pdf)
    try:
        return document[0].render(scale=dpi / 72.0).to_pil().convert("RGB")
    finally:
        document.close()


def image_pdf(image: Image.Image, dpi: float = 100.0) -> bytes:
    """`image` as the one page of a PDF with no text layer (as a scanner writes it)."""
    out = io.BytesIO()
    image.save(out, "PDF", resolution=dpi)
    return out.getvalue()


def scanned_invoice_pdf() -> bytes:
    """The invoice page rendered to pixels and wrapped as a PDF: no text layer."""
    return image_pdf(page_pixels(invoice_pdf()))


def sign_image() -> Image.Image:
    """A green street sign with white letters, slightly turned, on a grey-blue sky."""
    sign = Image.new("RGB", (640, 400), (40, 90, 40))
    draw = ImageDraw.Draw(sign)
    draw.rectangle((60, 100, 580, 300), fill=(20, 110, 60), outline=(255, 255, 255), width=6)
    draw.text((100, 130), SIGN_WORDS[0], font=ImageFont.load_default(size=64), fill="white")
    draw.text((100, 210), SIGN_WORDS[1], font=ImageFont.load_default(size=48), fill="white")
    return sign.rotate(3, resample=Image.Resampling.BICUBIC, fillcolor=(120, 140, 160))


def encoded(image: Image.Image, format_name: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format_name, **options)
    return out.getvalue()


def sign_png() -> bytes:
    return encoded(sign_image(), "PNG")


def image_kinds() -> dict[str, tuple[bytes, str]]:
    """(file bytes, mime type) of each image kind the issue lists, each showing the sign."""
    sign = sign_image()
    grey16 = Image.fromarray(np.asarray(sign.convert("L"), np.uint16) * 257)
    # Transparent outside the sign: the letters must survive compositing.
    rgba = sign.convert("RGBA")
    alpha = Image.new("L", sign.size, 0)
    ImageDraw.Draw(alpha).rectangle((50, 90, 590, 310), fill=255)
    rgba.putalpha(alpha)
    frames = [sign, sign.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    return {
        "cmyk.jpg": (encoded(sign.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
        "grey16.png": (encoded(grey16, "PNG"), "image/png"),
        "rgba.png": (encoded(rgba, "PNG"), "image/png"),
        "animated.gif": (gif.getvalue(), "image/gif"),
        "sign.webp": (encoded(sign, "WEBP", quality=90), "image/webp"),
    }


def three_page_pdf() -> bytes:
    return minimal_pdf([Page(612, 792, (1.0, 1.0, 1.0), f"Page {n} of the report")
                        for n in (1, 2, 3)])


def tone(seconds: float = 3.0, rate: int = 16_000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32)


def audio_file(samples: np.ndarray, rate: int, format_name: str, subtype: str | None = None
               ) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=format_name, subtype=subtype)
    return out.getvalue()


def audio_kinds(speech: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """(file bytes, OpenAI's input_audio format) of each audio kind the issue lists, from
    `speech` (float32 mono at 16 kHz) resampled by whole factors and a tone."""
    import torch
    import torchaudio.functional as functional

    clip = torch.from_numpy(np.array(speech))
    at_8k = functional.resample(clip, 16_000, 8_000).numpy()
    at_48k = functional.resample(clip, 16_000, 48_000).numpy()
    stereo_8k = np.stack([at_8k, at_8k * 0.5], axis=1)
    return {
        "stereo-8k.wav": (audio_file(stereo_8k, 8_000, "WAV", "PCM_16"), "wav"),
        "pcm24-48k.wav": (audio_file(at_48k, 48_000, "WAV", "PCM_24"), "wav"),
        "speech.flac": (audio_file(speech, 16_000, "FLAC"), "flac"),
        "speech.ogg": (audio_file(speech, 16_000, "OGG", "VORBIS"), "ogg"),
        "tone.wav": (audio_file(tone(), 16_000, "WAV", "PCM_16"), "wav"),
    }
