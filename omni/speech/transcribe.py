"""In-process speech recognition with a transformers Whisper checkpoint (greedy decoding).

Whisper reads exactly 30 s of audio per pass, so a clip is cut into 30 s windows; every window
of every clip in a batch goes through the encoder (one window after another) and the greedy
decoder (all windows together, `whisper_greedy.py`: the token ids of transformers' `generate`,
without its per-step overhead), and each clip's text is its windows' texts joined in order.
Fixed windows can split a word that straddles a boundary; Whisper's timestamp-driven long-form
decoding avoids that at the cost of decoding sequentially, which would forbid batching windows
across clips.

The decoder runs with Whisper's timestamp tokens, so each window comes back as segments with
their start and end times (OpenAI's `verbose_json`, SRT and WebVTT need them); a window's text
is its segments' texts joined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from omni.speech.whisper_greedy import DecodeOptions, WhisperGreedyDecoder

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS
# Whisper's timestamp tokens count time in steps of 20 ms from the window's start.
TIMESTAMP_STEP_S = 0.02


class HeardWindow(NamedTuple):
    """A 30 s window after the encoder: its samples, log-mel features (1, mel bins, 3000) and
    encoder output (1, positions, width); features and output are None for a silent window."""

    samples: np.ndarray
    features: torch.Tensor | None
    encoded: torch.Tensor | None


class Segment(NamedTuple):
    """A stretch of speech: seconds from the start of its window (or clip), and its text."""

    start: float
    end: float
    text: str


def split_windows(samples: np.ndarray) -> list[np.ndarray]:
    """The clip's 30 s windows, in order (the last one shorter)."""
    return [samples[start : start + WINDOW_SAMPLES] for start in range(0, len(samples),
                                                                         WINDOW_SAMPLES)]


@dataclass(frozen=True)
class TranscriberConfig:
    """Limits of one `Transcriber`."""

    # Windows encoded and decoded in one pass; bounds the memory of a batch.
    max_batch_windows: int = 8
    # The longest clip accepted (the intake layer bounds audio too; this guards direct callers).
    max_audio_seconds: float = 600.0
    # Tokens generated per 30 s window; Whisper's decoder holds 448 positions.
    max_new_tokens: int = 440
    # Windows whose loudest sample is below this are silence and read as "" without a model
    # pass: Whisper, given nothing to hear, makes words up ("you", "Thank you.").
    silence_peak: float = 1e-3

    def __post_init__(self) -> None:
        if self.max_batch_windows < 1:
            raise ValueError(f"max_batch_windows is {self.max_batch_windows}; it must be >= 1")
        if not self.max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds is {self.max_audio_seconds}; it must be > 0")
        if not 1 <= self.max_new_tokens <= 440:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; it must be in [1, 440]")
        if not 0 <= self.silence_peak < 1:
            raise ValueError(f"silence_peak is {self.silence_peak}; it must be in [0, 1)")


class Transcriber:
    """Turns 16 kHz mono float32 samples into text with a Whisper checkpoint folder."""

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        config: TranscriberConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # Imported here: transformers is slow to import and a stage process imports this first.
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.config = config or TranscriberConfig()
        self.device = torch.device(device)
        self.processor: Any = WhisperProcessor.from_pretrained(model_dir)
        model: Any = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.dtype = dtype
        self.decoder = WhisperGreedyDecoder(self.model)

    def transcribe(self, samples: np.ndarray) -> str:
        """The text spoken in `samples` (float32, mono, 16 kHz); "" for silence."""
        return self.transcribe_batch([samples])[0]

    def transcribe_batch(self, clips: Sequence[np.ndarray]) -> list[str]:
        """One text per clip, in order; the clips' windows share encoder and decoder passes."""
        for index, samples in enumerate(clips):
            check_audio(samples, f"audio clip {index}", self.config.max_audio_seconds)
        windows: list[np.ndarray] = []
        owners: list[int] = []
        for index, samples in enumerate(clips):
            for window in split_windows(samples):
                windows.append(window)
                owners.append(index)
        texts: list[list[str]] = [[] for _ in clips]
        for owner, segments in zip(owners, self.transcribe_windows(windows), strict=True):
            texts[owner].extend(segment.text for segment in segments)
        return [" ".join(parts) for parts in texts]

    def is_silent(self, window: np.ndarray) -> bool:
        return float(np.abs(window).max()) < self.config.silence_peak

    def transcribe_windows(
        self, windows: Sequence[np.ndarray], prompt: str = "", language: str = ""
    ) -> list[list[Segment]]:
        """Each window's segments (times from the window's start), `max_batch_windows` windows
        a pass; a silent window has none. `prompt` is text the speech continues (Whisper's
        previous-text prompt: spellings, names, style); `language` an ISO code or ""."""
        results: list[list[Segment]] = []
        step = self.config.max_batch_windows
        for first in range(0, len(windows), step):
            chunk = windows[first : first + step]
            heard = [self.hear(window) for window in chunk]
            results += self.decode(heard, prompt, language)
        return results

    @torch.inference_mode()
    def hear(self, window: np.ndarray) -> HeardWindow:
        """A window's features and encoder output, ready for `decode` (None for silence): the
        half of a pass that is done one window at a time."""
        if self.is_silent(window):
            return HeardWindow(window, None, None)
        # One window a call: the feature extractor pads each to 30 s either way, and a batched
        # call was measured slower per window (21 ms against 4 ms on two CPU cores).
        features = self.processor.feature_extractor(
            window, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.device, self.dtype)
        return HeardWindow(window, features, self.decoder.encode(features)[0])

    @torch.inference_mode()
    def decode(
        self, heard: Sequence[HeardWindow], prompt: str = "", language: str = ""
    ) -> list[list[Segment]]:
        """Each heard window's segments, the windows decoded together (a silent one has none)."""
        results: list[list[Segment]] = [[] for _ in heard]
        spoken: list[int] = []
        features: list[torch.Tensor] = []
        encoded: list[torch.Tensor] = []
        for index, window in enumerate(heard):
            if window.features is not None and window.encoded is not None:
                spoken.append(index)
                features.append(window.features)
                encoded.append(window.encoded)
        if not spoken:
            return results
        prompt_ids: tuple[int, ...] = ()
        if prompt:
            prompt_ids = tuple(
                int(t) for t in self.processor.tokenizer.get_prompt_ids(prompt, return_tensors="np")
            )
        options = DecodeOptions(
            max_new_tokens=self.config.max_new_tokens,
            return_timestamps=True,
            prompt_ids=prompt_ids,
            language=language.lower() if language and self.multilingual else "",
        )
        token_ids = self.decoder.generate(torch.cat(features), options, encoded)
        for index, row in zip(spoken, token_ids, strict=True):
            results[index] = self._segments(row, len(heard[index].samples) / SAMPLE_RATE)
        return results

    @torch.inference_mode()
    def warm_up(self, steps: int = 8) -> None:
        """One pass over a full batch of a noise window, `steps` tokens long, so that the first
        requests do not pay for growing the process's heap to a full batch's tensors."""
        noise = np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
        heard = self.hear(noise)
        if heard.features is None or heard.encoded is None:
            raise RuntimeError("the warm-up noise was taken for silence; raise its level")
        rows = self.config.max_batch_windows
        self.decoder.generate(torch.cat([heard.features] * rows),
                              DecodeOptions(max_new_tokens=steps), [heard.encoded] * rows)

    def check_language(self, language: str) -> None:
        """ValueError unless the model transcribes `language` ("" = the model's own)."""
        if not language:
            return
        code = language.lower()
        if not self.multilingual:
            if code not in ("en", "english"):
                raise ValueError(
                    f"language {language!r}: this Whisper model transcribes English only ('en')"
                )
            return
        known = getattr(self.model.generation_config, "lang_to_id", None) or {}
        if f"<|{code}|>" not in known:
            raise ValueError(f"language {language!r} is not one this Whisper model knows")

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.model.generation_config, "is_multilingual", False))

    def _segments(self, token_ids: list[int], duration_s: float) -> list[Segment]:
        """Segments from one window's generated ids: text between timestamp tokens; a segment
        the decoder left open ends with the window."""
        timestamp_begin = int(self.model.generation_config.no_timestamps_token_id) + 1
        text_end = int(self.model.generation_config.eos_token_id)
        segments: list[Segment] = []
        start: float | None = None
        tokens: list[int] = []

        def close(end: float) -> None:
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if text:
                begin = 0.0 if start is None else start
                segments.append(Segment(round(begin, 2), round(max(end, begin), 2), text))
            tokens.clear()

        for token in token_ids:
            if token >= timestamp_begin:
                time_s = min((token - timestamp_begin) * TIMESTAMP_STEP_S, duration_s)
                if tokens:
                    close(time_s)
                    start = None
                else:
                    start = time_s
            elif token < text_end:
                tokens.append(token)
        if tokens:
            close(duration_s)
        return segments


def check_audio(samples: object, what: str, max_seconds: float) -> None:
    """ValueError naming `what` unless `samples` is a non-empty, finite, 1-D float32 array of at
    most `max_seconds` at 16 kHz."""
    if not isinstance(samples, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(samples).__name__}")
    if samples.dtype != np.float32:
        raise ValueError(f"{what} has dtype {samples.dtype}; float32 samples are expected")
    if samples.ndim != 1:
        raise ValueError(f"{what} has shape {samples.shape}; mono (1-D) samples are expected")
    if samples.size == 0:
        raise ValueError(f"{what} is empty")
    seconds = samples.size / SAMPLE_RATE
    if seconds > max_seconds:
        raise ValueError(f"{what} is {seconds:.1f} s long; the limit is {max_seconds:g} s")
    if not np.isfinite(samples).all():
        raise ValueError(f"{what} contains NaN or infinite samples")
