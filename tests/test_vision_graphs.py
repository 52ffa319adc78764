"""The vision tower's fixed-buffer forward (vision_graphs.py) on tiny Qwen2.5-VL and Qwen2-VL
checkpoints: the precomputed grid inputs give exactly transformers' forward, a padded bucket
gives each real image its own embeddings, and batches that cannot use a bucket run eagerly.
On a GPU, the captured graph replays the same numbers for new pixels."""

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
from omni.stages.encoders.vision import VisionEncoder
from omni.stages.encoders.vision_graphs import VisionTowerGraphs, static_tower_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def vl_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family = str(request.param)
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp(family), family=family)


_inputs = processed_noise_images
_reference = reference_image_embeddings


def _capturing_cpu_encoder(vl_folder: Path) -> tuple[VisionEncoder, VisionTowerGraphs, Any]:
    """A CPU encoder whose graphs capture (a test stands its own `_capture` in), and the
    transformers reference."""
    encoder = VisionEncoder.from_pretrained(str(vl_folder), device="cpu", dtype="float32")
    encoder.use_graphs(max_batch_patches=16384, capture=True)
    assert encoder.graphs is not None
    return encoder, encoder.graphs, load_reference_vl(vl_folder)


def test_precomputed_grid_inputs_give_the_same_forward(vl_folder: Path) -> None:
    encoder = VisionEncoder.from_pretrained(str(vl_folder), device="cpu", dtype="float32")
    # Mixed sizes, several windows each (Qwen2.5-VL attends within 8x8-patch windows).
    inputs = _inputs(vl_folder, [(140, 84), (112, 168), (84, 56)])
    pixels = torch.cat([p for p, _ in inputs])
    grid_thw = torch.cat([g for _, g in inputs])
    with torch.no_grad():
        plain = encoder.tower(pixels, grid_thw=grid_thw).pooler_output
        given = encoder.tower(
            pixels, grid_thw=grid_thw, **static_tower_inputs(encoder.tower, grid_thw)
        ).pooler_output
    assert torch.equal(given, plain)


def test_a_padded_bucket_gives_each_image_its_own_embeddings(vl_folder: Path) -> None:
    encoder = VisionEncoder.from_pretrained(str(vl_folder), device="cpu", dtype="float32")
    reference = load_reference_vl(vl_folder)
    same = _inputs(vl_folder, [(112, 168)] * 3)
    # Three images of one grid run as a bucket of four; the fourth is padding.
    grid = tuple(same[0][1][0].tolist())
    same = [(pixels + 0.1 * i, grid_thw) for i, (pixels, grid_thw) in enumerate(same)]
    encoder.use_graphs(max_batch_patches=4 * 12 * 8, capture=False, capture_after=1)
    assert encoder.graphs is not None
    assert encoder.graphs.bucket_size(grid, 3) == 4
    batched = encoder.encode_batch(same)
    assert list(encoder.graphs._buckets) == [(grid, 4)]
    for (pixels, grid_thw), embeddings in zip(same, batched, strict=True):
        torch.testing.assert_close(embeddings, _reference(reference, pixels, grid_thw),
                                   rtol=0, atol=1e-5)
    # The same bucket again, with other pixels: new results, not the last batch's.
    again = encoder.encode_batch([same[2], same[0], same[1]])
    assert torch.equal(again[0], batched[2]) and torch.equal(again[1], batched[0])


def test_mixed_grids_and_over_budget_batches_run_eagerly(vl_folder: Path) -> None:
    encoder = VisionEncoder.from_pretrained(str(vl_folder), device="cpu", dtype="float32")
    reference = load_reference_vl(vl_folder)
    encoder.use_graphs(max_batch_patches=2 * 12 * 8, capture=False)
    assert encoder.graphs is not None
    mixed = _inputs(vl_folder, [(112, 168), (84, 56)])
    assert encoder.graphs.bucket_size((1, 12, 8), 3) is None  # 4 x 96 patches > 192
    assert encoder.graphs.bucket_size((1, 12, 8), 1) == 1
    assert encoder.graphs.bucket_size((1, 16, 16), 1) is None  # one image over the budget
    big = _inputs(vl_folder, [(112, 168)] * 3)
    for batch in (mixed, big):
        embeddings = encoder.encode_batch(batch)
        for (pixels, grid_thw), got in zip(batch, embeddings, strict=True):
            torch.testing.assert_close(got, _reference(reference, pixels, grid_thw),
                                       rtol=0, atol=1e-5)
    assert not encoder.graphs._buckets


@needs_cuda
def test_captured_graph_replays_the_eager_forward_on_a_gpu(vl_folder: Path) -> None:
    encoder = VisionEncoder.from_pretrained(str(vl_folder), device="cuda", dtype="float32")
    # Three grids: more gather plans than the attention keeps, so the graphs must hold theirs.
    batches = [
        _inputs(vl_folder, [(112, 168)] * 2),
        _inputs(vl_folder, [(140, 84)] * 3),
        _inputs(vl_folder, [(84, 56)] * 1),
    ]
    eager = [encoder.encode_batch(batch) for batch in batches]
    encoder.use_graphs(max_batch_patches=16384)
    assert encoder.graphs is not None
    for _ in range(3):  # seen, then captured (on the capture thread), then replayed
        for batch, expected in zip(batches, eager, strict=True):
            got = encoder.encode_batch(batch)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        encoder.graphs.wait_for_captures()
    buckets = encoder.graphs._buckets.values()
    assert len(buckets) == 3 and all(bucket.graph is not None for bucket in buckets)
    assert all(bucket.plans for bucket in buckets)


def test_a_refused_capture_falls_back_to_eager_for_good(
    vl_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder, graphs, reference = _capturing_cpu_encoder(vl_folder)
    calls = []

    def refuse(bucket: Any) -> None:
        calls.append(bucket)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", refuse)
    batch = _inputs(vl_folder, [(84, 56)] * 2)
    for _ in range(3):
        for (pixels, grid_thw), got in zip(batch, encoder.encode_batch(batch), strict=True):
            torch.testing.assert_close(got, _reference(reference, pixels, grid_thw),
                                       rtol=0, atol=1e-5)
        graphs.wait_for_captures()
    assert graphs.failed and len(calls) == 1 and not graphs._buckets
    graphs.close()


def test_a_bucket_can_hold_the_gather_plans_its_forward_used(vl_folder: Path) -> None:
    from omni.stages.encoders.vision_graphs import _gather_plans

    encoder = VisionEncoder.from_pretrained(str(vl_folder), device="cpu", dtype="float32")
    encoder.use_graphs(max_batch_patches=16384, capture=False, capture_after=1)
    assert encoder.graphs is not None
    encoder.encode_batch(_inputs(vl_folder, [(84, 56)] * 2))
    (bucket,) = encoder.graphs._buckets.values()
    held = _gather_plans(encoder.tower, bucket.inputs)
    # Qwen2.5-VL attends in windows and whole images (two plans), Qwen2-VL in images only.
    assert len(held) == (2 if "window_index" in bucket.inputs else 1)
    # The very plans the forward built, not new ones.
    again = _gather_plans(encoder.tower, bucket.inputs)
    assert all(a is b for a, b in zip(held, again, strict=True))


def test_a_grid_is_taken_into_a_bucket_only_when_it_comes_again(vl_folder: Path) -> None:
    encoder = VisionEncoder.from_pretrained(str(vl_folder), device="cpu", dtype="float32")
    reference = load_reference_vl(vl_folder)
    encoder.use_graphs(max_batch_patches=16384, capture=False)  # the default: second sighting
    graphs = encoder.graphs
    assert graphs is not None
    sizes = [(84, 56), (112, 168), (140, 84)]
    for size in sizes:  # ever-new sizes: all eager, nothing built
        batch = _inputs(vl_folder, [size])
        got = encoder.encode_batch(batch)[0]
        torch.testing.assert_close(got, _reference(reference, *batch[0]), rtol=0, atol=1e-5)
    assert not graphs._buckets
    again = _inputs(vl_folder, [sizes[1]])
    got = encoder.encode_batch(again)[0]
    assert list(graphs._buckets) == [((1, 12, 8), 1)]
    torch.testing.assert_close(got, _reference(reference, *again[0]), rtol=0, atol=1e-5)


def test_a_capture_runs_beside_the_batches_which_do_not_wait_for_it(
    vl_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    encoder, graphs, reference = _capturing_cpu_encoder(vl_folder)
    release = threading.Event()
    captured: list[str] = []

    def slow_capture(bucket: Any) -> None:  # stands in for the CUDA capture, on its thread
        assert release.wait(timeout=60)
        captured.append(threading.current_thread().name)

    monkeypatch.setattr(graphs, "_capture", slow_capture)
    batch = _inputs(vl_folder, [(84, 56)] * 2)
    expected = [_reference(reference, pixels, grid_thw) for pixels, grid_thw in batch]
    for _ in range(3):  # seen; capture started; still capturing: all answered eagerly
        for got, want in zip(encoder.encode_batch(batch), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert not graphs._buckets and not captured
    release.set()
    graphs.wait_for_captures(timeout=60)
    assert captured == ["vision-capture_0"]  # one capture, on the capture thread
    [(key, bucket)] = graphs._buckets.items()
    assert key == (tuple(int(v) for v in batch[0][1][0]), 2)
    for got, want in zip(encoder.encode_batch(batch), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The batch ran through the bucket's fixed buffers.
    assert torch.equal(bucket.pixels, torch.cat([pixels for pixels, _ in batch]))
    graphs.close()
