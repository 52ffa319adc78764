"""The default voice is intelligible: ten sentences spoken by the speech stage's default voice
(espeak-ng) and heard by the asr stage (Whisper tiny.en) come back with at least 90 percent of
their words."""

from __future__ import annotations

import numpy as np
import torch
from fixtures_audio import converted_whisper_dir, require_espeak
from omni.stages.contracts import asr as asr_contract
from omni.stages.contracts.speech import SpeechParams
from omni.stages.runtime import WorkerOptions, WorkerRequest, create_worker
from speech_helpers import run_request, speech_worker, word_recall

SENTENCES = [
    "The capital of France is Paris.",
    "Please open the window before you leave the house.",
    "The quick brown fox jumps over the lazy dog.",
    "We will meet at the train station tomorrow morning.",
    "Water boils when it gets hot enough.",
    "My sister bought a new red bicycle last week.",
    "The library closes early on Sunday evenings.",
    "Turn left at the next corner and walk straight ahead.",
    "Fresh bread smells wonderful in the morning.",
    "The children played football in the park after school.",
]
MIN_RECALL = 0.9


def test_default_voice_round_trips_through_whisper() -> None:
    require_espeak()
    speech = speech_worker()  # no model: the embedded default voice
    clips = []
    for index, sentence in enumerate(SENTENCES):
        # Whisper's rate, resampled by the stage itself.
        params = SpeechParams(input=sentence, sample_rate=16_000)
        outputs = run_request(speech, params, f"s{index}")
        assert outputs[-1].finished and outputs[-1].error is None
        clips.append(torch.cat([o.tensors["audio"] for o in outputs]))

    asr = create_worker("asr", WorkerOptions(model=converted_whisper_dir(), device="cpu"))
    asr.load()
    body = asr_contract.CONTRACT.encode(asr_contract.TranscribeRequest())
    for index, clip in enumerate(clips):
        asr.add_request(WorkerRequest(f"a{index}", {"audio": clip}, body))
    heard: dict[str, str] = {}
    while asr.has_work():
        for output in asr.step():
            assert isinstance(output.reply, asr_contract.Transcript), output.error
            heard[output.request_id] = output.reply.text

    found = total = 0
    for index, sentence in enumerate(SENTENCES):
        got, want = word_recall(sentence, heard[f"a{index}"])
        print(f"{got}/{want}  {sentence!r} -> {heard[f'a{index}']!r}")
        found += got
        total += want
    recall = found / total
    print(f"word recall of the default voice through Whisper tiny.en: {recall:.3f}")
    assert recall >= MIN_RECALL
    assert np.isfinite(recall)
