"""Speech over HTTP through `omni serve`'s app: `POST /v1/audio/speech` and chat completions
with `"modalities": ["text", "audio"]`, whole and streamed, with the official `openai` client.
The audio equals the speech stage's own output for the same text (the default voice is
deterministic), and bad parameters get OpenAI error JSON with a 4xx naming the field."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile
import torch
from fixtures_audio import espeak_available
from omni.stages.contracts.speech import SpeechParams
from server_fixtures import ENGINE_OPTIONS, NO_PERCEPTION, live_server, metric, tiny_chat_model
from speech_helpers import run_request, speech_worker

from omni.server.app import AppSettings, build_app
from omni.server.config import ServeConfig
from omni.server.pipeline import Pipeline
from omni.server.speech import add_speech_routes
from omni.speech.audio_format import pcm16_bytes

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

TEXT = "Hello there. The sea is calm today!"
MESSAGES = [{"role": "user", "content": "Say something."}]
# Greedy, and long enough for a sentence or two from the tiny random model.
SAMPLING: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
SERVERS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    chat_folder = tiny_chat_model(tmp_path_factory.mktemp("chat"))
    config = ServeConfig(
        **NO_PERCEPTION,
        model=str(chat_folder),
        served_model_name="tiny",
        single_process=True,
        engine_options=ENGINE_OPTIONS,
    )
    with Pipeline(config) as pipeline:
        assert pipeline.speech_service is not None  # the default voice, started by default
        settings = AppSettings()
        app = build_app(pipeline.orchestrator, settings)
        add_speech_routes(app, pipeline.speech_service, settings)
        # The same model without speech routes: audio output is refused, not ignored.
        SERVERS["no_speech_app"] = build_app(pipeline.orchestrator, settings)
        with live_server(app) as url:
            yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def local_speech(text: str, response_format: str | None = None) -> list:
    """What the speech stage makes of `text` at HTTP's 24 kHz, run in this process."""
    params = SpeechParams(input=text, sample_rate=24_000, response_format=response_format)
    return run_request(speech_worker(), params)


def local_samples(text: str) -> np.ndarray:
    return torch.cat([o.tensors["audio"] for o in local_speech(text)]).numpy()


def test_speech_endpoint_returns_the_stage_audio(client: openai.OpenAI) -> None:
    wav = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="wav"
    ).content
    expected = local_speech(TEXT, "wav")[-1].tensors["encoded"].numpy().tobytes()
    assert wav == expected
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert rate == 24_000
    assert samples.tobytes() == pcm16_bytes(local_samples(TEXT))

    flac = client.audio.speech.create(
        model="espeak-ng", voice="alloy", input=TEXT, response_format="flac"
    ).content
    assert soundfile.read(io.BytesIO(flac), dtype="int16")[0].tobytes() == samples.tobytes()

    # OpenAI's default format is mp3.
    mp3 = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input=TEXT)
    assert mp3.headers["content-type"] == "audio/mpeg"
    assert soundfile.info(io.BytesIO(mp3.content)).samplerate == 24_000


def test_metrics_count_the_speech_stage_work(base_url: str, client: openai.OpenAI) -> None:
    # The stage's counters arrive with its heartbeats (about once a second): let those of the
    # earlier tests land first.
    time.sleep(1.5)
    before = metric(base_url, "omni:speech_sentences_total")
    seconds_before = metric(base_url, "omni:speech_audio_seconds_total")
    client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="wav")
    deadline = time.monotonic() + 10
    while metric(base_url, "omni:speech_sentences_total") < before + 2:
        assert time.monotonic() < deadline, "the speech stage's counters never caught up"
        time.sleep(0.1)
    assert metric(base_url, "omni:speech_sentences_total") == before + 2  # TEXT's sentences
    assert metric(base_url, "omni:speech_audio_seconds_total") > seconds_before
    assert metric(base_url, "omni:speech_requests_active") == 0


def test_pcm_streams_sentence_by_sentence(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        body = b"".join(response.iter_bytes())
    assert body == pcm16_bytes(local_samples(TEXT))


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (
            {"voice": "bob"},
            400,
            "voice",
            "voice 'bob' is unknown to the voice model 'espeak-ng'; its voices are: alloy, "
            "ash, ballad, coral, echo, fable, nova, onyx, sage, shimmer, verse",
        ),
        ({"input": " "}, 400, "input", "input is empty: there is no text to speak"),
        (
            {"input": "a" * 4097},
            400,
            "input",
            "input is 4097 characters long; the limit is 4096 characters",
        ),
        (
            {"response_format": "aac"},
            400,
            "response_format",
            "response_format 'aac' is not supported; supported: flac, mp3, opus, pcm, wav",
        ),
        ({"speed": 4.5}, 400, "speed", "speed is 4.5; it must be a number in [0.25, 4.0]"),
        (
            {"speed": 0.3},
            400,
            "speed",
            "speed 0.3 is out of range for the voice model 'espeak-ng': it must be in [0.53, 3]",
        ),
        (
            {"model": "whisper-1"},
            404,
            "model",
            "The model 'whisper-1' does not exist; this server speaks with 'espeak-ng' "
            "(OpenAI's names tts-1, tts-1-hd, gpt-4o-mini-tts mean it too)",
        ),
        (
            {"stream_format": "sse"},
            400,
            "stream_format",
            "stream_format 'sse' is not served; use 'audio'",
        ),
    ],
    ids=[
        "unknown voice",
        "empty input",
        "input over the limit",
        "unknown format",
        "speed out of range",
        "speed out of the voice's range",
        "unknown model",
        "sse stream",
    ],
)
def test_speech_endpoint_errors_name_the_field(
    base_url: str, body: dict, status: int, param: str, message: str
) -> None:
    payload = {"model": "tts-1", "input": "Hi.", "voice": "alloy", **body}
    response = httpx.post(f"{base_url}/v1/audio/speech", json=payload, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["param"], error["message"]) == (param, message)


def test_chat_answers_with_audio(client: openai.OpenAI) -> None:
    text = client.chat.completions.create(model="tiny", messages=MESSAGES, **_extra(SAMPLING))
    answer = text.choices[0].message.content
    assert answer and answer.strip()

    completion = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        **_extra(SAMPLING),
    )
    message = completion.choices[0].message
    assert message.content is None
    assert message.audio is not None
    assert message.audio.transcript == answer
    assert message.audio.id.startswith("audio_")
    assert message.audio.expires_at > 0
    assert message.audio.model_extra["format"] == "wav"
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="int16")
    assert rate == 24_000
    # The stage spoke the answer sentence by sentence, as it would speak the whole answer.
    assert samples.tobytes() == pcm16_bytes(local_samples(answer))
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_chat_streams_audio_deltas(base_url: str, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, **_extra(SAMPLING))
    expected_text = answer.choices[0].message.content or ""
    payload = {
        "model": "tiny",
        "messages": MESSAGES,
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "pcm16"},
        "stream": True,
        "stream_options": {"include_usage": True},
        **SAMPLING,
    }
    chunks = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": None}
    audio = [d["audio"] for d in deltas if "audio" in d]
    assert len({a["id"] for a in audio}) == 1
    assert "".join(a.get("transcript", "") for a in audio) == expected_text
    pcm = b"".join(base64.b64decode(a["data"]) for a in audio if "data" in a)
    assert pcm == pcm16_bytes(local_samples(expected_text))
    assert "expires_at" in audio[-1]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize(
    ("audio", "stream", "param", "message"),
    [
        (
            {"voice": "bob", "format": "wav"},
            False,
            "audio.voice",
            "voice 'bob' is unknown to the voice model 'espeak-ng'; its voices are: alloy, "
            "ash, ballad, coral, echo, fable, nova, onyx, sage, shimmer, verse",
        ),
        (
            {"voice": "alloy", "format": "aac"},
            False,
            "audio.format",
            "audio.format 'aac' is not supported; supported: wav, mp3, flac, opus, pcm16",
        ),
        (
            {"voice": "alloy", "format": "wav"},
            True,
            "audio.format",
            "audio.format is 'wav', but a streamed audio answer must be 'pcm16'",
        ),
    ],
    ids=["unknown voice", "unknown format", "stream not pcm16"],
)
def test_chat_audio_errors_name_the_field(
    base_url: str, audio: dict, stream: bool, param: str, message: str
) -> None:
    payload = {
        "model": "tiny",
        "messages": MESSAGES,
        "modalities": ["text", "audio"],
        "audio": audio,
        "stream": stream,
        **SAMPLING,
    }
    response = httpx.post(f"{base_url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["message"]) == (param, message)


def test_chat_audio_without_a_speech_stage_is_refused() -> None:
    with live_server(SERVERS["no_speech_app"]) as url:
        payload = {"model": "tiny", "messages": MESSAGES, "modalities": ["text", "audio"]}
        response = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("this server runs no speech stage")


def _extra(sampling: dict[str, Any]) -> dict[str, Any]:
    """`ignore_eos` is vLLM's field: the openai client sends it through extra_body."""
    fields = dict(sampling)
    extra_body = {"ignore_eos": fields.pop("ignore_eos")}
    return {**fields, "extra_body": extra_body}
