"""The speech stage: its audio equals transformers' on the same weights and seed (VITS and
SpeechT5), chunks stream sentence by sentence, the encoded file holds the same samples, and bad
settings are refused with errors naming the item and its limit."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import soundfile
import torch
from fixtures_audio import require_espeak
from fixtures_tts import make_tiny_speecht5, make_tiny_vits
from omni.stages.contracts.speech import (
    CONTRACT,
    SpeechParams,
    SpeechReply,
    SpeechStats,
    VoiceModel,
)
from omni.stages.runtime import StageConfig, StageRuntime
from omni.stages.runtime.worker import WorkerRequest
from speech_helpers import reply, run_request, speech_worker
from stage_helpers import SHM_PREFIX, ipc_endpoint, running_router

from omni.speech.audio_format import pcm16_bytes
from omni.speech.sentences import split_sentences

TEXT = "hello there, friend. how are you today? the sea is calm!"
SENTENCES = ["hello there, friend.", "how are you today?", "the sea is calm!"]


@pytest.fixture(scope="module")
def vits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vits(tmp_path_factory.mktemp("vits"), num_speakers=3)


@pytest.fixture(scope="module")
def speecht5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_speecht5(tmp_path_factory.mktemp("speecht5"))


@pytest.fixture(scope="module")
def vits_worker(vits_dir: Path):
    return speech_worker(str(vits_dir), max_input_chars="200")


def vits_reference(folder: Path, seed: int, speaker_id: int | None, speed: float) -> list:
    from transformers import AutoTokenizer, VitsModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = VitsModel.from_pretrained(folder).eval()
    waves = []
    with torch.inference_mode():
        for index, sentence in enumerate(SENTENCES):
            torch.manual_seed(seed + index)
            inputs = tokenizer(sentence, return_tensors="pt")
            waves.append(model(**inputs, speaker_id=speaker_id, speaking_rate=speed).waveform[0])
    return waves


def test_sentences_split_at_ends_and_long_ones_at_clauses() -> None:
    assert split_sentences(TEXT) == SENTENCES
    assert split_sentences("Pi is 3.14 here.\nNext line") == ["Pi is 3.14 here.", "Next line"]
    assert split_sentences("one two, three four, five", max_chars=10) == [
        "one two,",
        "three",
        "four, five",
    ]


@pytest.mark.parametrize(
    ("params", "speaker_id", "speed"),
    [
        ({}, None, 1.0),
        ({"voice": "speaker-2", "seed": 7, "speed": 1.5}, 2, 1.5),
    ],
    ids=["default voice", "speaker 2, seed 7, speed 1.5"],
)
def test_vits_stage_equals_transformers(
    vits_dir: Path, vits_worker, params: dict, speaker_id: int | None, speed: float
) -> None:
    request = SpeechParams(input=TEXT, response_format="wav", **params)
    outputs = run_request(vits_worker, request)
    assert [o.error for o in outputs] == [None] * 3
    assert [o.finished for o in outputs] == [False, False, True]
    expected = vits_reference(vits_dir, params.get("seed", 0), speaker_id, speed)
    whole = torch.cat(expected).numpy()
    # The last reply adds the totals and the format of the file it carries.
    assert [reply(o) for o in outputs] == [
        SpeechReply(index=0, text=SENTENCES[0], sample_rate=16_000),
        SpeechReply(index=1, text=SENTENCES[1], sample_rate=16_000),
        SpeechReply(
            index=2,
            text=SENTENCES[2],
            sample_rate=16_000,
            num_chunks=3,
            num_samples=whole.size,
            format="wav",
        ),
    ]
    for output, wave in zip(outputs, expected, strict=True):
        assert torch.equal(output.tensors["audio"], wave)
    # The file on the last reply holds every chunk, in order, as 16-bit PCM.
    encoded = outputs[-1].tensors["encoded"].numpy().tobytes()
    samples, rate = soundfile.read(io.BytesIO(encoded), dtype="int16")
    assert rate == 16_000
    assert samples.tobytes() == pcm16_bytes(whole)


def test_speecht5_stage_equals_transformers(speecht5_dir: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, SpeechT5ForTextToSpeech, SpeechT5HifiGan

    worker = speech_worker(str(speecht5_dir))
    assert worker.synthesizer.voices == ("bright", "default")
    outputs = run_request(worker, SpeechParams(input=TEXT, voice="bright", seed=3))
    assert [reply(o).text for o in outputs] == SENTENCES
    tokenizer = AutoTokenizer.from_pretrained(speecht5_dir)
    model = SpeechT5ForTextToSpeech.from_pretrained(speecht5_dir).eval()
    vocoder = SpeechT5HifiGan.from_pretrained(speecht5_dir / "vocoder").eval()
    speaker = load_file(str(speecht5_dir / "speaker_embeddings.safetensors"))["bright"][None]
    with torch.inference_mode():
        for index, (sentence, output) in enumerate(zip(SENTENCES, outputs, strict=True)):
            torch.manual_seed(3 + index)
            ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
            wave = model.generate_speech(ids, speaker, vocoder=vocoder)
            assert torch.equal(output.tensors["audio"], wave.reshape(-1))
    # No response_format: samples only.
    assert "encoded" not in outputs[-1].tensors
    refused = run_request(worker, SpeechParams(input="hi.", speed=1.5))
    assert refused[0].error == (
        f"speed 1.5 is out of range for the voice model {str(speecht5_dir)!r}: it must be 1"
    )


def test_chunks_stream_as_each_sentence_is_ready(vits_dir: Path) -> None:
    """The first sentence's reply reaches the caller while the second is still being made."""
    worker = speech_worker(str(vits_dir))
    synth = worker.synthesizer
    first_received = threading.Event()
    synthesize = synth.synthesize
    calls: list[str] = []

    def gated(text: str, voice: str, speed: float, seed: int) -> np.ndarray:
        calls.append(text)
        if len(calls) > 1:
            assert first_received.wait(30), "the first chunk never reached the caller"
        return synthesize(text, voice, speed, seed)

    synth.synthesize = gated  # type: ignore[method-assign]
    with ipc_endpoint() as endpoint, running_router(endpoint) as router:
        config = StageConfig(
            role="speech", connect=endpoint, heartbeat_interval_s=0.05, shm_prefix=SHM_PREFIX
        )
        runtime = StageRuntime(config, worker)
        runtime.worker.load = lambda: None  # type: ignore[method-assign]  # loaded above
        runtime.start()
        try:
            assert router.wait_for_replicas("speech", 1, timeout=10)
            stream = router.submit("speech", body=CONTRACT.encode(SpeechParams(input=TEXT)))
            first = stream.next(timeout=30)
            index = CONTRACT.decode_reply(first.body).index
            assert (index, first.finished, len(calls)) == (0, False, 2)
            first_received.set()
            rest = stream.result(timeout=30)
        finally:
            runtime.stop()
            runtime.join(10)
    assert [CONTRACT.decode_reply(r.body).index for r in rest] == [1, 2]
    assert rest[-1].finished


def test_stats_count_sentences_and_seconds_of_audio(vits_dir: Path) -> None:
    worker = speech_worker(str(vits_dir))
    assert worker.stats() == SpeechStats()
    body = CONTRACT.encode(SpeechParams(input=TEXT))
    worker.add_request(WorkerRequest(request_id="r0", inputs={}, body=body))
    first = worker.step()
    stats = worker.stats()
    assert (stats.requests_active, stats.sentences) == (1, 1)
    outputs = first + run_request(worker, SpeechParams(input="one more."), request_id="r1")
    samples = sum(o.tensors["audio"].numel() for o in outputs)  # all at the voice's 16 kHz
    stats = worker.stats()
    assert (stats.requests_active, stats.sentences) == (0, 4)
    assert stats.audio_seconds == pytest.approx(samples / 16_000, abs=1e-9)
    assert stats.synthesis_seconds > 0
    # As a heartbeat carries it.
    assert CONTRACT.decode_stats(msgspec.msgpack.encode(stats)) == stats


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"input": "hi.", "voice": "nova"},
            "voice 'nova' is unknown to the voice model {model!r}; its voices are: "
            "default, speaker-0, speaker-1, speaker-2",
        ),
        ({"input": "  \n "}, "input is empty: there is no text to speak"),
        (
            {"input": "a" * 201},
            "input is 201 characters long; the limit is 200 characters",
        ),
        (
            {"input": "hi.", "response_format": "aac"},
            "response_format 'aac' is not supported; supported: flac, mp3, opus, pcm, wav",
        ),
        ({"input": "hi.", "speed": 4.5}, "speed is 4.5; it must be a number in [0.25, 4.0]"),
        # The contract's decoder refuses a wrong type or an unknown field, naming it.
        (
            {"input": "hi.", "speed": "fast"},
            "bad speech request: Expected `float`, got `str` - at `$.speed`",
        ),
        ({"text": "hi."}, "bad speech request: Object contains unknown field `text`"),
        ({}, "input is empty: there is no text to speak"),
    ],
    ids=[
        "unknown voice",
        "empty text",
        "text over the limit",
        "unknown format",
        "speed out of range",
        "speed not a number",
        "unknown parameter",
        "no input",
    ],
)
def test_bad_parameters_are_refused_naming_the_item(
    vits_dir: Path, vits_worker, params: dict[str, Any], message: str
) -> None:
    outputs = run_request(vits_worker, msgspec.msgpack.encode(params))
    assert len(outputs) == 1 and outputs[0].finished
    assert outputs[0].error == message.format(model=str(vits_dir))


def test_default_voice_refuses_unknown_voice_and_its_speed_range() -> None:
    require_espeak()
    worker = speech_worker()
    outputs = run_request(worker, SpeechParams(input="hi.", voice="bob"))
    assert outputs[0].error == (
        "voice 'bob' is unknown to the voice model 'espeak-ng'; its voices are: alloy, ash, "
        "ballad, coral, echo, fable, nova, onyx, sage, shimmer, verse"
    )
    outputs = run_request(worker, SpeechParams(input="hi.", speed=0.3))
    assert outputs[0].error == (
        "speed 0.3 is out of range for the voice model 'espeak-ng': it must be in [0.53, 3]"
    )
    spoken = run_request(worker, SpeechParams(input="Hello. Goodbye.", voice="nova", speed=1.2))
    assert [reply(o).text for o in spoken] == ["Hello.", "Goodbye."]
    assert all(o.tensors["audio"].abs().max() > 0.1 for o in spoken)
    assert reply(spoken[0]).sample_rate == 22_050


def test_unknown_model_type_and_options_are_refused(tmp_path: Path) -> None:
    from fixtures_models import make_tiny_checkpoint

    folder = make_tiny_checkpoint("qwen2", tmp_path / "llm")
    with pytest.raises(ValueError, match="is a 'qwen2' model; the speech stage serves 'vits'"):
        speech_worker(str(folder))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\] for a espeak-ng"):
        speech_worker("", colour="blue")


def test_describe_names_the_voices_and_checks_one(vits_dir: Path, vits_worker) -> None:
    [output] = run_request(vits_worker, SpeechParams(describe=True))
    assert output.finished and output.error is None and not output.tensors
    expected = VoiceModel(
        name=str(vits_dir),
        voices=["default", "speaker-0", "speaker-1", "speaker-2"],
        default_voice="default",
        sample_rate=16_000,
        speed_range=(0.25, 4.0),
    )
    assert reply(output) == SpeechReply(voice_model=expected)
    assert CONTRACT.decode_reply(CONTRACT.encode(reply(output))) == SpeechReply(
        voice_model=expected
    )
    [refused] = run_request(vits_worker, SpeechParams(describe=True, voice="nova"))
    assert refused.error is not None and refused.error.startswith("voice 'nova' is unknown")


def test_serve_flags_choose_the_speech_stage() -> None:
    import argparse

    from omni.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    config = serve.serve_config(parser.parse_args(["serve"]))
    assert (config.speech, config.speech_model) == (True, None)
    config = serve.serve_config(parser.parse_args(["serve", "--speech-model", "/m/vits"]))
    assert config.speech_model == "/m/vits"
    assert serve.serve_config(parser.parse_args(["serve", "--no-speech"])).speech is False
