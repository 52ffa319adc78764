"""An audio clip through the HTTP server with the LLM stage and the audio stage as separate
supervised processes, sent with the official `openai` client: the answer is transformers'
greedy text, and the same request again is served without the audio stage (prefix cache), as
the per-replica request counter in /metrics shows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fixtures_qwen2_audio import make_tiny_qwen2_audio, tone
from server_fixtures import live_server, media_serve_config
from test_qwen2_audio import NEW_TOKENS
from test_server_audio import audio_part, reference_answer, wav_base64

from omni.server.app import build_app
from omni.server.pipeline import Pipeline

MODEL = "tiny-audio"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"))


@pytest.fixture(scope="module")
def base_url(folder: Path) -> Iterator[str]:
    config = media_serve_config(folder, MODEL, "audio", single_process=False)
    with Pipeline(config) as running, live_server(build_app(running.orchestrator)) as url:
        yield url


def audio_stage_requests(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    found = re.findall(r'^omni:stage_requests_total\{[^}]*stage="audio"[^}]*\} (\S+)$', text, re.M)
    return sum(float(value) for value in found)


def test_audio_clip_through_stage_processes_with_the_openai_client(
    folder: Path, base_url: str
) -> None:
    clip = tone(1.2, 440.0, 7)
    expected, prompt_tokens = reference_answer(folder, clip)

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0)
    content = [audio_part(wav_base64(clip)), {"type": "text", "text": "What is it?"}]
    for sent in (1.0, 1.0):  # the repeat is covered by the prefix cache: no audio-stage request
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],  # type: ignore[misc, list-item]
            max_tokens=NEW_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == prompt_tokens
        assert audio_stage_requests(base_url) == sent
