"""rapidocr engines for the OCR stage: PP-OCR's networks on OpenVINO or onnxruntime, with a
bounded thread count, reading exactly what plain `rapidocr.RapidOCR()` reads.

Both runtimes run the very ONNX files inside the `rapidocr` wheel that `RapidOCR()` runs by
default (resolved through rapidocr's own model list, so a rapidocr release that changes its
defaults changes them here too), through rapidocr's own pre- and post-processing.

OpenVINO is the default: on this project's Xeon CPUs (AVX-512) its convolutions run PP-OCR's
detector, which is most of the work on a page, three to four times faster than onnxruntime on
the same thread count (docs/benchmarks.md). Two of its CPU plugin's defaults are changed:
- precision: on CPUs with bf16 units (AMX, AVX512-BF16) it computes in bf16 unless told
  otherwise, which moves the detector's probabilities by up to 0.2 and the recognizer's
  scores; in f32 the boxes, texts and scores equal onnxruntime's (tests/test_ocr_stage.py).
  The stage chooses per network: the detector in `detector_precision` (bf16 reads a page about
  1.8 times faster on an AMD EPYC with AVX512-BF16, and its boxes move by a pixel or two),
  the direction classifier and the recognizer always in f32, so a line's text is read from
  f32 arithmetic either way.
- pinning: it would pin its threads to cores, but the stage shares the machine's cores with
  the LLM stage and other processes: the OS should be free to move a thread to an idle core.

Two of rapidocr's steps are made faster without changing what they compute: the detector's
input is looked up per pixel value instead of computed through float64 (`ocr_preprocess`,
bit for bit), and on OpenVINO a detector input shape met again runs on a model compiled for
it (`ocr_static_shapes`).

rapidocr builds both runtimes' settings inside its session classes and takes no extra
entries, so the two functions below wrap those builders once per process; should a rapidocr
release move them, the sessions keep the runtime's defaults.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from omni.stages.contracts.ocr import ENGINES, PRECISIONS
from omni.stages.encoders.ocr_preprocess import use_table_lookup
from omni.stages.encoders.ocr_static_shapes import ShapeSpecialized

TASKS = ("Det", "Cls", "Rec")


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_computes_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 on this CPU (AMX or AVX512-BF16)."""
    if not openvino_available():
        return False
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities


def wheel_models() -> dict[str, Path]:
    """The ONNX files plain `RapidOCR()` runs, by task (its Det, Cls and Rec sections)."""
    from rapidocr import RapidOCR
    from rapidocr.inference_engine.base import FileInfo, InferSession

    cfg = RapidOCR(params={"Global.log_level": "error"}).cfg  # reads its config, loads nothing
    models = {}
    for task in TASKS:
        section = cfg[task]
        info = InferSession.get_model_url(FileInfo(
            engine_type=section.engine_type, ocr_version=section.ocr_version,
            task_type=section.task_type, lang_type=section.lang_type,
            model_type=section.model_type))
        models[task] = Path(cfg.Global.model_root_dir) / Path(info["model_dir"]).name
    return models


def build_engine(
    engine: str, threads: int, use_cls: bool, min_score: float, detector_precision: str = "f32"
) -> Any:
    """A `RapidOCR` on `engine` ("openvino" or "onnxruntime") with `threads` threads, its
    detector computing in `detector_precision` ("f32", or "bf16" on OpenVINO)."""
    from rapidocr import EngineType, RapidOCR

    if detector_precision not in PRECISIONS:
        raise ValueError(
            f"detector precision is {detector_precision!r}; it must be one of "
            f"{', '.join(PRECISIONS)}"
        )
    if detector_precision != "f32" and engine != "openvino":
        raise ValueError(f"a {detector_precision} detector needs OpenVINO, not {engine}")

    params: dict[str, Any] = {
        "Global.log_level": "error",
        "Global.use_cls": use_cls,
        "Global.text_score": min_score,
    }
    if engine == "onnxruntime":
        _no_spinning_onnxruntime()
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
    elif engine == "openvino":
        _configure_openvino_sessions()
        params["EngineConfig.openvino.inference_num_threads"] = threads
        # One stream: the stage's lanes, not OpenVINO, run images side by side.
        params["EngineConfig.openvino.performance_hint"] = "LATENCY"
        for task, path in wheel_models().items():
            params[f"{task}.engine_type"] = EngineType.OPENVINO
            params[f"{task}.model_path"] = str(path)
    else:
        raise ValueError(f"engine is {engine!r}; it must be one of {', '.join(ENGINES)}")
    use_table_lookup()
    ocr = RapidOCR(params=params)
    return _LazySessions(ocr, detector_precision) if engine == "openvino" else ocr


# What the OpenVINO session being built on this thread is: its network ("det", "cls", "rec")
# and the precision its engine's detector asks for.
_building = threading.local()


class _LazySessions:
    """A RapidOCR whose networks are loaded on first use (rapidocr's way) with this engine's
    detector precision in force while they load."""

    def __init__(self, ocr: Any, detector_precision: str) -> None:
        self._ocr = ocr
        self._precision = detector_precision

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _building.detector_precision = self._precision
        try:
            return self._ocr(*args, **kwargs)
        finally:
            _building.detector_precision = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ocr, name)


def _no_spinning_onnxruntime() -> None:
    """Make rapidocr's onnxruntime sessions park idle threads instead of spinning on them
    (onnxruntime's default, which would take the LLM stage's cores while the stage waits)."""
    try:
        from rapidocr.inference_engine.onnxruntime.main import OrtInferSession
    except ImportError:
        return
    original = OrtInferSession.__dict__.get("_init_sess_opts")
    if not isinstance(original, staticmethod) or getattr(original, "_omni", False):
        return

    def options(cfg: Any) -> Any:
        sess_opt = original.__func__(cfg)
        sess_opt.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess_opt.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return sess_opt

    wrapped = staticmethod(options)
    wrapped._omni = True  # type: ignore[attr-defined]
    OrtInferSession._init_sess_opts = wrapped  # type: ignore[method-assign]


def _configure_openvino_sessions() -> None:
    """Make rapidocr's OpenVINO sessions compute in f32 (the detector in its engine's
    precision), leave thread placement to the OS (see the module's docstring; OpenVINO's idle
    threads already sleep), and run the detector's repeated input shapes on static
    compilations (`ocr_static_shapes`)."""
    try:
        from rapidocr.inference_engine.openvino.device_config import CPUConfig
    except ImportError:
        return
    original = CPUConfig.__dict__.get("get_config")
    if original is None or getattr(original, "_omni", False):
        return

    def get_config(self: Any) -> dict[str, Any]:
        config = dict(original(self))
        precision = "f32"
        if getattr(_building, "task", None) == "det":
            precision = getattr(_building, "detector_precision", None) or "f32"
        config.setdefault("INFERENCE_PRECISION_HINT", precision)
        config.setdefault("ENABLE_CPU_PINNING", "NO")
        return config

    get_config._omni = True  # type: ignore[attr-defined]
    CPUConfig.get_config = get_config  # type: ignore[method-assign]

    # The session being built says which network it is; get_config above reads it.
    from rapidocr.inference_engine.openvino.main import OpenVINOInferSession

    init = OpenVINOInferSession.__init__

    def init_with_task(self: Any, cfg: Any) -> None:
        _building.task = str(cfg.get("task_type", "")).rsplit(".", 1)[-1].lower()
        try:
            init(self, cfg)
            if _building.task == "det":
                config = CPUConfig(cfg.get("engine_cfg", {})).get_config()
                source = str(cfg.get("model_path"))
                self.session = ShapeSpecialized(self.model, source, config, self.session)
        finally:
            _building.task = None

    OpenVINOInferSession.__init__ = init_with_task  # type: ignore[method-assign]
