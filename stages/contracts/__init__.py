"""Stage contracts: for each role, its name and the typed structs of its requests, replies and
heartbeat stats. The orchestrator and the stage both import a role's contract module
(`omni.stages.contracts.llm`, `.vision`, `.audio`, `.image`, `.speech`, `.asr`); neither imports
the other's implementation.

On the wire a struct is msgpack bytes in the transport's `body` / `stats` fields, beside the
request's named tensors; `Contract` encodes and decodes them strictly (a wrong or missing
field is a ValueError naming it, before any stage code sees the value). Nothing in a contract
is `Any`.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

Request = TypeVar("Request")
Reply = TypeVar("Reply")
Stats = TypeVar("Stats")
T = TypeVar("T")


class Empty(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A request or reply with nothing to say beyond its tensors."""


class Contract(Generic[Request, Reply, Stats]):
    """One role's three message types and their strict msgpack codecs."""

    def __init__(
        self, role: str, request: type[Request], reply: type[Reply], stats: type[Stats]
    ) -> None:
        self.role = role
        self.request_type = request
        self.reply_type = reply
        self.stats_type = stats
        self._encoder = msgspec.msgpack.Encoder()
        self._requests = msgspec.msgpack.Decoder(request)
        self._replies = msgspec.msgpack.Decoder(reply)
        self._stats = msgspec.msgpack.Decoder(stats)

    def encode(self, message: Request | Reply | Stats) -> bytes:
        return self._encoder.encode(message)

    def decode_request(self, body: bytes | memoryview) -> Request:
        return self._decode(self._requests, body, "request")

    def decode_reply(self, body: bytes | memoryview) -> Reply:
        return self._decode(self._replies, body, "reply")

    def decode_stats(self, body: bytes | memoryview) -> Stats:
        return self._decode(self._stats, body, "stats")

    def _decode(
        self, decoder: msgspec.msgpack.Decoder[T], body: bytes | memoryview, what: str
    ) -> T:
        try:
            return decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"bad {self.role} {what}: {exc}") from None
