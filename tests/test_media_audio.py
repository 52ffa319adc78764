"""Audio intake: WAV/FLAC/OGG/MP3 decode to float32 mono at the model's rate; bad audio gets
exact errors, and the length limit is applied from the header before any decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional

import omni.media.audio as audio_module
from omni.media import MediaError, MediaLimits, load_audio

LIMITS = MediaLimits()
RATE = 16_000


def stereo(frames: int = 1600) -> np.ndarray:
    """Two different channels (a sine and a slower cosine), float32, shape (frames, 2)."""
    t = np.arange(frames, dtype=np.float32)
    return np.stack([0.5 * np.sin(t / 7), 0.25 * np.cos(t / 31)], axis=1).astype(np.float32)


def encode(samples: np.ndarray, audio_format: str, rate: int = RATE, **options: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=audio_format, **options)
    return buffer.getvalue()


def reference_mono(data: bytes) -> np.ndarray:
    """What the decoder gives for `data`, mixed to mono: the exact expected result."""
    samples, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1, dtype=np.float32)


def refusal(data: bytes, name: str = "audio 1", limits: MediaLimits = LIMITS) -> MediaError:
    with pytest.raises(MediaError) as caught:
        load_audio(data, name=name, sampling_rate=RATE, limits=limits)
    assert caught.value.item == name
    return caught.value


def test_float_wav_mixes_channels_to_the_exact_mean():
    source = stereo()
    samples = load_audio(
        encode(source, "WAV", subtype="FLOAT"), name="a", sampling_rate=RATE, limits=LIMITS
    )
    assert samples.dtype == np.float32 and samples.shape == (1600,)
    assert np.array_equal(samples, source.mean(axis=1, dtype=np.float32))


# MP3 is written by libsndfile 1.1+ (1.2.2 here), so it is covered in both directions.
@pytest.mark.parametrize("audio_format", ["WAV", "FLAC", "OGG", "MP3"])
def test_each_format_decodes_to_mono_float32(audio_format):
    data = encode(stereo(), audio_format)
    samples = load_audio(data, name="a", sampling_rate=RATE, limits=LIMITS)
    expected = reference_mono(data)
    assert samples.dtype == np.float32
    assert samples.flags.c_contiguous
    if audio_format == "MP3":
        # mpg123 rounds the last float32 bit differently depending on the read size.
        np.testing.assert_allclose(samples, expected, rtol=0, atol=1e-6)
    else:
        assert np.array_equal(samples, expected)
    if audio_format in ("WAV", "FLAC"):  # lossless at 16 bits
        assert np.abs(samples - stereo().mean(axis=1)).max() < 1e-4


def test_resampled_with_torchaudio_to_the_model_rate():
    data = encode(stereo(), "WAV", rate=48_000, subtype="FLOAT")
    samples = load_audio(data, name="a", sampling_rate=RATE, limits=LIMITS)
    expected = torchaudio.functional.resample(
        torch.from_numpy(stereo().mean(axis=1, dtype=np.float32)), 48_000, RATE
    ).numpy()
    assert samples.shape == (1600 // 3 + 1,) == expected.shape
    assert np.array_equal(samples, expected)
    assert samples.dtype == np.float32


@pytest.mark.parametrize(("source", "kept"), [(22_050, True), (44_100, True), (8_000, True),
                                              (1_201, False)])
def test_resampling_keeps_small_kernels_and_matches_torchaudio(source: int, kept: bool):
    """A rate pair's kernel is built once and kept, unless it is big (1201 and 1000 Hz are
    coprime: 1.2 million taps); either way the samples are torchaudio's, bit for bit."""
    target = 1_000 if source == 1_201 else RATE
    samples = stereo(3 * source)[:, 0].copy()
    expected = torchaudio.functional.resample(torch.from_numpy(samples), source, target).numpy()
    for _ in range(2):
        assert np.array_equal(audio_module.resample(samples, source, target), expected)
    assert (audio_module._kept_resampler(source, target) is not None) == kept


def test_zero_bytes_and_zero_samples():
    assert str(refusal(b"")) == "audio 1 is empty (0 bytes)"
    silent = encode(np.zeros((0, 1), dtype=np.float32), "WAV")
    error = refusal(silent)
    assert str(error) == "audio 1 has no audio samples"
    assert error.limit is None


def test_too_many_bytes_is_refused_before_parsing():
    data = encode(stereo(), "WAV")
    error = refusal(data, limits=MediaLimits(max_audio_bytes=1000))
    assert str(error) == f"audio 1 is {len(data)} bytes; the limit is 1000 bytes"
    assert error.limit == "max_audio_bytes"


def test_longer_than_the_limit_is_refused_from_the_header(monkeypatch):
    def no_decoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the audio was decoded")

    monkeypatch.setattr(audio_module, "_decode_mono", no_decoding)
    # FLAC of silence: 3 s in a few hundred bytes, so the byte limit does not catch it.
    data = encode(np.zeros((3 * RATE, 1), dtype=np.float32), "FLAC")
    assert len(data) < 2000
    error = refusal(data, limits=MediaLimits(max_audio_seconds=2.5))
    assert str(error) == "audio 1 is 3.00 seconds long; the limit is 2.5 seconds"
    assert error.limit == "max_audio_seconds"
    error = refusal(encode(stereo(1601), "WAV"), limits=MediaLimits(max_audio_seconds=0.1))
    assert str(error) == "audio 1 is 0.10 seconds long; the limit is 0.1 seconds"


def test_a_header_that_understates_the_length_is_caught_while_decoding(monkeypatch):
    # MP3 headers estimate their length; simulate one that is too low.
    monkeypatch.setattr(audio_module, "_check_header", lambda info, name, limits: None)
    error = refusal(encode(stereo(1601), "WAV"), limits=MediaLimits(max_audio_seconds=0.1))
    assert str(error) == (
        "audio 1 decodes to more than 0.1 seconds though its header claims fewer; "
        "the limit is 0.1 seconds"
    )
    assert error.limit == "max_audio_seconds"


def streamed_flac(samples: np.ndarray) -> bytes:
    """`samples` as a FLAC whose STREAMINFO says total_samples 0 ("unknown"), as an encoder
    writing to a pipe leaves it."""
    data = bytearray(encode(samples, "FLAC"))
    # "fLaC", a 4-byte block header, then STREAMINFO: total_samples is the low 36 bits of its
    # third 8-byte field.
    field = int.from_bytes(data[18:26], "big")
    data[18:26] = (field & ~((1 << 36) - 1)).to_bytes(8, "big")
    return bytes(data)


def test_a_streamed_flac_of_unknown_length_decodes_whole():
    samples = stereo(40_000)
    data = streamed_flac(samples)
    assert soundfile.info(io.BytesIO(data)).frames == audio_module.UNKNOWN_FRAMES
    decoded = load_audio(data, name="a", sampling_rate=RATE, limits=LIMITS)
    assert np.array_equal(decoded, reference_mono(encode(samples, "FLAC")))


def test_a_streamed_flac_past_the_limit_is_caught_while_decoding():
    error = refusal(streamed_flac(stereo(1601)), limits=MediaLimits(max_audio_seconds=0.1))
    assert str(error) == (
        "audio 1 decodes to more than 0.1 seconds though its header claims fewer; "
        "the limit is 0.1 seconds"
    )


def test_exactly_at_the_length_limit_is_accepted():
    samples = load_audio(
        encode(stereo(1600), "WAV"),
        name="a",
        sampling_rate=RATE,
        limits=MediaLimits(max_audio_seconds=0.1),
    )
    assert samples.shape == (1600,)


def test_channel_and_rate_limits():
    three = np.zeros((10, 3), dtype=np.float32)
    error = refusal(encode(three, "WAV"), limits=MediaLimits(max_audio_channels=2))
    assert str(error) == "audio 1 has 3 channels; the limit is 2"
    assert error.limit == "max_audio_channels"
    error = refusal(
        encode(stereo(10), "WAV", rate=96_000), limits=MediaLimits(max_audio_sampling_rate=48_000)
    )
    assert str(error) == "audio 1 is sampled at 96000 Hz; the limit is 48000 Hz"
    assert error.limit == "max_audio_sampling_rate"


def test_truncated_files():
    flac = encode(stereo(16_000), "FLAC")
    assert str(refusal(flac[: len(flac) // 2])) == (
        "audio 1 could not be decoded: the file is truncated or corrupt"
    )
    for data in (encode(stereo(), "WAV"), flac, encode(stereo(), "OGG")):
        assert str(refusal(data[:40])) == "audio 1 is not a WAV, FLAC, OGG or MP3 audio file"


def test_text_and_unaccepted_containers():
    assert str(refusal(b"RIFF? no, just some text pretending to be audio")) == (
        "audio 1 is not a WAV, FLAC, OGG or MP3 audio file"
    )
    # libsndfile reads AIFF, but intake does not accept it.
    assert str(refusal(encode(stereo(), "AIFF"))) == (
        "audio 1 is not a WAV, FLAC, OGG or MP3 audio file"
    )


def test_non_finite_samples():
    samples = np.zeros((8, 1), dtype=np.float32)
    samples[3] = np.nan
    error = refusal(encode(samples, "WAV", subtype="FLOAT"))
    assert str(error) == "audio 1 has samples that are NaN or infinite"


def test_bad_sampling_rate_argument():
    with pytest.raises(ValueError, match=r"^sampling_rate is 0; it must be positive$"):
        load_audio(encode(stereo(), "WAV"), name="a", sampling_rate=0, limits=LIMITS)
