"""What every encoder role (vision, audio) answers: its items' embeddings, and its load.

An encoder's reply to one request carries the tensor `EMBEDDINGS`, `[rows, hidden]`: the
request's items' rows concatenated in order, one row per placeholder token.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

EMBEDDINGS = "embeddings"

Count = Annotated[int, msgspec.Meta(ge=0)]


class EncodeReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Rows of EMBEDDINGS: the placeholder tokens the items fill.
    num_tokens: Count


class EncoderStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Requests waiting for a forward pass, requests encoded, and the forwards that did it
    # (requests_encoded / forwards is the batch size the stage achieves).
    requests_queued: Count = 0
    requests_encoded: Count = 0
    forwards: Count = 0
