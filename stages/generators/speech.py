"""Speech generation as a stage ("speech"): text in, audio streamed out sentence by sentence.

A request's params are `omni.speech.speech_params.SpeechParams` fields (OpenAI's `input`,
`voice`, `response_format`, `speed`, plus `seed` and `sample_rate`). The text is split into
sentences (`omni.speech.sentences`); each sentence is synthesized and sent as its own reply as
soon as it is ready:

    tensors {"audio": float32 mono samples of this sentence}
    data    {"index": i, "text": the sentence, "sample_rate": rate}

The last reply is `finished` and adds `num_chunks`, `num_samples` and, when the request named a
`response_format`, `format` plus the tensor `encoded`: the whole utterance as one file (uint8
bytes; raw 16-bit PCM for "pcm"). Bad settings (unknown voice, empty or too long text, unknown
format, speed out of range) fail the request with an error naming the item and its limit.

A request with `describe: true` synthesizes nothing: its one reply's data holds the voice
model's `name`, `voices`, `default_voice`, `sample_rate` and `speed_range`, or, when it also
names a `voice` or `speed` the model cannot honour, the same refusal a real request would get.

The voice model is `--model`: empty for the embedded default voice, espeak-ng (see
`omni.speech.espeak` for why that one), or a VITS / MMS-TTS or SpeechT5 checkpoint
(`omni.stages.generators.tts_models`). Options (`--option key=value`): `max_input_chars`,
`max_chunk_chars` (the longest sentence synthesized at once), and for SpeechT5 `vocoder` and
`speaker_embeddings`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from omni.stages.generators.tts_models import load_synthesizer
from omni.stages.runtime.worker import (
    StageOutput,
    StreamingStageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

from omni.media.audio import resample
from omni.speech.audio_format import encode_audio
from omni.speech.sentences import DEFAULT_MAX_CHARS, split_sentences
from omni.speech.speech_params import DEFAULT_MAX_INPUT_CHARS, SpeechParams
from omni.speech.synthesizer import Synthesizer

SPEECH_ROLE = "speech"
AUDIO_OUTPUT = "audio"
ENCODED_OUTPUT = "encoded"


def _int_option(options: dict[str, str], key: str, default: int) -> int:
    text = options.pop(key, None)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"option {key} must be an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"option {key} is {value}; it must be >= 1")
    return value


@register_worker(SPEECH_ROLE)
class SpeechWorker(StreamingStageWorker):
    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        extra = dict(options.extra)
        self.max_input_chars = _int_option(extra, "max_input_chars", DEFAULT_MAX_INPUT_CHARS)
        self.max_chunk_chars = _int_option(extra, "max_chunk_chars", DEFAULT_MAX_CHARS)
        # The rest belongs to the voice model (checked when it loads).
        self._model_options = extra
        self.synthesizer: Synthesizer | None = None
        # Reported with each heartbeat (see stats).
        self.sentences_synthesized = 0
        self.audio_seconds = 0.0
        self.synthesis_seconds = 0.0

    def load(self) -> None:
        self.synthesizer = load_synthesizer(
            self.options.model, self.options.device, self._model_options
        )

    def _synth(self) -> Synthesizer:
        if self.synthesizer is None:
            raise RuntimeError("the speech worker was used before load()")
        return self.synthesizer

    def handle(self, request: WorkerRequest) -> Iterator[StageOutput]:
        synth = self._synth()
        if request.params.get("describe"):
            yield self._describe(request)
            return
        try:
            params = SpeechParams.from_wire(request.params, self.max_input_chars)
            voice = synth.resolve_voice(params.voice, params.speed)
            sentences = split_sentences(params.input, self.max_chunk_chars)
        except (ValueError, TypeError) as exc:
            # Refused with the message alone, which names the item and its limit.
            yield StageOutput(request.request_id, finished=True, error=str(exc))
            return
        rate = params.sample_rate or synth.sample_rate
        parts: list[np.ndarray] = []
        for index, sentence in enumerate(sentences):
            started = time.perf_counter()
            samples = synth.synthesize(sentence, voice, params.speed, params.seed + index)
            self.synthesis_seconds += time.perf_counter() - started
            self.sentences_synthesized += 1
            self.audio_seconds += samples.size / synth.sample_rate
            samples = resample(samples, synth.sample_rate, rate)
            parts.append(samples)
            data: dict[str, Any] = {"index": index, "text": sentence, "sample_rate": rate}
            tensors = {AUDIO_OUTPUT: torch.from_numpy(np.ascontiguousarray(samples))}
            last = index == len(sentences) - 1
            if last:
                whole = np.concatenate(parts)
                data.update(num_chunks=len(sentences), num_samples=int(whole.size))
                if params.response_format is not None:
                    encoded = encode_audio(whole, rate, params.response_format)
                    data["format"] = params.response_format
                    tensors[ENCODED_OUTPUT] = torch.frombuffer(
                        bytearray(encoded), dtype=torch.uint8
                    )
            yield StageOutput(request.request_id, tensors=tensors, data=data, finished=last)

    def stats(self) -> dict[str, float]:
        """Requests in progress, sentences synthesized, and the seconds of audio made against
        the seconds spent making it (their ratio is the voice's real-time factor)."""
        return {
            "speech_requests_active": len(self._active),
            "speech_sentences": self.sentences_synthesized,
            "speech_audio_seconds": self.audio_seconds,
            "speech_synthesis_seconds": self.synthesis_seconds,
        }

    def _describe(self, request: WorkerRequest) -> StageOutput:
        """The voice model's name, voices, rate and speed range; with `voice` / `speed` given,
        a refusal if it cannot speak so (the API process asks before it starts an LLM)."""
        synth = self._synth()
        try:
            voice = request.params.get("voice")
            speed = request.params.get("speed", 1.0)
            if not isinstance(speed, int | float) or isinstance(speed, bool):
                raise ValueError(f"speed is {speed!r}; it must be a number")
            if voice is not None and not isinstance(voice, str):
                raise ValueError(f"voice must be a voice name, got {voice!r}")
            synth.resolve_voice(voice, float(speed))
        except ValueError as exc:
            return StageOutput(request.request_id, finished=True, error=str(exc))
        data = {
            "name": synth.name,
            "voices": list(synth.voices),
            "default_voice": synth.default_voice,
            "sample_rate": synth.sample_rate,
            "speed_range": list(synth.speed_range),
        }
        return StageOutput(request.request_id, data=data, finished=True)
