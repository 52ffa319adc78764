"""The OCR stage (role "ocr"): an image in, the text written in it out.

A request carries one of two tensors: `IMAGE_FILE`, the bytes of an image file as the client
sent it (PNG, JPEG, WebP, GIF, BMP; the stage decodes it), or `PIXELS`, an RGB image as uint8
(height, width, 3) (a rendered PDF page). Its body is `ReadRequest`. The one reply, finished, is
`PageText`: the lines found, in reading order, and the text they make (rows joined by
newlines, "" when the image holds no text). An image that does not decode, or is past the
stage's pixel limit, is refused with an error naming the item.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from omni.stages.contracts import Contract

ROLE = "ocr"
IMAGE_FILE = "image_file"
PIXELS = "pixels"
# The runtimes the stage can run PP-OCR on (its `engine` option; "auto" picks the first one
# installed).
ENGINES = ("openvino", "onnxruntime")
# The detector's arithmetic on OpenVINO (its `precision` option; "auto" picks bf16 where the
# CPU computes bf16 natively).
PRECISIONS = ("f32", "bf16")

Count = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


class ReadRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The request item the image came from ("messages[0].content[1]"), named in a refusal.
    item: Annotated[str, msgspec.Meta(max_length=256)] = ""


class TextLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str
    # The recognizer's confidence, 0 to 1.
    score: Annotated[float, msgspec.Meta(ge=0, le=1)]
    # The line's bounding box in pixels: left, top, right, bottom.
    box: Annotated[list[int], msgspec.Meta(min_length=4, max_length=4)]


class PageText(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str
    lines: list[TextLine] = []


class OCRStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Requests waiting, images read, text lines found, and seconds spent reading (images_read
    # / busy_seconds is the replica's pages per second).
    requests_queued: Count = 0
    images_read: Count = 0
    lines_found: Count = 0
    busy_seconds: Seconds = 0.0


CONTRACT: Contract[ReadRequest, PageText, OCRStats] = Contract(
    ROLE, ReadRequest, PageText, OCRStats
)
