"""The image generator stage against plain diffusers calls on the same tiny random Stable
Diffusion pipeline: alone, inside a batch of other seeds, and as its own process over the
transport; bad parameters are refused with an error naming the field and the limit."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from omni.stages.contracts.image import CONTRACT, ImageParams, ImageReply, ImageStats
from omni.stages.generators.image import ImageWorker
from omni.stages.generators.random_diffusion import save_random_sd_pipeline
from omni.stages.runtime import StageOutput, WorkerOptions, WorkerRequest
from PIL import Image
from stage_helpers import SHM_PREFIX, ipc_endpoint, our_segments, running_router

from omni.supervision.streams import StageRequestError
from omni.supervision.supervisor import StageSpec, StageSupervisor

SIDE, STEPS = 32, 2  # a 16x16 latent with the tiny VAE (factor 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def plain(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def reference(plain: Any, seed: int, prompt: str = "a red fox", **extra: Any) -> np.ndarray:
    """The plain diffusers call a user would write, as uint8 pixels."""
    image = plain(
        prompt,
        width=SIDE,
        height=SIDE,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        **extra,
    ).images[0]
    return np.asarray(image)


@pytest.fixture(scope="module")
def worker(folder: Path) -> Iterator[ImageWorker]:
    worker = ImageWorker(WorkerOptions(model=str(folder), extra={"batch_wait_ms": "0"}))
    worker.load()
    yield worker
    worker.close()


def params(seed: int, prompt: str = "a red fox", **extra: Any) -> ImageParams:
    fields = {"width": SIDE, "height": SIDE, "steps": STEPS, "seed": seed, **extra}
    return ImageParams(prompt, **fields)


def body(params: ImageParams, **change: Any) -> bytes:
    """The request body of `params` with fields changed as a client of the transport may,
    whatever their type (the stage decodes strictly)."""
    return msgspec.msgpack.encode(msgspec.structs.asdict(params) | change)


def run(worker: ImageWorker, requests: dict[str, ImageParams | bytes]) -> dict[str, StageOutput]:
    """Queue every request, then step until each has its finished output."""
    for request_id, request in requests.items():
        wire = request if isinstance(request, bytes) else CONTRACT.encode(request)
        worker.add_request(WorkerRequest(request_id, {}, wire))
    outputs: dict[str, StageOutput] = {}
    deadline = time.monotonic() + 60
    while worker.has_work() and time.monotonic() < deadline:
        for output in worker.step():
            outputs[output.request_id] = output
    assert set(outputs) == set(requests)
    return outputs


def reply(output: StageOutput) -> ImageReply:
    assert isinstance(output.reply, ImageReply), output.error
    return output.reply


def pixels(output: StageOutput, k: int = 0) -> np.ndarray:
    assert output.error is None, output.error
    data = output.tensors[f"image_{k}"].numpy().tobytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def count_calls(worker: ImageWorker) -> list[int]:
    """Batch sizes of the generator's pipeline calls from now on."""
    sizes: list[int] = []
    generator = worker.generator
    assert generator is not None
    original = generator.generate

    def counting(shape: Any, jobs: Any) -> torch.Tensor:
        sizes.append(len(jobs))
        return original(shape, jobs)

    generator.generate = counting  # type: ignore[method-assign]
    return sizes


def test_one_request_equals_a_plain_diffusers_call(worker: ImageWorker, plain: Any) -> None:
    output = run(worker, {"a": params(seed=7)})["a"]
    assert output.finished
    assert reply(output) == ImageReply(
        format="png",
        width=SIDE,
        height=SIDE,
        steps=STEPS,
        guidance_scale=7.5,  # the pipeline's default
        seeds=[7],
        batch_images=1,
    )
    # What crosses the transport decodes to the same struct.
    assert CONTRACT.decode_reply(CONTRACT.encode(reply(output))) == reply(output)
    got, expected = pixels(output), reference(plain, 7)
    assert got.shape == (SIDE, SIDE, 3)
    np.testing.assert_array_equal(got, expected)
    # Not a constant picture: another seed draws another image.
    assert np.abs(got.astype(int) - reference(plain, 8).astype(int)).max() > 50


def test_a_batch_of_seeds_equals_each_request_alone(worker: ImageWorker, plain: Any) -> None:
    before = worker.stats()
    sizes = count_calls(worker)
    try:
        outputs = run(
            worker,
            {
                "fox": params(seed=1),
                "owl": params(seed=2, prompt="an owl at night"),
                "two": params(seed=3, n=2),
                "neg": params(seed=4, negative_prompt="blurry"),  # another shape: own call
                "big": params(seed=5, width=48),  # another size: own call
            },
        )
    finally:
        del worker.generator.generate  # type: ignore[union-attr]
    assert sorted(sizes) == [1, 1, 4]  # fox, owl and both of two's images in one call
    after = worker.stats()
    assert after == ImageStats(
        requests_queued=0,
        images_generated=before.images_generated + 6,
        pipeline_calls=before.pipeline_calls + 3,
    )
    assert [reply(outputs[r]).batch_images for r in ("fox", "owl", "two", "neg")] == [4, 4, 4, 1]
    assert reply(outputs["two"]).seeds == [3, 4]
    cases = {
        ("fox", 0): reference(plain, 1),
        ("owl", 0): reference(plain, 2, "an owl at night"),
        ("two", 0): reference(plain, 3),
        ("two", 1): reference(plain, 4),
        ("neg", 0): reference(plain, 4, negative_prompt="blurry"),
    }
    for (request_id, k), expected in cases.items():
        got = pixels(outputs[request_id], k)
        # Batched kernels round differently in the last float bits; a pixel may move by one.
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, (request_id, k)
    assert pixels(outputs["big"]).shape == (SIDE, 48, 3)


def test_a_batch_waits_while_requests_keep_arriving(folder: Path) -> None:
    worker = ImageWorker(
        WorkerOptions(model=str(folder), extra={"batch_wait_ms": "60000", "arrival_gap_ms": "0"})
    )
    worker.load()
    try:
        sizes = count_calls(worker)
        worker.add_request(WorkerRequest("a", {}, CONTRACT.encode(params(seed=1))))
        assert worker.step() == [] and sizes == []  # a request just arrived: wait for more
        worker.add_request(WorkerRequest("b", {}, CONTRACT.encode(params(seed=2))))
        assert worker.step() == [] and sizes == []
        worker.step()  # nothing arrived since the last step: the burst is over
        assert sizes == [2]
        while worker.has_work():
            worker.step()
        worker.add_request(WorkerRequest("alone", {}, CONTRACT.encode(params(seed=3))))
        worker.step()
        worker.step()  # a lone request waits one gap only
        assert sizes == [2, 1]
    finally:
        worker.close()


def test_jpeg_raw_and_drawn_seeds(worker: ImageWorker, plain: Any) -> None:
    wire = ImageParams("a red fox", width=SIDE, height=SIDE, steps=STEPS, output_format="jpeg")
    output = run(worker, {"j": wire})["j"]
    data = output.tensors["image_0"].numpy().tobytes()
    assert data[:3] == b"\xff\xd8\xff"  # a JPEG file
    [seed] = reply(output).seeds
    # The reported seed draws the image again; raw pixels are the PNG's pixels. One request
    # at a time: batched together, bf16/fp32 kernels may round a pixel differently by one level.
    png = run(worker, {"p": params(seed=seed)})["p"]
    np.testing.assert_array_equal(pixels(png), reference(plain, seed))
    raw = run(worker, {"r": params(seed=seed, output_format="raw")})["r"].tensors["image_0"]
    assert (raw.dtype, tuple(raw.shape)) == (torch.uint8, (SIDE, SIDE, 3))
    np.testing.assert_array_equal(raw.numpy(), reference(plain, seed))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 36}, "width 36 is not a multiple of 8"),
        ({"height": 0}, "height 0 is too small; the minimum is 8"),
        ({"width": 4096, "height": 4096}, "size 4096x4096 is 16777216 pixels; the limit is"),
        ({"steps": 0}, r"steps 0 is out of range; it must be in \[1, 200\]"),
        ({"steps": 500}, r"steps 500 is out of range; it must be in \[1, 200\]"),
        ({"n": 11}, r"n 11 is out of range; it must be in \[1, 10\]"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"prompt": "x" * 4001}, "prompt is 4001 characters; the limit is 4000"),
        ({"negative_prompt": "x" * 4001}, "negative_prompt is 4001 characters"),
        ({"guidance_scale": -1.0}, r"guidance_scale -1.0 is out of range"),
        ({"seed": -3}, "seed -3 is out of range"),
        ({"output_format": "gif"}, "output_format 'gif' is not served"),
        (
            {"steps": "20"},
            r"^bad image request: Expected `int \| null`, got `str` - at `\$.steps`$",
        ),
        (
            {"steps": True},
            r"^bad image request: Expected `int \| null`, got `bool` - at `\$.steps`$",
        ),
        ({"style": "vivid"}, "^bad image request: Object contains unknown field `style`$"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(
    worker: ImageWorker, change: dict[str, Any], message: str
) -> None:
    output = run(worker, {"bad": body(params(seed=1), **change)})["bad"]
    assert output.finished and output.error is not None
    assert not output.tensors
    assert re.search(message, output.error), output.error


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown image stage option 'max_batch'"):
        ImageWorker(WorkerOptions(model="x", extra={"max_batch": "4"}))
    with pytest.raises(ValueError, match="option fuse_qkv must be true, false, auto"):
        ImageWorker(WorkerOptions(model="x", extra={"fuse_qkv": "yes"}))
    with pytest.raises(ValueError, match="max_pixels is 0; it must be > 0"):
        ImageWorker(WorkerOptions(model="x", extra={"max_pixels": "0"}))
    worker = ImageWorker(WorkerOptions(model="x", extra={"max_steps": "30", "dtype": "float16"}))
    assert (worker.limits.max_steps, worker.settings.dtype) == (30, "float16")


def test_speed_settings_keep_the_image(folder: Path, plain: Any) -> None:
    """channels_last and fused QKV projections (on by default on CUDA) change float rounding,
    not the picture."""
    fast = ImageWorker(
        WorkerOptions(
            model=str(folder),
            extra={
                "channels_last": "true",
                "fuse_qkv": "true",
                "cuda_graphs": "true",  # installed, but CPU tensors run eagerly
                "batch_wait_ms": "0",
            },
        )
    )
    fast.load()
    try:
        got = pixels(run(fast, {"a": params(seed=7)})["a"])
    finally:
        fast.close()
    assert np.abs(got.astype(int) - reference(plain, 7).astype(int)).max() <= 1


def test_a_prompt_through_the_image_stage_process(folder: Path, plain: Any) -> None:
    spec = StageSpec(
        role="image",
        model=str(folder),
        capacity=16,
        extra_args=("--shm-prefix", SHM_PREFIX, "--log-level", "WARNING"),
    )
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=2.0) as router:
        supervisor = StageSupervisor(router, [spec]).start()
        try:
            assert router.wait_for_replicas("image", 1, timeout=120)
            streams = [
                router.submit("image", body=CONTRACT.encode(params(seed=s))) for s in (11, 12)
            ]
            replies = [stream.result(timeout=120) for stream in streams]
            for seed, [reply] in zip((11, 12), replies, strict=True):
                data = bytes(reply.tensors["image_0"].numpy())
                got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                assert np.abs(got.astype(int) - reference(plain, seed).astype(int)).max() <= 1
            bad = router.submit("image", body=CONTRACT.encode(params(seed=1, width=20)))
            with pytest.raises(StageRequestError, match="width 20 is not a multiple of 8"):
                bad.result(timeout=60)
            del replies, reply
        finally:
            supervisor.stop()
    assert our_segments() == []
