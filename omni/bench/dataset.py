"""Requests for the load client: random text with optional media, or a folder of files.

Every item becomes OpenAI chat content parts, so the same requests drive omni, vLLM or any
OpenAI-compatible server: images as `image_url` data URLs, audio as `input_audio` (base64 WAV),
PDF pages as a `file` part with `file_data`.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The image formats a random image can be sent in, with their media types.
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg"}

# A small word list: random prompts of about the asked number of tokens for any tokenizer.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "what",
    "up",
    "can",
    "more",
    "out",
    "about",
    "into",
    "than",
    "them",
    "only",
    "some",
    "time",
    "could",
    "these",
    "two",
]


@dataclass(frozen=True)
class DatasetSpec:
    num_prompts: int = 100
    input_words: int = 128
    output_tokens: int = 128
    # Per request: this many images of this size, audio clips of this length, PDF pages.
    num_images: int = 0
    image_size: tuple[int, int] = (448, 448)
    # PNG (lossless, the heavier decode) or JPEG (what vLLM's random-mm client sends).
    image_format: str = "png"
    num_audio: int = 0
    audio_seconds: float = 5.0
    pdf_pages: int = 0
    folder: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {self.num_prompts}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be at least 1, got {self.output_tokens}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {self.image_format!r}"
            )
        for name in ("input_words", "num_images", "num_audio", "pdf_pages"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass
class BenchRequest:
    content: list[dict[str, Any]]
    output_tokens: int
    media: list[str] = field(default_factory=list)  # what the request carries, for the report


def build_requests(spec: DatasetSpec) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    files = _folder_parts(spec.folder) if spec.folder else []
    requests = []
    for index in range(spec.num_prompts):
        words = " ".join(rng.choice(_WORDS) for _ in range(spec.input_words))
        parts: list[dict[str, Any]] = []
        media: list[str] = []
        for k in range(spec.num_images):
            seed = spec.seed * 1_000_003 + index * 97 + k
            parts.append(_image_part(spec.image_size, seed, spec.image_format))
            media.append("image")
        for k in range(spec.num_audio):
            parts.append(_audio_part(spec.audio_seconds, 220.0 + 10 * ((index + k) % 50)))
            media.append("audio")
        if spec.pdf_pages:
            parts.append(_pdf_part(spec.pdf_pages, spec.seed + index))
            media.append("pdf")
        if files:
            part, kind = files[index % len(files)]
            parts.append(part)
            media.append(kind)
        parts.append({"type": "text", "text": words or "Hello"})
        requests.append(BenchRequest(parts, spec.output_tokens, media))
    return requests


def _image_data_url(image: Image.Image, image_format: str = "png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper())
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"data:{IMAGE_FORMATS[image_format]};base64,{encoded}"


def _image_part(size: tuple[int, int], seed: int, image_format: str = "png") -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    url = _image_data_url(Image.fromarray(pixels), image_format)
    return {"type": "image_url", "image_url": {"url": url}}


def _audio_part(seconds: float, frequency: float, rate: int = 16000) -> dict[str, Any]:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.2 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV")
    data = base64.b64encode(buffer.getvalue()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def _pdf_part(pages: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(842, 595, 3), dtype=np.uint8))
        for _ in range(pages)
    ]
    buffer = io.BytesIO()
    # PIL stamps the current time into the document info unless given one: a fixed date keeps
    # the bytes (and so the dataset) the same on every run.
    epoch = time.gmtime(0)
    images[0].save(
        buffer,
        format="PDF",
        save_all=True,
        append_images=images[1:],
        creationDate=epoch,
        modDate=epoch,
    )
    data = "data:application/pdf;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "file", "file": {"filename": "bench.pdf", "file_data": data}}


def _folder_parts(folder: str) -> list[tuple[dict[str, Any], str]]:
    """One content part per image, audio or PDF file in the folder (sorted by name)."""
    parts = []
    for path in sorted(Path(folder).iterdir()):
        mime = mimetypes.guess_type(path.name)[0] or ""
        data = base64.b64encode(path.read_bytes()).decode()
        if mime.startswith("image/"):
            parts.append(
                ({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}, "image")
            )
        elif mime.startswith("audio/"):
            fmt = path.suffix.lstrip(".").lower()
            parts.append(
                ({"type": "input_audio", "input_audio": {"data": data, "format": fmt}}, "audio")
            )
        elif mime == "application/pdf":
            part = {
                "type": "file",
                "file": {"filename": path.name, "file_data": f"data:{mime};base64,{data}"},
            }
            parts.append((part, "pdf"))
    if not parts:
        raise ValueError(f"folder {folder!r} holds no image, audio or PDF files")
    return parts
