"""The OCR detector on OpenVINO models compiled for the exact input shapes it meets again.

The detector's input is the page at its own size (rounded to multiples of 32), so the pages of
one document, rendered at one resolution, share a shape. OpenVINO's CPU plugin runs a
static-shape compilation of PP-OCR's detector about 15% faster than the dynamic-shape one
(bf16, one thread, 864x1088: 165 against 195 ms on an AMD EPYC; f32 outputs differ by 6e-8,
bf16 ones by 1e-3 in a probability). Compiling one costs about 0.2 s, so a shape is compiled
at its second use in this process (by any engine): one-off image sizes never pay it. Each
session compiles its own: a compiled model runs one request at a time on its thread budget,
so the OCR stage's lanes, which read side by side, cannot share one. At most MAX_SHAPES
compilations per session stay, the most recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

MAX_SHAPES = 4

Shape = tuple[int, ...]

# Shapes some session of this process has run, by model file.
_seen: dict[str, set[Shape]] = {}
_seen_lock = threading.Lock()


def seen_before(source: str, shape: Shape) -> bool:
    """Whether `shape` ran before on the model in `source`; records that it runs now."""
    with _seen_lock:
        shapes = _seen.setdefault(source, set())
        before = shape in shapes
        shapes.add(shape)
        return before


class ShapeSpecialized:
    """Stands in for rapidocr's OpenVINO infer request (`infer`, `get_output_tensor`): runs
    each input on this session's compilation for its shape, when it is seen again, else on
    the dynamic-shape request."""

    def __init__(self, model: Any, source: str, config: dict[str, Any], dynamic: Any) -> None:
        self.model = model
        self.source = source
        self.config = config
        self.dynamic = dynamic
        self.static: OrderedDict[Shape, Any] = OrderedDict()  # requests, last used last
        self.last = dynamic

    def request_for(self, shape: Shape) -> Any:
        request = self.static.get(shape)
        if request is not None:
            self.static.move_to_end(shape)
            return request
        if not seen_before(self.source, shape):
            return self.dynamic
        import openvino

        specialised = self.model.clone()
        specialised.reshape({0: list(shape)})
        compiled = openvino.Core().compile_model(specialised, "CPU", self.config)
        request = self.static[shape] = compiled.create_infer_request()
        while len(self.static) > MAX_SHAPES:
            self.static.popitem(last=False)
        return request

    def infer(self, inputs: list[Any]) -> Any:
        self.last = self.request_for(tuple(inputs[0].shape))
        return self.last.infer(inputs=inputs)

    def get_output_tensor(self, index: int = 0) -> Any:
        return self.last.get_output_tensor(index)
