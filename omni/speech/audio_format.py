"""Audio samples to the bytes of a response format, with soundfile (libsndfile).

`pcm` is OpenAI's raw format: 16-bit signed little-endian mono samples, no header. Every other
format is a whole file written by libsndfile; `mp3` and `opus` need a libsndfile built with
them (the wheels of soundfile >= 0.12 are), and are offered only where it is.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile

from omni.media.audio import resample

# response_format -> (libsndfile container, sample encoding); pcm is written by hand.
_SOUNDFILE_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
MEDIA_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "pcm": "audio/pcm",
}
# Opus encodes only these rates; other rates are resampled up to the next one.
_OPUS_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)


def _available() -> tuple[str, ...]:
    formats = soundfile.available_formats()
    names = ["pcm"]
    for name, (container, subtype) in _SOUNDFILE_FORMATS.items():
        if container in formats and subtype in soundfile.available_subtypes(container):
            names.append(name)
    return tuple(sorted(names))


SUPPORTED_FORMATS = _available()


def check_format(name: object) -> str:
    """`name` if it is a format this build can write, else ValueError naming the choices."""
    if not isinstance(name, str) or name not in SUPPORTED_FORMATS:
        raise ValueError(
            f"response_format {name!r} is not supported; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    return name


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as 16-bit integers (clipped: a model may overshoot, and an
    overshoot must not wrap around to the opposite sign)."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2")


def pcm16_bytes(samples: np.ndarray) -> bytes:
    """`pcm16` as raw little-endian bytes: OpenAI's `pcm` format."""
    return pcm16(samples).tobytes()


def encode_audio(samples: np.ndarray, sample_rate: int, response_format: str) -> bytes:
    """Mono float32 `samples` at `sample_rate` as a whole file (or raw PCM) in the format."""
    check_format(response_format)
    if response_format == "pcm":
        return pcm16_bytes(samples)
    container, subtype = _SOUNDFILE_FORMATS[response_format]
    data: np.ndarray = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    if response_format == "opus" and sample_rate not in _OPUS_RATES:
        target = next((r for r in _OPUS_RATES if r >= sample_rate), _OPUS_RATES[-1])
        data = resample(data, sample_rate, target)
        sample_rate = target
    if subtype == "PCM_16":
        # Our own conversion, so a WAV or FLAC holds exactly the samples `pcm` would (libsndfile
        # rounds float to int16 a little differently).
        data = pcm16(data)
    buffer = io.BytesIO()
    soundfile.write(buffer, data, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()
