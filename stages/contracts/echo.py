"""The test stage (role "echo", `omni.stages.runtime.testing`): for every input tensor `x`
it answers the tensor `x * 2 + 1` in its own dtype, in `EchoParams.chunks` replies, each an
`EchoReply` naming its chunk and the replica's device and model.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from omni.stages.contracts import Contract

ROLE = "echo"

Count = Annotated[int, msgspec.Meta(ge=0)]


class EchoParams(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    chunks: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    # Slept before each reply, so a test can catch a request in flight.
    delay_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0
    # Raise instead of replying (at the first chunk).
    fail: bool = False
    # Block the worker's step for good (a wedged worker whose I/O thread still heartbeats).
    hang: bool = False


class EchoReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    chunk: Count
    device: str
    model: str


class EchoStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    requests_active: Count = 0
    replies: Count = 0


CONTRACT: Contract[EchoParams, EchoReply, EchoStats] = Contract(
    ROLE, EchoParams, EchoReply, EchoStats
)
