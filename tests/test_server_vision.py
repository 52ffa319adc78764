"""Images over HTTP: a chat completion with an image data URL, served by a vision stage and the
LLM stage, answers with transformers' greedy tokens; bad images get a 400 naming the part."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures_vl import make_tiny_qwen2_5_vl, noise_image
from server_fixtures import live_server, media_serve_config
from test_vl_engine import NEW_TOKENS, reference

from omni.multimodal import Qwen2VLPromptProcessor, prepare_qwen2_vl_prompt
from omni.server.app import build_app
from omni.server.pipeline import Pipeline

MODEL = "tiny-vl"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def pipeline(folder: Path) -> Iterator[Pipeline]:
    with Pipeline(media_serve_config(folder, MODEL, "vision")) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(pipeline: Pipeline) -> Iterator[str]:
    with live_server(build_app(pipeline.orchestrator)) as url:
        yield url


def data_url(width: int, height: int, seed: int) -> str:
    buffer = io.BytesIO()
    noise_image(width, height, seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_chat_equals_transformers_and_repeats_hit_the_cache(
    folder: Path, base_url: str, pipeline: Pipeline
) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(56, 84, 4)}},
                {"type": "text", "text": "what is this"},
            ],
        }
    ]
    processor = Qwen2VLPromptProcessor.from_pretrained(str(folder))
    local = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": noise_image(56, 84, 4)},
                {"type": "text", "text": "what is this"},
            ],
        }
    ]
    prompt = prepare_qwen2_vl_prompt(processor, messages=local)
    expected = processor.tokenizer.decode(reference(folder, prompt), skip_special_tokens=True)
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    [vision] = [r.worker for r in pipeline.runtimes if r.config.role == "vision"]
    encoded: list[str] = []
    add_request = vision.add_request
    vision.add_request = lambda request: (
        encoded.append(request.request_id),  # type: ignore[method-assign]
        add_request(request),
    )
    for _ in range(2):  # the second time, the prefix cache covers the image: no encoder pass
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
        assert reply.json()["usage"]["prompt_tokens"] == len(prompt.prompt_token_ids)
    assert len(encoded) == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,", "messages[0].content[0]"),
        (
            "data:image/png;base64," + base64.b64encode(b"not a png").decode(),
            "messages[0].content[0]",
        ),
        ("https://example.com/cat.png", "messages[0].content[0]"),
    ],
)
def test_bad_images_get_a_400_naming_the_part(base_url: str, url: str, message: str) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    }
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["param"] == "messages[0].content[0]"
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
