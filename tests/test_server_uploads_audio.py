"""Uploads to a Qwen2-Audio model: `curl -F file=@clip.wav` answers as the chat completion
with the same clip as an `input_audio` part; a PDF or an image, which this model cannot take,
is refused naming the file, and so is a PDF `file` part in a chat request."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile
from fixtures_pdf import Page, minimal_pdf
from fixtures_qwen2_audio import SAMPLING_RATE, make_tiny_qwen2_audio, tone
from server_fixtures import live_server, media_serve_config
from test_server_pdf import curl

from omni.server.app import build_app
from omni.server.pipeline import Pipeline

MODEL = "tiny-audio"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"))
    config = media_serve_config(folder, MODEL, "audio")
    with Pipeline(config) as pipeline, live_server(build_app(pipeline.orchestrator)) as url:
        yield url


def wav_bytes() -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(0.8, 330.0, 3), SAMPLING_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_an_uploaded_clip_answers_as_an_input_audio_part(base_url: str, tmp_path: Path) -> None:
    clip = wav_bytes()
    (tmp_path / "note.bin").write_bytes(clip)  # typed by its bytes, whatever its name
    status, body = curl(
        base_url,
        "prompt=What is it?",
        f"file=@{tmp_path / 'note.bin'}",
        "max_tokens=5",
        "temperature=0",
        "ignore_eos=true",
    )
    assert status == 200, body
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(),
                                                   "format": "wav"}}  # fmt: skip
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    expected = httpx.post(f"{base_url}/v1/chat/completions", json=chat, timeout=60).json()
    uploaded = json.loads(body)
    assert uploaded["choices"][0]["message"] == expected["choices"][0]["message"]
    # The same counts; the chat, sent second, finds the upload's prompt in the prefix cache.
    cached = expected["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert cached > 0
    assert {k: v for k, v in uploaded["usage"].items() if k != "prompt_tokens_details"} == (
        expected["usage"]
    )
    assert uploaded["usage"]["completion_tokens"] == 5


def test_media_this_model_cannot_take_is_refused(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(minimal_pdf([Page(40, 40)]))
    status, body = curl(base_url, "prompt=hi", f"file=@{tmp_path / 'report.pdf'}")
    assert status == 400
    assert json.loads(body)["error"]["message"] == (
        "file 1 (report.pdf) is a PDF; model 'tiny-audio' does not take PDF files"
    )
    data = base64.b64encode(minimal_pdf([Page(40, 40)])).decode()
    part = {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{data}"}}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=chat, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "message": "messages[0].content[0]: model 'tiny-audio' does not take PDF files",
        "type": "invalid_request_error",
        "param": "messages[0].content[0]",
        "code": "unsupported_content",
    }
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
