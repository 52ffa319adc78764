"""The "ocr" stage worker: PP-OCR (inside the rapidocr wheel, on OpenVINO or onnxruntime) reads a
rendered PDF page and a sign in every image kind a client may send, exactly as plain
`rapidocr.RapidOCR()` reads them; bad inputs are refused by name."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from fixtures_perception import (
    INVOICE,
    encoded,
    image_kinds,
    invoice_pdf,
    page_pixels,
    sign_png,
)
from omni.stages.contracts.ocr import CONTRACT, PageText, ReadRequest, TextLine
from omni.stages.encoders.ocr import (
    OCRSettings,
    OCRWorker,
    ocr_settings,
    reading_order,
    warm_up_image,
)
from omni.stages.encoders.ocr_engines import openvino_computes_bf16, wheel_models
from omni.stages.runtime import WorkerOptions, worker_class
from omni.stages.runtime.worker import WorkerRequest
from PIL import Image

SIGN_TEXT = "EXIT 24\nMain Street"


def file_input(data: bytes) -> dict[str, torch.Tensor]:
    return {"image_file": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def body(item: str) -> bytes:
    return CONTRACT.encode(ReadRequest(item=item))


@pytest.fixture(scope="module")
def worker() -> OCRWorker:
    # nice 0: loaded in the test process itself, which must keep its priority; f32: the
    # exact boxes below are the f32 detector's on any CPU.
    ocr = OCRWorker(
        WorkerOptions(extra={"lanes": "2", "threads": "2", "nice": "0", "precision": "f32"})
    )
    ocr.load()
    return ocr


def run(worker: OCRWorker, requests: list[WorkerRequest]) -> dict[str, tuple[str | None, object]]:
    for request in requests:
        worker.add_request(request)
    results = {}
    while worker.has_work():
        for output in worker.step():
            assert output.finished
            results[output.request_id] = (output.error, output.reply)
    return results


def test_options_are_typed_and_checked() -> None:
    assert worker_class("ocr") is OCRWorker
    settings = ocr_settings(WorkerOptions(extra={"threads": "3", "lanes": "2", "use_cls": "0"}))
    assert settings == OCRSettings(threads=3, lanes=2, use_cls=False)
    assert OCRSettings().total_threads == os.cpu_count() and OCRSettings().nice == 10
    with pytest.raises(ValueError, match="nice is 20; it must be in"):
        OCRWorker.check_options(WorkerOptions(extra={"nice": "20"}))
    with pytest.raises(ValueError, match="precision is 'int8'; it must be one of auto, f32, bf16"):
        OCRWorker.check_options(WorkerOptions(extra={"precision": "int8"}))
    with pytest.raises(ValueError, match="precision bf16 needs the openvino engine"):
        OCRWorker.check_options(WorkerOptions(extra={"precision": "bf16", "engine": "onnxruntime"}))
    assert OCRSettings(engine="onnxruntime").detector_precision == "f32"
    assert OCRSettings(precision="f32").detector_precision == "f32"
    assert OCRSettings().detector_precision == ("bf16" if openvino_computes_bf16() else "f32")
    with pytest.raises(ValueError, match="unknown ocr stage option 'thread'"):
        ocr_settings(WorkerOptions(extra={"thread": "1"}))
    with pytest.raises(ValueError, match="lanes is 0; it must be >= 1"):
        OCRWorker.check_options(WorkerOptions(extra={"lanes": "0"}))
    assert ocr_settings(WorkerOptions(extra={"engine": "onnxruntime"})).runtime == "onnxruntime"
    assert OCRSettings().runtime == "openvino"  # installed with omni
    with pytest.raises(ValueError, match="engine is 'tensorrt'; it must be one of auto, "
                       "openvino, onnxruntime"):
        OCRWorker.check_options(WorkerOptions(extra={"engine": "tensorrt"}))


def test_runs_the_models_plain_rapidocr_runs() -> None:
    names = {task: path.name for task, path in wheel_models().items()}
    assert names == {"Det": "PP-OCRv6_det_small.onnx",
                     "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
                     "Rec": "PP-OCRv6_rec_small.onnx"}
    assert all(path.is_file() for path in wheel_models().values())


def read_beside_plain(extra: dict[str, str], pages: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Each page read by a stage with these options and by plain `RapidOCR()` (its defaults:
    onnxruntime on every core, the direction classifier on): name -> (stage reply, plain's)."""
    from rapidocr import RapidOCR

    plain = RapidOCR(params={"Global.log_level": "error"})
    ocr = OCRWorker(WorkerOptions(extra={**extra, "nice": "0"}))  # in this test process
    ocr.load()
    results = run(ocr, [WorkerRequest(name, {"pixels": torch.from_numpy(pixels.copy())},
                                      body(name)) for name, pixels in pages.items()])
    read = {}
    for name, pixels in pages.items():
        error, reply = results[name]
        assert error is None, name
        read[name] = (reply, plain(pixels))
    return read


def two_pages() -> dict[str, np.ndarray]:
    return {"page": np.asarray(page_pixels(invoice_pdf())),
            "sign": np.asarray(Image.open(io.BytesIO(sign_png())).convert("RGB"))}


def plain_boxes(found: object) -> list[list[int]]:
    return [[int(box[:, 0].min()), int(box[:, 1].min()), int(box[:, 0].max()),
             int(box[:, 1].max())] for box in found.boxes]  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_reads_what_plain_rapidocr_reads(engine: str) -> None:
    """The stage's lines on either runtime, in f32, are plain `RapidOCR()`'s: the same texts
    and boxes, and the same scores but for float rounding (the runtimes add in other orders)."""
    pages = {**two_pages(), "warm-up": warm_up_image()}
    read = read_beside_plain({"engine": engine, "threads": "1", "precision": "f32"}, pages)
    for name, (reply, found) in read.items():
        assert [line.text for line in reply.lines] == list(found.txts), name
        assert [line.box for line in reply.lines] == plain_boxes(found), name
        assert [line.score for line in reply.lines] == pytest.approx(
            list(found.scores), abs=1e-4), name
    assert read["page"][0].text == INVOICE
    assert read["sign"][0].text == SIGN_TEXT
    # The stage's warm-up image holds a line, so loading runs every model once.
    assert read["warm-up"][0].text == "OCR 24"


@pytest.mark.skipif(not openvino_computes_bf16(), reason="the CPU has no bf16 units")
def test_a_bf16_detector_reads_the_same_texts() -> None:
    """The detector in bf16 (the default where the CPU computes it natively): the same lines
    and texts as plain `RapidOCR()`, boxes within three pixels; the recognizer stays in f32."""
    read = read_beside_plain({"threads": "1", "precision": "bf16"}, two_pages())
    for name, (reply, found) in read.items():
        assert [line.text for line in reply.lines] == list(found.txts), name
        boxes = np.array([line.box for line in reply.lines])
        # 2 px measured on an AMD EPYC (AVX512-BF16); a pixel of margin for other bf16 units
        assert np.abs(boxes - np.array(plain_boxes(found))).max() <= 3, name
    assert read["page"][0].text == INVOICE
    assert read["sign"][0].text == SIGN_TEXT


def test_reading_order_joins_rows_left_to_right() -> None:
    lines = [
        TextLine("total", 0.9, [120, 52, 180, 70]),
        TextLine("Invoice", 0.9, [10, 10, 90, 30]),
        TextLine("35 EUR", 0.9, [200, 50, 260, 72]),
        TextLine("4711", 0.9, [100, 12, 140, 28]),
    ]
    assert reading_order(lines) == "Invoice 4711\ntotal 35 EUR"
    assert reading_order([]) == ""


def test_reads_a_page_and_every_image_kind(worker: OCRWorker) -> None:
    page = torch.from_numpy(np.asarray(page_pixels(invoice_pdf())).copy())
    blank = encoded(Image.new("RGB", (200, 100), "white"), "PNG")
    requests = [WorkerRequest("page", {"pixels": page}, body("page 1"))]
    requests += [WorkerRequest(name, file_input(data), body(name))
                 for name, (data, _) in image_kinds().items()]
    requests.append(WorkerRequest("sign.png", file_input(sign_png()), body("sign.png")))
    requests.append(WorkerRequest("blank", file_input(blank), body("blank")))
    results = run(worker, requests)

    error, page_text = results.pop("page")
    assert error is None and page_text.text == INVOICE  # type: ignore[attr-defined]
    assert page_text.lines[0].box == [13, 17, 236, 37]  # type: ignore[attr-defined]
    assert results.pop("blank") == (None, PageText(text=""))
    for name, (error, reply) in results.items():
        assert error is None, name
        assert reply.text == SIGN_TEXT, name  # type: ignore[attr-defined]
        assert all(line.score > 0.9 for line in reply.lines), name  # type: ignore[attr-defined]
    stats = worker.stats()
    assert (stats.requests_queued, stats.images_read, stats.lines_found) == (0, 8, 13)


def test_bad_inputs_are_refused_by_name(worker: OCRWorker) -> None:
    wide = torch.zeros((4, 4, 3), dtype=torch.int16)
    results = run(worker, [
        WorkerRequest("junk", file_input(b"hello"), body("messages[0].content[1]")),
        WorkerRequest("cut", file_input(sign_png()[:200]), body("upload 2 (sign.png)")),
        WorkerRequest("wide", {"pixels": wide}, body("page 3")),
        WorkerRequest("none", {"audio": wide}, body("x")),
        WorkerRequest("no body", file_input(sign_png()), b"\x01"),
    ])
    assert {rid: error for rid, (error, _) in results.items()} == {
        "junk": "messages[0].content[1] is not a PNG, JPEG, WebP, GIF or BMP image",
        "cut": "upload 2 (sign.png) could not be decoded: the file is truncated or corrupt",
        "wide": "page 3: input 'pixels' must be uint8 (height, width, 3), got torch.int16 "
                "(4, 4, 3)",
        "none": "an ocr request needs 'image_file' or 'pixels'; got ['audio']",
        "no body": "bad ocr request: Expected `object`, got `int`",
    }
    stats = worker.stats()  # refusals read nothing
    assert (stats.requests_queued, stats.images_read, stats.lines_found) == (0, 8, 13)


def test_lower_priority_reaches_every_thread() -> None:
    """In a child process (this one keeps its priority): a thread started before the call and
    the calling thread both end up 3 steps down, and a thread started after inherits it."""
    import subprocess
    import sys

    code = """
import os, threading
from omni.stages.encoders.ocr import lower_priority
started = threading.Event(); done = threading.Event()
def wait():
    started.set(); done.wait()
early = threading.Thread(target=wait); early.start(); started.wait()
lower_priority(3)
late = threading.Thread(target=done.wait); late.start()
tasks = f"/proc/{os.getpid()}/task"
print(sorted(os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(tasks)))
done.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    nice = [int(value) for value in out.stdout.strip().strip("[]").split(",")]
    # main, early and late, and any thread the imports started
    assert len(nice) >= 3 and set(nice) == {min(19, base + 3)}


def test_a_lone_image_takes_every_thread_and_queued_ones_take_the_lanes() -> None:
    """Which engine reads what: the wide engine (every thread) a lone queued image; the lane
    engines up to `lanes` images at once when that many wait; no model is loaded here."""
    from concurrent.futures import ThreadPoolExecutor

    class Recording:
        def __init__(self, name: str) -> None:
            self.name, self.read = name, []

        def __call__(self, pixels: np.ndarray):
            self.read.append(int(pixels[0, 0, 0]))
            return type("Found", (), {"txts": None})()

    ocr = OCRWorker(WorkerOptions(extra={"lanes": "2", "threads": "2", "nice": "0"}))
    wide, lanes = Recording("wide"), [Recording("lane0"), Recording("lane1")]
    ocr._wide, ocr._engines = wide, lanes
    ocr._pool = ThreadPoolExecutor(2)

    def request(value: int) -> WorkerRequest:
        pixels = torch.full((4, 4, 3), value, dtype=torch.uint8)
        return WorkerRequest(f"r{value}", {"pixels": pixels}, body(f"image {value}"))

    ocr.add_request(request(1))
    assert [o.request_id for o in ocr.step()] == ["r1"]
    for value in (2, 3, 4):
        ocr.add_request(request(value))
    assert [o.request_id for o in ocr.step()] == ["r2", "r3"]
    assert [o.request_id for o in ocr.step()] == ["r4"]
    assert wide.read == [1, 4]
    assert (lanes[0].read, lanes[1].read) == ([2], [3])
    assert ocr.images_read == 4
    ocr.close()
