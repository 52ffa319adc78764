"""The OCR stage's two speed-ups over rapidocr's own path compute what rapidocr computes: the
detector's input by table lookup (bit for bit), and the detector on models compiled for the
shapes it meets again (the same output as the dynamic-shape model, to float rounding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omni.stages.encoders import ocr_static_shapes
from omni.stages.encoders.ocr_engines import wheel_models
from omni.stages.encoders.ocr_preprocess import use_table_lookup
from omni.stages.encoders.ocr_static_shapes import ShapeSpecialized


@pytest.mark.parametrize(
    ("limit", "limit_type", "mean", "std", "size"),
    [
        (736, "min", None, None, (1100, 850)),  # rapidocr's defaults, a Letter page
        (736, "min", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], (500, 301)),
        (960, "max", None, None, (300, 1201)),
    ],
)
def test_the_table_lookup_gives_rapidocrs_detector_input_bit_for_bit(
    limit: int, limit_type: str, mean: list[float] | None, std: list[float] | None,
    size: tuple[int, int],
) -> None:
    from rapidocr.ch_ppocr_det.utils import DetPreProcess

    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    use_table_lookup()  # maybe already in force: an engine built earlier in this process
    pre = DetPreProcess(limit, limit_type, mean, std)
    rapidocrs = DetPreProcess.__call__._rapidocr  # type: ignore[attr-defined]
    assert rapidocrs is not DetPreProcess.__call__
    expected = rapidocrs(pre, pixels)
    got = pre(pixels)
    assert got.shape == expected.shape and got.dtype == expected.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert got.flags["C_CONTIGUOUS"]


def test_the_detector_runs_a_shape_met_again_on_its_own_compilation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    openvino = pytest.importorskip("openvino")
    monkeypatch.setattr(ocr_static_shapes, "MAX_SHAPES", 2)
    path = str(wheel_models()["Det"])
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    core = openvino.Core()
    model = core.read_model(path)
    dynamic = core.compile_model(model, "CPU", config).create_infer_request()
    # A source of its own: the shapes seen are recorded per process.
    session = ShapeSpecialized(model, str(tmp_path), config, dynamic)
    rng = np.random.default_rng(0)
    shapes = [(1, 3, 64, 96), (1, 3, 96, 64), (1, 3, 64, 64)]
    inputs = {shape: rng.random(shape, dtype=np.float32) for shape in shapes}

    def run(shape: tuple[int, ...]) -> np.ndarray:
        session.infer(inputs=[inputs[shape]])
        return np.array(session.get_output_tensor().data)

    first = run(shapes[0])
    assert session.last is dynamic and not session.static
    again = run(shapes[0])
    assert session.last is not dynamic and list(session.static) == [shapes[0]]
    np.testing.assert_allclose(again, first, atol=1e-5)
    run(shapes[1])  # first met: dynamic
    run(shapes[1])
    run(shapes[2])
    run(shapes[2])  # a third compilation evicts the least recently used
    assert list(session.static) == [shapes[1], shapes[2]]
    # A second session (another lane) compiles a shape this process met at its first use.
    other = ShapeSpecialized(model, str(tmp_path), config, dynamic)
    other.infer(inputs=[inputs[shapes[0]]])
    assert list(other.static) == [shapes[0]]
