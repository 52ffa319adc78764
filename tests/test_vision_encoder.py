"""The vision encoder stage against transformers' `get_image_features` on a tiny Qwen2.5-VL:
in process, batched across requests, and as a stage over the transport."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_vl import (
    load_reference_vl,
    make_tiny_qwen2_5_vl,
    processed_noise_images,
    reference_image_embeddings,
)
from omni.stages.checkpoint import load_prefixed_state_dict
from omni.stages.contracts.encoder import EncodeReply, EncoderStats
from omni.stages.encoders.vision import VISION_PREFIXES, VisionEncoder, VisionWorker
from omni.stages.encoders.vision_patch_embed import LinearPatchEmbed
from omni.stages.runtime import StageConfig, StageRuntime, WorkerOptions, worker_class
from omni.stages.runtime.worker import WorkerRequest
from stage_helpers import SHM_PREFIX, running_router

ENDPOINT = "inproc://omni-vision-stage"
# (width, height) of the test images: grids 4x6, 8x4, 6x10 and 12x8 patches (the last two
# span several 2x2-merged-patch attention windows).
SIZES = [(84, 56), (56, 112), (140, 84), (112, 168)]


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl_vision"))


@pytest.fixture(scope="module")
def reference(vl_folder: Path) -> Any:
    return load_reference_vl(vl_folder)


@pytest.fixture(scope="module")
def encoder(vl_folder: Path) -> VisionEncoder:
    return VisionEncoder.from_pretrained(str(vl_folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def image_inputs(vl_folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel_values, image_grid_thw) per test image."""
    return processed_noise_images(vl_folder, SIZES)


_reference_embeddings = reference_image_embeddings


def _request_inputs(pixels: torch.Tensor, grid: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pixel_values": pixels, "image_grid_thw": grid}


def test_norms_and_mlps_run_on_the_fused_kernels(encoder: VisionEncoder) -> None:
    from omni.stages.encoders.vision_fused_layers import FusedRMSNorm, SiluMulMLP

    blocks = list(getattr(encoder.tower, "blocks"))  # noqa: B009
    assert blocks and all(
        isinstance(b.norm1, FusedRMSNorm)
        and isinstance(b.norm2, FusedRMSNorm)
        and isinstance(b.mlp, SiluMulMLP)
        for b in blocks
    )
    assert isinstance(getattr(encoder.tower, "merger").ln_q, FusedRMSNorm)  # noqa: B009


def test_padded_mlp_equals_the_original_and_shares_its_weights() -> None:
    # On CUDA Qwen2.5-VL's intermediate size 3420 is padded to 3456 (aligned GEMMs); forced
    # here on the CPU with an odd size: same outputs, one copy of the weights, same state dict.
    from omni.stages.encoders.vision_fused_layers import SiluMulMLP
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    torch.manual_seed(0)
    config = type("Config", (), {"hidden_size": 16, "intermediate_size": 36, "hidden_act": "silu"})
    original = Qwen2_5_VLMLP(config, bias=True)
    state = {name: tensor.clone() for name, tensor in original.state_dict().items()}
    x = torch.randn(5, 16)
    expected = original(x)
    padded = SiluMulMLP(original, pad=True)
    assert padded.padded is not None
    gate, up, down = padded.padded
    assert (gate.out_features, up.out_features, down.in_features) == (64, 64, 64)
    assert gate.weight.data_ptr() == padded.gate_proj.weight.data_ptr()
    assert down.weight.data_ptr() == padded.down_proj.weight.data_ptr()
    assert torch.count_nonzero(gate.weight[36:]) == 0
    assert torch.count_nonzero(down.weight[:, 36:]) == 0
    torch.testing.assert_close(padded(x), expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(padded.state_dict()[name], state[name]) for name in state)
    assert SiluMulMLP(Qwen2_5_VLMLP(config, bias=True)).padded is None  # CPU: as it is


def test_tower_weights_equal_the_checkpoint(encoder: VisionEncoder, vl_folder: Path) -> None:
    state = load_prefixed_state_dict(str(vl_folder), VISION_PREFIXES, "vision tower")
    tower_state = encoder.tower.state_dict()
    assert sorted(state) == sorted(tower_state)
    for name, tensor in state.items():
        assert torch.equal(tower_state[name], tensor), name


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_embeddings_match_transformers_per_image_and_batched(
    device: str,
    encoder: VisionEncoder,
    vl_folder: Path,
    reference: Any,
    image_inputs: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    if device != "cpu":
        encoder = VisionEncoder.from_pretrained(str(vl_folder), device=device, dtype="float32")
    # The reference runs on the CPU; GPU float32 kernels sum in another order.
    atol = 1e-5 if device == "cpu" else 1e-4
    assert [int(g.prod()) // 4 for _, g in image_inputs] == [6, 8, 15, 24]
    for pixels, grid in image_inputs:
        embeddings = encoder.encode(pixels, grid).cpu()
        assert embeddings.shape == (int(grid.prod()) // 4, 64)
        expected = _reference_embeddings(reference, pixels, grid)
        torch.testing.assert_close(embeddings, expected, rtol=0, atol=atol)

    # Two requests, the second with two images: one forward, split back per request.
    first = image_inputs[3]
    second = (
        torch.cat([image_inputs[1][0], image_inputs[2][0]]),
        torch.cat([image_inputs[1][1], image_inputs[2][1]]),
    )
    batched = [e.cpu() for e in encoder.encode_batch([first, second])]
    assert [tuple(e.shape) for e in batched] == [(24, 64), (8 + 15, 64)]
    torch.testing.assert_close(
        batched[0], _reference_embeddings(reference, *first), rtol=0, atol=atol
    )
    torch.testing.assert_close(
        batched[1], _reference_embeddings(reference, *second), rtol=0, atol=atol
    )


def test_patch_embedding_is_one_gemm_equal_to_the_conv(
    encoder: VisionEncoder, image_inputs: list[Any]
) -> None:
    embed = encoder.tower.patch_embed
    assert isinstance(embed, LinearPatchEmbed)
    pixels = image_inputs[2][0]
    conv = embed.proj
    expected = conv(pixels.view(-1, conv.in_channels, *conv.kernel_size)).flatten(1)
    with torch.no_grad():
        # fp32, summed in another order: equal to rounding.
        torch.testing.assert_close(embed(pixels), expected, rtol=1e-5, atol=1e-5)
    # Not a conv in disguise: the forward runs no convolution.
    with torch.no_grad(), torch.profiler.profile() as prof:
        embed(pixels)
    names = {event.key for event in prof.key_averages()}
    assert "aten::linear" in names and not any("conv" in name for name in names)


def test_bad_inputs_are_named(encoder: VisionEncoder, image_inputs: list[Any]) -> None:
    pixels, grid = image_inputs[0]
    with pytest.raises(ValueError, match=r"pixel_values has 24 patches; image_grid_thw needs 32"):
        encoder.check_inputs(pixels, torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match=r"expected \[patches, 1176\]"):
        encoder.check_inputs(pixels[:, :100], grid)
    with pytest.raises(ValueError, match=r"image 0 has grid \(1, 3, 8\)"):
        encoder.check_inputs(pixels, torch.tensor([[1, 3, 8]]))
    with pytest.raises(ValueError, match="image_grid_thw must be integer"):
        encoder.check_inputs(pixels, grid.float())
    with pytest.raises(ValueError, match="pixel_values must be floating point"):
        encoder.check_inputs(pixels.long(), grid)


def test_worker_batches_queued_requests_within_the_patch_budget(
    vl_folder: Path, encoder: VisionEncoder, image_inputs: list[Any]
) -> None:
    # Budget 150 patches: images of 24 + 32 + 60 patches fit together, the 96-patch one
    # waits for the next step.
    worker = VisionWorker(
        WorkerOptions(model=str(vl_folder), extra={"dtype": "float32", "max_batch_patches": "150"})
    )
    assert worker_class("vision") is VisionWorker
    worker.load()
    for index in (0, 1, 2, 3):
        pixels, grid = image_inputs[index]
        worker.add_request(
            WorkerRequest(f"r{index}", {"pixel_values": pixels, "image_grid_thw": grid})
        )
    worker.add_request(WorkerRequest("gone", _request_inputs(*image_inputs[0])))
    worker.abort("gone")
    with pytest.raises(ValueError, match="lacks input tensors \\['image_grid_thw'\\]"):
        worker.add_request(WorkerRequest("bad", {"pixel_values": image_inputs[0][0]}))
    with pytest.raises(ValueError, match="'r1' is already active"):
        worker.add_request(WorkerRequest("r1", _request_inputs(*image_inputs[1])))

    queued = EncoderStats(requests_queued=4, requests_encoded=0, forwards=0)
    assert worker.stats() == queued
    first = worker.step()
    assert [o.request_id for o in first] == ["r0", "r1", "r2"]
    second = worker.step()
    assert [o.request_id for o in second] == ["r3"]
    assert not worker.has_work() and worker.step() == []
    done = EncoderStats(requests_queued=0, requests_encoded=4, forwards=2)
    assert worker.stats() == done
    for output in first + second:
        pixels, grid = image_inputs[int(output.request_id[1:])]
        assert output.finished and output.error is None
        assert output.reply == EncodeReply(num_tokens=int(grid.prod()) // 4)
        torch.testing.assert_close(
            output.tensors["embeddings"], encoder.encode(pixels, grid), rtol=0, atol=1e-6
        )
    with pytest.raises(ValueError, match="unknown vision stage options \\['batch'\\]"):
        VisionWorker(WorkerOptions(model=str(vl_folder), extra={"batch": "2"}))
    with pytest.raises(ValueError, match="option cuda_graphs must be true, false, got 'maybe'"):
        VisionWorker(WorkerOptions(model=str(vl_folder), extra={"cuda_graphs": "maybe"}))
    assert not VisionWorker(
        WorkerOptions(model=str(vl_folder), extra={"cuda_graphs": "false"})
    ).cuda_graphs


def test_vision_stage_over_the_transport(
    vl_folder: Path, reference: Any, image_inputs: list[Any]
) -> None:
    worker = VisionWorker(WorkerOptions(model=str(vl_folder), extra={"dtype": "float32"}))
    worker.load()
    config = StageConfig(
        role="vision",
        connect=ENDPOINT,
        heartbeat_interval_s=0.05,
        server_timeout_s=1.0,
        shm_prefix=SHM_PREFIX,
        replica_id="vision-0",
    )
    with running_router(ENDPOINT, shared_memory=False) as router:
        runtime = StageRuntime(config, worker).start()
        try:
            assert router.wait_for_replicas("vision", 1, timeout=30)
            streams = [
                router.submit("vision", {"pixel_values": pixels, "image_grid_thw": grid})
                for pixels, grid in image_inputs[:2]
            ]
            bad = router.submit("vision", {"pixel_values": image_inputs[0][0]})
            for stream, (pixels, grid) in zip(streams, image_inputs[:2], strict=True):
                replies = stream.result(timeout=30)
                assert len(replies) == 1 and replies[0].finished
                torch.testing.assert_close(
                    replies[0].tensors["embeddings"],
                    _reference_embeddings(reference, pixels, grid),
                    rtol=0,
                    atol=1e-5,
                )
            with pytest.raises(Exception, match="lacks input tensors"):
                bad.result(timeout=30)
        finally:
            runtime.stop()
            runtime.join(10)
