"""The voice models a speech stage can drive, behind one small interface.

A `Synthesizer` turns one sentence into float32 mono samples at its `sample_rate`. The speech
stage (`omni.stages.generators.speech`) does the rest: checking a request, splitting its text
into sentences, streaming each sentence's audio, resampling and encoding. Concrete voices:
`EspeakSynthesizer` (the embedded default, `omni.speech.espeak`) and the transformers models in
`omni.stages.generators.tts_models` (VITS / MMS-TTS, SpeechT5 with its HiFi-GAN vocoder).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from omni.stages.contracts.speech import SpeechParamError


class Synthesizer(ABC):
    # What `/v1/audio/speech` and the stage's HELLO call this voice model.
    name: str
    sample_rate: int
    # Voice names a request may ask for; `default_voice` is used when it names none.
    voices: tuple[str, ...]
    default_voice: str
    # The `speed` values this model can honour (within OpenAI's [0.25, 4.0]).
    speed_range: tuple[float, float] = (0.25, 4.0)

    def resolve_voice(self, voice: str | None, speed: float) -> str:
        """The voice to use; SpeechParamError naming the item for an unknown voice or a speed
        this model cannot honour."""
        chosen = self.default_voice if voice is None else voice
        if chosen not in self.voices:
            raise SpeechParamError(
                "voice",
                f"voice {chosen!r} is unknown to the voice model {self.name!r}; its voices are: "
                f"{', '.join(self.voices)}",
            )
        low, high = self.speed_range
        if not low <= speed <= high:
            raise SpeechParamError(
                "speed",
                f"speed {speed:g} is out of range for the voice model {self.name!r}: it must be "
                + (f"{low:g}" if low == high else f"in [{low:g}, {high:g}]"),
            )
        return chosen

    @abstractmethod
    def synthesize(self, text: str, voice: str, speed: float, seed: int) -> np.ndarray:
        """`text` (one sentence) spoken by `voice`: float32 mono samples at `sample_rate`."""
