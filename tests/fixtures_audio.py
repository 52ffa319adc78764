"""Spoken test clips made on the spot with espeak-ng (a Debian package, formant synthesis).

espeak-ng is deterministic for a given version and text, so a clip made here is the same clip
on every run; the tests that use it skip, naming the reason, only where espeak-ng is missing.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional

WHISPER_SAMPLE_RATE = 16_000

ESPEAK_MISSING = (
    "espeak-ng is not installed (scripts/install.sh installs it: apt-get install -y espeak-ng)"
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def require_espeak() -> None:
    """Skip the calling test, with the reason, if espeak-ng cannot be run."""
    if not espeak_available():
        pytest.skip(ESPEAK_MISSING)


def espeak_wav_bytes(text: str, *, words_per_minute: int = 160) -> bytes:
    """`text` spoken by espeak-ng's US English voice, as the WAV file it writes.

    160 words a minute, a little slower than espeak-ng's default 175, is clear to Whisper
    tiny.en (at 150 it hears "capital on France", at 120 "capital and friends")."""
    require_espeak()
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en-us", "-s", str(words_per_minute), "-w", str(wav), text],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return wav.read_bytes()


@functools.lru_cache(maxsize=16)
def espeak_samples(text: str, *, words_per_minute: int = 160) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 mono samples at Whisper's 16 kHz.

    Cached: several tests speak the same sentence. Callers must not write into the array.
    """
    wav = espeak_wav_bytes(text, words_per_minute=words_per_minute)
    with tempfile.NamedTemporaryFile(suffix=".wav") as handle:
        handle.write(wav)
        handle.flush()
        samples, rate = soundfile.read(handle.name, dtype="float32", always_2d=True)
    mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
    resampled = torchaudio.functional.resample(mono, int(rate), WHISPER_SAMPLE_RATE)
    result = resampled.numpy().astype(np.float32)
    result.setflags(write=False)
    return result


@functools.lru_cache(maxsize=1)
def converted_whisper_dir() -> str:
    """Whisper tiny.en converted once per test process into a private cache (removed at exit),
    shared by every test module that needs it (conversion takes several seconds)."""
    from omni.speech.whisper_convert import convert_whisper_tiny_en

    cache = tempfile.mkdtemp(prefix="omni-whisper-cache-")
    atexit.register(shutil.rmtree, cache, True)
    previous = os.environ.get("OMNI_CACHE_DIR")
    os.environ["OMNI_CACHE_DIR"] = cache
    try:
        return convert_whisper_tiny_en()
    finally:
        if previous is None:
            del os.environ["OMNI_CACHE_DIR"]
        else:
            os.environ["OMNI_CACHE_DIR"] = previous
