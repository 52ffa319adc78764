"""OCR as a stage ("ocr"): images in, the text written in them out, with PP-OCR on OpenVINO (or
onnxruntime).

The models are the PP-OCR detection, direction and recognition networks that ship inside the
`rapidocr` wheel (no download), run through rapidocr's own pipeline, so a page reads exactly as
plain `rapidocr.RapidOCR()` reads it (`ocr_engines` says how, and why OpenVINO). What a
request and its reply hold is the contract's (`omni.stages.contracts.ocr`): an image file's
bytes or a rendered page's RGB pixels in, a `PageText` out. Images are decoded here, off the
API process, with the same limits and the same conversion to RGB as the vision stage (CMYK,
16-bit grey, transparency over white, a GIF's first frame).

The runtimes would otherwise start a thread per core for every session (and onnxruntime's
idle threads spin waiting for work). `threads` bounds the stage's threads (default: every
core), and they sleep when idle. The stage process runs `nice` steps below the others (default
10): it reads on every core the LLM and API processes leave idle, and yields them whenever
those have work, so a chat's latency does not depend on how many pages are being read.

A lone image is read on all `threads` (the latency of one page); when several are queued, up
to `lanes` of them are read at once, each by its own engine on threads / lanes threads. One
image's threads wait on each other at every layer, and the LLM stage takes cores away from
them while it prefills; images on their own threads do not wait, so several queued pages are
read faster one lane each (on the 2-core AMD machine, with 8 pages in flight, the OCR stage's
CPU per page rose from about 300 to 376 ms when its two threads shared the cores with the
LLM's; docs/benchmarks.md, perception). `precision` is the detector's arithmetic on OpenVINO
(`ocr_engines` says why the other networks stay in f32).

Options (`--option key=value`): the fields of `OCRSettings`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omni.stages.contracts.ocr import (
    CONTRACT,
    ENGINES,
    IMAGE_FILE,
    PIXELS,
    PRECISIONS,
    ROLE,
    OCRStats,
    PageText,
    TextLine,
)
from omni.stages.encoders.ocr_engines import (
    build_engine,
    openvino_available,
    openvino_computes_bf16,
)
from omni.stages.runtime.options import field_types, parse_options
from omni.stages.runtime.worker import (
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

from omni.media import MediaError, MediaLimits, load_image

logger = logging.getLogger(__name__)


def default_threads() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class OCRSettings:
    # Runtime threads of the whole stage (split between the lanes).
    threads: int = 0  # 0: default_threads(), every core
    # Steps of CPU priority below the processes that started the stage (0: the same).
    nice: int = 10
    # The detector's arithmetic on OpenVINO: f32, bf16, or auto (bf16 where the CPU has bf16
    # units, else f32). onnxruntime computes in f32.
    precision: str = "auto"
    # Images read at once when that many are queued, each by its own engine on threads /
    # lanes threads (a lone image is read on every thread).
    lanes: int = 2
    # The runtime under PP-OCR: openvino, onnxruntime, or auto (openvino where installed).
    engine: str = "auto"
    # The direction classifier turns lines written upside down; pages and signs rarely are,
    # but photos can be, and it costs little next to detection.
    use_cls: bool = True
    # Lines the recognizer is less sure of than this are dropped (rapidocr's default).
    min_score: float = 0.5
    # Pixels of one image; the API process checks the header against its own limit first.
    max_pixels: int = MediaLimits.max_image_pixels

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads is {self.threads}; it must be >= 0 (0: every core)")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice is {self.nice}; it must be in [0, 19]")
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision is {self.precision!r}; it must be one of auto, "
                             f"{', '.join(PRECISIONS)}")
        if self.precision == "bf16" and self.engine == "onnxruntime":
            raise ValueError("precision bf16 needs the openvino engine, not onnxruntime")
        if self.lanes < 1:
            raise ValueError(f"lanes is {self.lanes}; it must be >= 1")
        if self.engine not in ("auto", *ENGINES):
            raise ValueError(f"engine is {self.engine!r}; it must be one of auto, "
                             f"{', '.join(ENGINES)}")
        if not 0 <= self.min_score < 1:
            raise ValueError(f"min_score is {self.min_score}; it must be in [0, 1)")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels is {self.max_pixels}; it must be >= 1")

    @property
    def total_threads(self) -> int:
        return self.threads or default_threads()

    @property
    def runtime(self) -> str:
        if self.engine != "auto":
            return self.engine
        return "openvino" if openvino_available() else "onnxruntime"

    @property
    def detector_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.runtime == "openvino" and openvino_computes_bf16() else "f32"


def lower_priority(steps: int) -> None:
    """Every thread of this process `steps` nice steps down (threads started later inherit
    their starter's). On Linux a nice value belongs to a thread, so setting the process's
    alone would leave the threads already running, the stage's busy loop among them, where
    they were."""
    tasks = f"/proc/{os.getpid()}/task"
    threads = [int(tid) for tid in os.listdir(tasks)] if os.path.isdir(tasks) else [0]
    for tid in threads:
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + steps))
        except (ProcessLookupError, PermissionError):
            pass  # a thread that ended meanwhile; a value the OS will not take


def ocr_settings(options: WorkerOptions) -> OCRSettings:
    return OCRSettings(**parse_options(options.extra, field_types(OCRSettings), ROLE))


def warm_up_image() -> np.ndarray:
    """A small image holding one line of text, for every model of the pipeline to run on."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (256, 64), "white")
    ImageDraw.Draw(image).text((10, 12), "OCR 24", fill="black",
                               font=ImageFont.load_default(size=32))
    return np.asarray(image)


def reading_order(lines: list[TextLine]) -> str:
    """The lines as text: rows top to bottom (a line whose middle lies within the row's first
    line's height joins it), each row's lines left to right, rows on lines of their own."""
    rows: list[list[TextLine]] = []
    for line in sorted(lines, key=lambda line: (line.box[1], line.box[0])):
        middle = (line.box[1] + line.box[3]) / 2
        if rows and rows[-1][0].box[1] <= middle <= rows[-1][0].box[3]:
            rows[-1].append(line)
        else:
            rows.append([line])
    return "\n".join(" ".join(line.text for line in sorted(row, key=lambda x: x.box[0]))
                     for row in rows)


@register_worker(ROLE)
class OCRWorker(StageWorker):
    @classmethod
    def check_options(cls, options: WorkerOptions) -> None:
        ocr_settings(options)

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.settings = ocr_settings(options)
        self._engines: list[Any] = []  # the lanes' engines
        self._wide: Any = None  # the lone image's engine, on every thread
        self._pool: ThreadPoolExecutor | None = None
        # Admitted requests (decoded pixels) in arrival order; refusals answered next step.
        self._queued: OrderedDict[str, np.ndarray] = OrderedDict()
        self._refused: list[StageOutput] = []
        self.images_read = 0
        self.lines_found = 0
        self.busy_seconds = 0.0

    def load(self) -> None:
        settings = self.settings
        per_lane = max(1, settings.total_threads // settings.lanes)
        runtime = settings.runtime
        if settings.engine == "auto" and runtime != "openvino":
            logger.warning("OCR runs on onnxruntime: openvino is not installed (it reads "
                           "pages several times faster on the same threads)")
        if settings.nice:
            lower_priority(settings.nice)
        precision = settings.detector_precision
        def engine(threads: int) -> Any:
            return build_engine(
                runtime, threads, settings.use_cls, settings.min_score, precision
            )

        self._wide = engine(settings.total_threads)
        if settings.lanes > 1:
            self._engines = [engine(per_lane) for _ in range(settings.lanes)]
            self._pool = ThreadPoolExecutor(settings.lanes, thread_name_prefix="ocr-lane")
        logger.info("OCR on %s: a lone image on %d thread(s), else up to %d at once on %d "
                    "thread(s) each; detector in %s, nice +%d", runtime,
                    settings.total_threads, settings.lanes, per_lane, precision, settings.nice)
        # rapidocr loads its direction and recognition models at the first line it finds, and
        # the runtimes build kernels for the shapes they see: pay both here, on a line of text.
        sample = warm_up_image()
        for each in (self._wide, *self._engines):
            each(sample)

    def add_request(self, request: WorkerRequest) -> None:
        try:
            if request.request_id in self._queued:
                raise ValueError(f"request {request.request_id!r} is already queued")
            item = CONTRACT.decode_request(request.body).item
            self._queued[request.request_id] = self._pixels(request, item or "the image")
        except (ValueError, MediaError) as exc:
            self._refused.append(StageOutput(request.request_id, finished=True, error=str(exc)))

    def _pixels(self, request: WorkerRequest, item: str) -> np.ndarray:
        """The request's image as RGB uint8 (height, width, 3)."""
        if IMAGE_FILE in request.inputs:
            data = request.inputs[IMAGE_FILE]
            if data.dtype != torch.uint8 or data.dim() != 1:
                raise ValueError(f"{item}: input {IMAGE_FILE!r} must be 1-D uint8 file bytes")
            limits = MediaLimits(max_image_pixels=self.settings.max_pixels)
            image = load_image(data.numpy().tobytes(), name=item, limits=limits)
            return np.asarray(image)
        pixels = request.inputs.get(PIXELS)
        if pixels is None:
            names = sorted(request.inputs)
            raise ValueError(f"an ocr request needs {IMAGE_FILE!r} or {PIXELS!r}; got {names}")
        if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[2] != 3:
            raise ValueError(f"{item}: input {PIXELS!r} must be uint8 (height, width, 3), got "
                             f"{pixels.dtype} {tuple(pixels.shape)}")
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        if height * width > self.settings.max_pixels or height * width == 0:
            raise ValueError(f"{item} is {width}x{height} pixels; the limit is "
                             f"{self.settings.max_pixels} pixels")
        # A copy: the tensor may map a shared-memory segment released after this call.
        return pixels.numpy().copy()

    def step(self) -> list[StageOutput]:
        outputs, self._refused = self._refused, []
        count = min(len(self._queued), self.settings.lanes)
        batch = [self._queued.popitem(last=False) for _ in range(count)]
        if not batch:
            return outputs
        started = time.perf_counter()
        if len(batch) == 1 or self._pool is None:
            results = [self._read(self._wide, batch[0][1])]
        else:
            results = list(self._pool.map(self._read, self._engines, [p for _, p in batch]))
        self.busy_seconds += time.perf_counter() - started
        for (request_id, _), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                error = f"{type(result).__name__}: {result}"
                outputs.append(StageOutput(request_id, finished=True, error=error))
                continue
            self.images_read += 1
            self.lines_found += len(result.lines)
            outputs.append(StageOutput(request_id, reply=result, finished=True))
        return outputs

    @staticmethod
    def _read(engine: Any, pixels: np.ndarray) -> PageText | Exception:
        try:
            found = engine(pixels)
        except Exception as exc:  # one image that breaks the engine fails alone
            logger.exception("OCR failed on a %s image", pixels.shape)
            return exc
        if found.txts is None:
            return PageText(text="")
        lines = []
        for box, text, score in zip(found.boxes, found.txts, found.scores, strict=True):
            xs, ys = box[:, 0], box[:, 1]
            edges = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
            lines.append(TextLine(str(text), min(1.0, max(0.0, float(score))), edges))
        return PageText(text=reading_order(lines), lines=lines)

    def has_work(self) -> bool:
        return bool(self._queued) or bool(self._refused)

    def stats(self) -> OCRStats:
        return OCRStats(
            requests_queued=len(self._queued),
            images_read=self.images_read,
            lines_found=self.lines_found,
            busy_seconds=round(self.busy_seconds, 3),
        )

    def abort(self, request_id: str) -> None:
        self._queued.pop(request_id, None)
        self._refused = [o for o in self._refused if o.request_id != request_id]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
