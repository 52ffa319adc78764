"""Audio intake: bytes to float32 mono samples at the model's rate, with limits checked first.

`soundfile.info` reads only the header, so the length, rate and channel count are checked
before anything is decoded. MP3 headers may estimate the length, so the decode itself also
stops one frame past the limit rather than trusting the header.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import numpy as np
import soundfile

from omni.media.errors import MediaError
from omni.media.limits import MediaLimits, check_num_bytes

# libsndfile's names for the containers accepted from requests (WAVEX is WAV with the
# extensible header). It reads many more (AIFF, CAF, MAT5, ...); each is attack surface.
AUDIO_FORMATS = frozenset({"WAV", "WAVEX", "FLAC", "OGG", "MP3"})
_FORMAT_NAMES = "a WAV, FLAC, OGG or MP3 audio file"

# Decoding goes in blocks, each mixed to mono at once, so a multi-channel file never holds
# all its channels in memory at the same time.
_BLOCK_FRAMES = 1 << 16

# What libsndfile reports as the length of a file whose header does not say (a streamed FLAC's
# STREAMINFO total_samples of 0 means "unknown"): SF_COUNT_MAX.
UNKNOWN_FRAMES = 2**63 - 1

_SOUNDFILE_ERRORS = (soundfile.SoundFileError, RuntimeError, TypeError, ValueError, EOFError)


def load_audio(data: bytes, *, name: str, sampling_rate: int, limits: MediaLimits) -> np.ndarray:
    """Decode one audio file to float32 mono at `sampling_rate` Hz.

    Channels are averaged; the rate is converted with `torchaudio.functional.resample`.
    Refuses the item (MediaError naming `name`) past `limits`.
    """
    if sampling_rate < 1:
        raise ValueError(f"sampling_rate is {sampling_rate}; it must be positive")
    check_num_bytes(len(data), limits.max_audio_bytes, "max_audio_bytes", name=name)
    info = _read_header(data, name=name)
    _check_header(info, name=name, limits=limits)
    max_frames = math.floor(limits.max_audio_seconds * info.samplerate)
    samples = _decode_mono(data, max_frames=max_frames, name=name)
    if samples.size == 0:
        raise MediaError(f"{name} has no audio samples", item=name)
    if not np.isfinite(samples).all():
        # Float WAV can carry NaN or infinity, which would poison the whole embedding.
        raise MediaError(f"{name} has samples that are NaN or infinite", item=name)
    if samples.size > max_frames:
        # The header understated the length (possible for MP3).
        raise MediaError(
            f"{name} decodes to more than {limits.max_audio_seconds:g} seconds though its "
            f"header claims fewer; the limit is {limits.max_audio_seconds:g} seconds",
            item=name,
            limit="max_audio_seconds",
        )
    return resample(samples, info.samplerate, sampling_rate)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """float32 mono `samples` converted from `source_rate` to `target_rate` Hz (torchaudio's
    band-limited windowed sinc); no samples stay none (torchaudio refuses an empty input)."""
    if source_rate == target_rate or samples.size == 0:
        return np.ascontiguousarray(samples, dtype=np.float32)
    # Imported here: torchaudio costs ~2 s to import, which image-only servers need not pay.
    import torch
    import torchaudio.functional

    waveform = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    resampler = _kept_resampler(source_rate, target_rate)
    if resampler is not None:
        return resampler(waveform).numpy()
    return torchaudio.functional.resample(waveform, source_rate, target_rate).numpy()


# A resampler holds its sinc kernel, which takes longer to build than to apply to a clip of a
# few seconds (0.45 of the 0.75 ms for 2.7 s at 22050 -> 16000 Hz). Kernels of common rate
# pairs are kept; one of (target / gcd) x (source / gcd) taps is built per call past this
# many taps (coprime rates need hundreds of megabytes).
_MAX_KEPT_KERNEL_TAPS = 1 << 20


def _kept_resampler(source_rate: int, target_rate: int) -> Any:
    """torchaudio's `Resample` for the pair, kept for later calls, or None for a big kernel.
    Its output is `torchaudio.functional.resample`'s, bit for bit (same kernel, same apply)."""
    divisor = math.gcd(source_rate, target_rate)
    if (source_rate // divisor) * (target_rate // divisor) > _MAX_KEPT_KERNEL_TAPS:
        return None
    return _resampler(source_rate, target_rate)


@functools.lru_cache(maxsize=8)
def _resampler(source_rate: int, target_rate: int) -> Any:
    import torch
    import torchaudio.transforms

    return torchaudio.transforms.Resample(source_rate, target_rate, dtype=torch.float32)


def _read_header(data: bytes, *, name: str) -> soundfile._SoundFileInfo:
    try:
        info = soundfile.info(io.BytesIO(data))
    except _SOUNDFILE_ERRORS as error:
        raise MediaError(f"{name} is not {_FORMAT_NAMES}", item=name) from error
    if info.format not in AUDIO_FORMATS:
        raise MediaError(f"{name} is not {_FORMAT_NAMES}", item=name)
    return info


def _check_header(info: soundfile._SoundFileInfo, *, name: str, limits: MediaLimits) -> None:
    if info.channels > limits.max_audio_channels:
        raise MediaError(
            f"{name} has {info.channels} channels; the limit is {limits.max_audio_channels}",
            item=name,
            limit="max_audio_channels",
        )
    if info.samplerate > limits.max_audio_sampling_rate:
        raise MediaError(
            f"{name} is sampled at {info.samplerate} Hz; "
            f"the limit is {limits.max_audio_sampling_rate} Hz",
            item=name,
            limit="max_audio_sampling_rate",
        )
    if info.frames == 0:
        raise MediaError(f"{name} has no audio samples", item=name)
    if info.frames == UNKNOWN_FRAMES:
        return  # the decode stops one frame past the limit instead
    seconds = info.frames / info.samplerate
    if seconds > limits.max_audio_seconds:
        raise MediaError(
            f"{name} is {seconds:.2f} seconds long; "
            f"the limit is {limits.max_audio_seconds:g} seconds",
            item=name,
            limit="max_audio_seconds",
        )


class _SequentialSoundFile(soundfile.SoundFile):
    """A SoundFile read front to back. soundfile seeks to its own position after every read
    of a seekable file, which libsndfile refuses for a FLAC of unknown length; a reader that
    never seeks needs no length."""

    def seekable(self) -> bool:
        return False


def _decode_mono(data: bytes, *, max_frames: int, name: str) -> np.ndarray:
    """Up to `max_frames + 1` frames mixed to mono (one more than allowed shows an overrun)."""
    blocks: list[np.ndarray] = []
    remaining = max_frames + 1
    try:
        with _SequentialSoundFile(io.BytesIO(data)) as audio_file:
            while remaining > 0:
                block = audio_file.read(
                    min(_BLOCK_FRAMES, remaining), dtype="float32", always_2d=True
                )
                if block.shape[0] == 0:
                    break
                blocks.append(block.mean(axis=1, dtype=np.float32))
                remaining -= block.shape[0]
    except _SOUNDFILE_ERRORS as error:
        raise MediaError(
            f"{name} could not be decoded: the file is truncated or corrupt", item=name
        ) from error
    if not blocks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(blocks)
