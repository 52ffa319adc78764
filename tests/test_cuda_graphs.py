"""CUDA-graph replay of the denoiser: signatures on the CPU; on a GPU, graphed images equal
eager ones and the graphs are replayed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omni.stages.generators.cuda_graphs import UNCAPTURABLE, GraphedForward, describe, rebuild
from omni.stages.generators.image_pipeline import BatchShape, DiffusionImageGenerator, ImageJob
from omni.stages.generators.random_diffusion import save_random_sd_pipeline


def test_signatures_fold_tensors_and_refuse_numbers() -> None:
    sample, t = torch.zeros(2, 4, 8, 8), torch.tensor(3)
    tensors: list[torch.Tensor] = []
    key = describe(((sample, t), {"cond": {"a": torch.ones(2)}, "return_dict": False}), tensors)
    assert [tuple(x.shape) for x in tensors] == [(2, 4, 8, 8), (), (2,)]
    other: list[torch.Tensor] = []
    same = describe(
        ((sample + 1, t + 1), {"return_dict": False, "cond": {"a": torch.ones(2)}}), other
    )
    assert key == same  # values do not matter, shapes do
    assert describe(((torch.zeros(1, 4, 8, 8), t), {}), []) != describe(((sample, t), {}), [])
    assert describe(((sample, 3.5), {}), []) is UNCAPTURABLE  # a number may change every call
    rebuilt = rebuild(((sample, t), {"x": [sample]}), iter([t, sample, t]))
    assert rebuilt[0][0] is t and rebuilt[0][1] is sample and rebuilt[1]["x"][0] is t


def test_cpu_tensors_run_eagerly() -> None:
    graphed = GraphedForward(lambda x, scale=2: (x * scale,))
    out = graphed(torch.ones(2), scale=3)
    assert torch.equal(out[0], torch.full((2,), 3.0)) and graphed.replays == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_images_equal_eager_ones(tmp_path: Path) -> None:
    folder = save_random_sd_pipeline(tmp_path / "sd")
    shape = BatchShape(32, 32, 3, 7.5, negative=False)
    jobs = [ImageJob("a red fox", None, seed) for seed in (1, 2)]
    images = {}
    for graphs in (False, True):
        generator = DiffusionImageGenerator.from_pretrained(
            str(folder), "cuda", "float32", fuse_qkv=False, cuda_graphs=graphs
        )
        images[graphs] = [generator.generate(shape, jobs) for _ in range(2)]
    assert generator.pipeline.unet.forward.replays >= 3  # steps after each shape's capture
    for eager, graphed in zip(images[False], images[True], strict=True):
        # The same kernels; a cuBLAS reduction order may still differ under capture.
        assert (eager.int() - graphed.int()).abs().max() <= 1
