"""Audio over HTTP: a chat completion with an OpenAI `input_audio` part, served by an audio
stage and the LLM stage, answers with transformers' greedy tokens; a repeated clip skips the
encoder; bad audio gets a 400 naming the part, and the server keeps serving."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from fixtures_qwen2_audio import SAMPLING_RATE, load_reference_audio, make_tiny_qwen2_audio, tone
from server_fixtures import live_server, media_serve_config
from test_qwen2_audio import NEW_TOKENS, reference_tokens

from omni.multimodal.qwen2_audio import Qwen2AudioPromptProcessor
from omni.server.app import build_app
from omni.server.pipeline import Pipeline

MODEL = "tiny-audio"
PART = "messages[0].content[0]"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"))


@pytest.fixture(scope="module")
def pipeline(folder: Path) -> Iterator[Pipeline]:
    with Pipeline(media_serve_config(folder, MODEL, "audio")) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(pipeline: Pipeline) -> Iterator[str]:
    with live_server(build_app(pipeline.orchestrator)) as url:
        yield url


def reference_answer(folder: Path, clip: np.ndarray) -> tuple[str, int]:
    """transformers' greedy answer to `clip` then "What is it?", and the prompt's length."""
    processor = Qwen2AudioPromptProcessor.from_pretrained(str(folder))
    local = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "What is it?"}],
        }
    ]
    prompt = processor.prepare(messages=local)
    model = load_reference_audio(folder)
    model.generation_config.eos_token_id = None
    # The server's incremental detokenizer holds back a trailing incomplete UTF-8 sequence
    # (random byte-level tokens end in one here), which a one-shot decode shows as U+FFFD.
    tokens = reference_tokens(model, prompt)
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True).removesuffix("\ufffd")
    return text, len(prompt.prompt_token_ids)


def wav_base64(samples: np.ndarray, rate: int = SAMPLING_RATE) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode()


def chat(part: dict, max_tokens: int = NEW_TOKENS) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def audio_part(data: str, audio_format: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": audio_format}}


def test_audio_chat_equals_transformers_and_repeats_skip_the_encoder(
    folder: Path, base_url: str, pipeline: Pipeline
) -> None:
    clip = tone(1.2, 440.0, 7)
    expected, prompt_tokens = reference_answer(folder, clip)
    [audio] = [r.worker for r in pipeline.runtimes if r.config.role == "audio"]
    encoded: list[str] = []
    add_request = audio.add_request
    audio.add_request = lambda request: (  # type: ignore[method-assign]
        encoded.append(request.request_id),
        add_request(request),
    )
    # A float WAV at 16 kHz decodes to the same samples, so the prompts are the same.
    body = chat(audio_part(wav_base64(clip)))
    for _ in range(2):  # the second time, the prefix cache covers the clip: no encoder pass
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
        assert reply.json()["usage"]["prompt_tokens"] == prompt_tokens
    assert len(encoded) == 1


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (audio_part(""), f"{PART} is empty (0 bytes)"),
        (audio_part(base64.b64encode(b"just some text").decode()), "is not a WAV, FLAC"),
        (audio_part("abc"), f"{PART} is not valid base64"),
        (audio_part(wav_base64(tone(0.5, 440.0, 1)), "aac"), "has format 'aac'; supported"),
        (
            audio_part(wav_base64(np.zeros(31 * 8000, np.float32), rate=8000)),
            f"{PART} is 31.00 seconds long; the limit is 30 seconds",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
            f"{PART}: model 'tiny-audio' does not take images",
        ),
        ({"type": "input_audio"}, "an input_audio part needs 'input_audio'"),
        (
            # 20 ms at 16 kHz: two mel frames, which the tower turns into no token at all.
            audio_part(wav_base64(tone(0.02, 440.0, 1))),
            f"{PART} is 320 samples at 16000 Hz, too short to yield an audio token; the "
            "shortest clip is 321 samples (20.0625 ms)",
        ),
    ],
)
def test_bad_audio_gets_a_400_naming_the_part(base_url: str, part: dict, message: str) -> None:
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=chat(part, 2), timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["param"] == PART
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
