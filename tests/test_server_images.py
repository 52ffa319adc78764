"""`POST /v1/images/generations` through `omni serve`'s app: the images equal plain diffusers
calls on the same tiny pipeline and seeds, the official `openai` client works, and bad
parameters get OpenAI error JSON with a 4xx naming the field."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from omni.stages.contracts.image import ImageLimits
from omni.stages.generators.random_diffusion import save_random_sd_pipeline
from PIL import Image
from server_fixtures import ENGINE_OPTIONS, NO_PERCEPTION, live_server, tiny_chat_model

from omni.server.app import AppSettings, build_app
from omni.server.config import ServeConfig
from omni.server.images import ImageService, add_image_routes
from omni.server.pipeline import Pipeline

IMAGE_MODEL_NAME = "tiny-sd"
# The running server's image service, for tests that adjust it.
SERVICE: dict[str, ImageService] = {}
SIDE, STEPS = 32, 2


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Iterator[str]:
    chat_folder = tiny_chat_model(tmp_path_factory.mktemp("chat"))
    config = ServeConfig(
        **NO_PERCEPTION,
        model=str(chat_folder),
        single_process=True,
        devices={"llm": ("cpu",), "image": ("cpu",)},
        engine_options=ENGINE_OPTIONS,
        image_model=str(image_folder),
        speech=False,  # this test is about images
    )
    with Pipeline(config) as pipeline:
        assert pipeline.image_service is not None
        pipeline.image_service.model_name = IMAGE_MODEL_NAME
        SERVICE["image"] = pipeline.image_service
        settings = AppSettings()
        app = build_app(pipeline.orchestrator, settings)
        add_image_routes(app, pipeline.image_service, settings)
        with live_server(app) as url:
            yield url


def plain_pixels(folder: Path, seeds: list[int], prompt: str) -> list[np.ndarray]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt,
        width=SIDE,
        height=SIDE,
        num_inference_steps=STEPS,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
    ).images
    return [np.asarray(image) for image in images]


def decoded(item: dict[str, Any]) -> np.ndarray:
    data = base64.b64decode(item["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_models_lists_the_image_model_after_the_llm(base_url: str) -> None:
    models = httpx.get(f"{base_url}/v1/models", timeout=10).json()
    assert [card["id"] for card in models["data"]][1:] == [IMAGE_MODEL_NAME]


def test_images_equal_plain_diffusers(base_url: str, image_folder: Path) -> None:
    body = {
        "model": IMAGE_MODEL_NAME,
        "prompt": "a lighthouse at dawn",
        "n": 2,
        "size": f"{SIDE}x{SIDE}",
        "response_format": "b64_json",
        "steps": STEPS,
        "seed": 40,
    }
    response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["output_format"], answer["size"]) == ("png", f"{SIDE}x{SIDE}")
    assert [item["seed"] for item in answer["data"]] == [40, 41]
    expected = plain_pixels(image_folder, [40, 41], "a lighthouse at dawn")
    for item, reference in zip(answer["data"], expected, strict=True):
        assert np.abs(decoded(item).astype(int) - reference.astype(int)).max() <= 1


def test_the_openai_client_generates_a_jpeg(base_url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    result = client.images.generate(
        model=IMAGE_MODEL_NAME,
        prompt="a red fox",
        size=f"{SIDE}x{SIDE}",  # type: ignore[arg-type]
        response_format="b64_json",
        output_format="jpeg",
        extra_body={"steps": STEPS, "seed": 3},
    )
    assert result.data is not None
    data = base64.b64decode(result.data[0].b64_json or "")
    assert data[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(data)).size == (SIDE, SIDE)


@pytest.mark.parametrize(
    ("change", "status", "param", "message"),
    [
        ({"size": "36x32"}, 400, "size", "width 36 is not a multiple of 8"),
        ({"size": "4096x4096"}, 400, "size", "size 4096x4096 is 16777216 pixels; the limit is"),
        ({"size": "big"}, 400, "size", "size 'big' must be WIDTHxHEIGHT"),
        ({"n": 11}, 400, "n", "n 11 is out of range; it must be in [1, 10]"),
        ({"steps": 0}, 400, "steps", "steps 0 is out of range"),
        ({"prompt": ""}, 400, "prompt", "prompt is empty"),
        ({"prompt": "x" * 4001}, 400, "prompt", "prompt is 4001 characters; the limit is 4000"),
        ({"n": "two"}, 400, "n", "n: Input should be a valid integer"),
        ({"response_format": "url"}, 400, "response_format", "use 'b64_json'"),
        ({"output_format": "webp"}, 400, "output_format", "output_format 'webp' is not served"),
        ({"output_format": "raw"}, 400, "output_format", "use one of ['png', 'jpeg']"),
        ({"model": "dall-e-3"}, 404, "model", "The model 'dall-e-3' does not exist"),
    ],
)
def test_bad_parameters_get_openai_errors(
    base_url: str, change: dict[str, Any], status: int, param: str, message: str
) -> None:
    body = {"prompt": "a red fox", "size": f"{SIDE}x{SIDE}", "steps": STEPS} | change
    response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]


def test_a_refusal_from_the_stage_is_a_400_in_the_stages_words(base_url: str) -> None:
    """What the edge lets through but the stage refuses (here: an edge with looser limits)
    comes back as a 400 with the stage's message, not the router's preamble."""
    service = SERVICE["image"]
    service.limits = ImageLimits(max_steps=1000)
    try:
        body = {"prompt": "a red fox", "size": f"{SIDE}x{SIDE}", "steps": 500}
        response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=60)
    finally:
        service.limits = ImageLimits()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] == "steps 500 is out of range; it must be in [1, 200]"
