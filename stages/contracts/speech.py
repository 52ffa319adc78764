"""The speech stage (role "speech"): text in, audio streamed out sentence by sentence.

A request is `SpeechParams` and no tensors: OpenAI's `/v1/audio/speech` fields (`input`,
`voice`, `response_format`, `speed`) plus `seed` (the models that sample draw sentence i from
`seed + i`) and `sample_rate` (resample the output; OpenAI's formats are 24 kHz). The text is
cut into sentences and each sentence is answered as soon as it is spoken: a `SpeechReply` with
the tensor `AUDIO` (float32 mono samples of that sentence at `sample_rate`). The last reply is
`finished`, adds the totals and, when the request named a `response_format`, the tensor
`ENCODED`: the whole utterance as one file (uint8 bytes; raw 16-bit PCM for "pcm").

A request with `describe` set speaks nothing: its one reply holds `voice_model` alone, or, when
it names a `voice` or `speed` the model cannot honour, the same refusal a real request would
get (the API process asks before it starts an LLM whose answer is to be spoken).

Every refusal is a `SpeechParamError` whose message starts with the field it is about and says
the limit; `SpeechParams.check` runs at the HTTP edge (an early 400) and again in the stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import msgspec
from omni.stages.contracts import Contract

ROLE = "speech"
# Reply tensors: one sentence's float32 samples, and the whole utterance's file (last reply).
AUDIO_OUTPUT = "audio"
ENCODED_OUTPUT = "encoded"

# OpenAI's limit on `input`, in characters.
DEFAULT_MAX_INPUT_CHARS = 4096
# OpenAI's range for `speed`; a voice may allow less (see `VoiceModel.speed_range`).
SPEED_RANGE = (0.25, 4.0)
SAMPLE_RATE_RANGE = (8_000, 48_000)
# The formats a request may name; which of them a build can write depends on its libsndfile
# (`omni.speech.audio_format.SUPPORTED_FORMATS`, which callers pass to `check`).
RESPONSE_FORMATS = ("flac", "mp3", "opus", "pcm", "wav")

Count = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


class SpeechParamError(ValueError):
    """A bad speech setting; `param` names the field, as OpenAI's error JSON does."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class SpeechParams(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    # The text to speak (empty, and ignored, for `describe`).
    input: str = ""
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
    # Speak nothing: answer with the voice model's description (see the module docstring).
    describe: bool = False

    def check(
        self,
        max_input_chars: int = DEFAULT_MAX_INPUT_CHARS,
        formats: Sequence[str] = RESPONSE_FORMATS,
    ) -> None:
        """SpeechParamError for the first field out of bounds; `formats` are those this build
        can write. Whether the voice exists is the voice model's to say."""
        if not self.describe:
            if not self.input.strip():
                raise SpeechParamError("input", "input is empty: there is no text to speak")
            if len(self.input) > max_input_chars:
                raise SpeechParamError(
                    "input",
                    f"input is {len(self.input)} characters long; the limit is "
                    f"{max_input_chars} characters",
                )
        if self.voice is not None and not self.voice:
            raise SpeechParamError("voice", f"voice must be a voice name, got {self.voice!r}")
        if self.response_format is not None and self.response_format not in formats:
            raise SpeechParamError(
                "response_format",
                f"response_format {self.response_format!r} is not supported; supported: "
                f"{', '.join(formats)}",
            )
        low, high = SPEED_RANGE
        if not (math.isfinite(self.speed) and low <= self.speed <= high):
            raise SpeechParamError(
                "speed", f"speed is {self.speed!r}; it must be a number in [{low}, {high}]"
            )
        if self.seed < 0:
            raise SpeechParamError("seed", f"seed is {self.seed!r}; it must be an integer >= 0")
        low_rate, high_rate = SAMPLE_RATE_RANGE
        if self.sample_rate is not None and not low_rate <= self.sample_rate <= high_rate:
            raise SpeechParamError(
                "sample_rate",
                f"sample_rate is {self.sample_rate!r}; it must be an integer in "
                f"[{low_rate}, {high_rate}]",
            )


class VoiceModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a speech stage speaks with."""

    name: str
    voices: list[str]
    default_voice: str
    sample_rate: Annotated[int, msgspec.Meta(ge=1)]
    # The `speed` values it can honour (within SPEED_RANGE).
    speed_range: tuple[float, float]


class SpeechReply(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One sentence (with the tensor AUDIO), or the answer to a `describe` request."""

    index: Count = 0
    text: str = ""
    sample_rate: Count = 0
    # On the last sentence: the sentences and samples of the whole utterance, and the format
    # of the tensor ENCODED when the request named one.
    num_chunks: Count = 0
    num_samples: Count = 0
    format: str | None = None
    # The answer to a `describe` request (nothing else is set then).
    voice_model: VoiceModel | None = None


class SpeechStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Requests being spoken, sentences synthesized, and the seconds of audio made against the
    # seconds spent making it (their ratio is the voice's real-time factor).
    requests_active: Count = 0
    sentences: Count = 0
    audio_seconds: Seconds = 0.0
    synthesis_seconds: Seconds = 0.0


CONTRACT: Contract[SpeechParams, SpeechReply, SpeechStats] = Contract(
    ROLE, SpeechParams, SpeechReply, SpeechStats
)
