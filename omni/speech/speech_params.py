"""The settings of one speech request, checked once at the edge with errors that name the item
and its limit. The same checks run in the API process (for an early 400) and in the speech
stage (which may be reached directly, `omni stage speech`).

The fields follow OpenAI's `/v1/audio/speech` body: `input`, `voice`, `response_format`,
`speed`; omni adds `seed` (the models that sample draw from it) and `sample_rate` (resample
the output; OpenAI's formats are 24 kHz).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omni.speech.audio_format import check_format

# OpenAI's limit on `input`, in characters.
DEFAULT_MAX_INPUT_CHARS = 4096
# OpenAI's range for `speed`; a voice may allow less (see `Synthesizer.speed_range`).
SPEED_RANGE = (0.25, 4.0)
SAMPLE_RATE_RANGE = (8_000, 48_000)


class SpeechParamError(ValueError):
    """A bad speech setting; `param` names the field, as OpenAI's error JSON does."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SpeechParams:
    input: str
    # None: the voice model's default voice.
    voice: str | None = None
    # None: the stage returns samples only, no encoded file.
    response_format: str | None = None
    speed: float = 1.0
    # Sentence i is drawn with seed + i, so a sentence's audio does not depend on the length
    # of the ones before it. Fixed by default: the same text gives the same audio.
    seed: int = 0
    # None: the voice model's own rate.
    sample_rate: int | None = None
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS

    def __post_init__(self) -> None:
        if not isinstance(self.input, str):
            raise SpeechParamError("input", f"input must be a string, got {_kind(self.input)}")
        if not self.input.strip():
            raise SpeechParamError("input", "input is empty: there is no text to speak")
        if len(self.input) > self.max_input_chars:
            raise SpeechParamError(
                "input",
                f"input is {len(self.input)} characters long; the limit is "
                f"{self.max_input_chars} characters",
            )
        if self.voice is not None and (not isinstance(self.voice, str) or not self.voice):
            raise SpeechParamError("voice", f"voice must be a voice name, got {self.voice!r}")
        if self.response_format is not None:
            try:
                check_format(self.response_format)
            except ValueError as exc:
                raise SpeechParamError("response_format", str(exc)) from None
        low, high = SPEED_RANGE
        if (
            isinstance(self.speed, bool)
            or not isinstance(self.speed, int | float)
            or not math.isfinite(self.speed)
            or not low <= self.speed <= high
        ):
            raise SpeechParamError(
                "speed", f"speed is {self.speed!r}; it must be a number in [{low}, {high}]"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpeechParamError("seed", f"seed is {self.seed!r}; it must be an integer >= 0")
        if self.sample_rate is not None:
            low_rate, high_rate = SAMPLE_RATE_RANGE
            if (
                isinstance(self.sample_rate, bool)
                or not isinstance(self.sample_rate, int)
                or not low_rate <= self.sample_rate <= high_rate
            ):
                raise SpeechParamError(
                    "sample_rate",
                    f"sample_rate is {self.sample_rate!r}; it must be an integer in "
                    f"[{low_rate}, {high_rate}]",
                )

    def wire(self) -> dict[str, Any]:
        """The request params a speech stage reads back with `from_wire`."""
        params: dict[str, Any] = {"input": self.input, "speed": float(self.speed)}
        params["seed"] = self.seed
        for name in ("voice", "response_format", "sample_rate"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        return params

    @classmethod
    def from_wire(
        cls, params: Mapping[str, Any], max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    ) -> SpeechParams:
        known = {"input", "voice", "response_format", "speed", "seed", "sample_rate"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise SpeechParamError(
                unknown[0], f"unknown speech parameter {unknown[0]!r}; known: {sorted(known)}"
            )
        if "input" not in params:
            raise SpeechParamError("input", "a speech request needs 'input' (the text to speak)")
        return cls(max_input_chars=max_input_chars, **params)


def _kind(value: object) -> str:
    return type(value).__name__
