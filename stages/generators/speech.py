"""Speech generation as a stage ("speech"): text in, audio streamed out sentence by sentence.

What a request and its replies hold is the contract's (`omni.stages.contracts.speech`): a
request is `SpeechParams`; the text is split into sentences (`omni.speech.sentences`), and
each sentence is synthesized and sent as its own `SpeechReply` (with its samples as the tensor
`AUDIO_OUTPUT`) as soon as it is ready; the last adds the totals and, when the request named a
`response_format`, the whole utterance as one file (`ENCODED_OUTPUT`). Bad settings (unknown
voice, empty or too long text, unknown format, speed out of range) fail the request with an
error naming the item and its limit. A `describe` request speaks nothing and answers with the
voice model (`VoiceModel`).

The voice model is `--model`: empty for the embedded default voice, espeak-ng (see
`omni.speech.espeak` for why that one), or a VITS / MMS-TTS or SpeechT5 checkpoint
(`omni.stages.generators.tts_models`). Options (`--option key=value`): `max_input_chars`,
`max_chunk_chars` (the longest sentence synthesized at once), and for SpeechT5 `vocoder` and
`speaker_embeddings`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from omni.stages.contracts.speech import (
    AUDIO_OUTPUT,
    CONTRACT,
    DEFAULT_MAX_INPUT_CHARS,
    ENCODED_OUTPUT,
    ROLE,
    SpeechParams,
    SpeechReply,
    SpeechStats,
    VoiceModel,
)
from omni.stages.generators.tts_models import load_synthesizer
from omni.stages.runtime.options import parse_option
from omni.stages.runtime.worker import (
    StageOutput,
    StreamingStageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

from omni.media.audio import resample
from omni.speech.audio_format import SUPPORTED_FORMATS, encode_audio
from omni.speech.sentences import DEFAULT_MAX_CHARS, split_sentences
from omni.speech.synthesizer import Synthesizer


def _int_option(options: dict[str, str], key: str, default: int) -> int:
    text = options.pop(key, None)
    if text is None:
        return default
    value: int = parse_option(key, text, int)
    if value < 1:
        raise ValueError(f"option {key} is {value}; it must be >= 1")
    return value


@register_worker(ROLE)
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
        try:
            params = CONTRACT.decode_request(request.body)
            params.check(self.max_input_chars, SUPPORTED_FORMATS)
            voice = synth.resolve_voice(params.voice, params.speed)
        except ValueError as exc:
            # Refused with the message alone, which names the item and its limit.
            yield StageOutput(request.request_id, finished=True, error=str(exc))
            return
        if params.describe:
            yield StageOutput(
                request.request_id, reply=SpeechReply(voice_model=self.voice_model()), finished=True
            )
            return
        yield from self._speak(request.request_id, params, voice)

    def _speak(self, request_id: str, params: SpeechParams, voice: str) -> Iterator[StageOutput]:
        synth = self._synth()
        sentences = split_sentences(params.input, self.max_chunk_chars)
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
            reply = SpeechReply(index=index, text=sentence, sample_rate=rate)
            tensors = {AUDIO_OUTPUT: torch.from_numpy(np.ascontiguousarray(samples))}
            last = index == len(sentences) - 1
            if last:
                whole = np.concatenate(parts)
                format = params.response_format
                reply = SpeechReply(
                    index=index,
                    text=sentence,
                    sample_rate=rate,
                    num_chunks=len(sentences),
                    num_samples=int(whole.size),
                    format=format,
                )
                if format is not None:
                    encoded = encode_audio(whole, rate, format)
                    tensors[ENCODED_OUTPUT] = torch.frombuffer(
                        bytearray(encoded), dtype=torch.uint8
                    )
            yield StageOutput(request_id, tensors=tensors, reply=reply, finished=last)

    def stats(self) -> SpeechStats:
        """Requests in progress, sentences synthesized, and the seconds of audio made against
        the seconds spent making it (their ratio is the voice's real-time factor)."""
        return SpeechStats(
            requests_active=len(self._active),
            sentences=self.sentences_synthesized,
            audio_seconds=self.audio_seconds,
            synthesis_seconds=self.synthesis_seconds,
        )

    def voice_model(self) -> VoiceModel:
        """The voice model's name, voices, rate and speed range (a `describe` request's answer:
        the API process asks before it starts an LLM whose answer is to be spoken)."""
        synth = self._synth()
        return VoiceModel(
            name=synth.name,
            voices=list(synth.voices),
            default_voice=synth.default_voice,
            sample_rate=synth.sample_rate,
            speed_range=synth.speed_range,
        )
