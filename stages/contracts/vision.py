"""The vision stage (role "vision"): images in, embeddings out (Qwen2-VL / Qwen2.5-VL tower).

A request is one of two forms:

* `EncodeImage` with the tensor `IMAGE`: one image as the client sent it (its encoded bytes,
  uint8 `[n]`) or as rendered pixels (uint8 `[height, width, 3]`, a PDF page). The stage
  decodes, checks and preprocesses it with the checkpoint's image processor, and refuses it when
  the patch grid differs from `grid_thw` (which fixed the prompt's placeholder run).
* an empty body with `PIXEL_VALUES` `[patches, C*T*P*P]` and `IMAGE_GRID_THW` int `[n, 3]`:
  images already preprocessed (the offline engine and benchmarks).

The reply is `encoder.EncodeReply` with the tensor `encoder.EMBEDDINGS`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from omni.stages.contracts import Contract
from omni.stages.contracts.encoder import EncodeReply, EncoderStats

ROLE = "vision"
IMAGE = "image"
PIXEL_VALUES = "pixel_values"
IMAGE_GRID_THW = "image_grid_thw"

Side = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class EncodeImage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The request item it came from ("messages[0].content[1]"), named in every refusal.
    item: Annotated[str, msgspec.Meta(max_length=256)] = ""
    # "encoded": IMAGE holds a PNG/JPEG/... file; "rgb": IMAGE holds [height, width, 3] pixels.
    source: Literal["encoded", "rgb"] = "encoded"
    # The size its header declared (checked against the decoded image).
    width: Side = 1
    height: Side = 1
    # The patch grid the prompt's placeholders were sized for; empty: no check (offline).
    grid_thw: Annotated[list[int], msgspec.Meta(max_length=3)] = []
    # The most pixels the stage may decode for it (the server's limit, checked again here).
    max_pixels: Annotated[int, msgspec.Meta(ge=1)] = 2**31


CONTRACT: Contract[EncodeImage, EncodeReply, EncoderStats] = Contract(
    ROLE, EncodeImage, EncodeReply, EncoderStats
)
