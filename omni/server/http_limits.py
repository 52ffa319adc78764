"""HTTP/1.1 connection limits uvicorn lacks: the size of a request's headers, and the time a
client may take to send them.

uvicorn's httptools protocol buffers headers without bound and has no timer until a request's
headers are complete, so one client sending a 400 MB header, or 200 clients sending a byte a
second (slow loris), hold memory and connections for as long as they like. nginx answers both
with `large_client_header_buffers` (8 KiB lines, 32 KiB in all) and `client_header_timeout`
(60 s, then 408); `BoundedHttpToolsProtocol` does the same with `HttpLimits`:

* more than `max_header_bytes` received before the headers end: 431 and close;
* no complete request head within `header_timeout_s` of the connection opening or of the
  request's first byte (an idle keep-alive connection is uvicorn's `timeout_keep_alive`): 408
  and close.

Both are checked on the event loop as bytes arrive, so the cost of a hostile client is one
read buffer, and /health keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from omni.server.protocol import error_body

# nginx's 32 KiB of header buffers doubled: long bearer tokens and cookies fit, a flood does not.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_HEADER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes is {self.max_header_bytes}; it must be >= 1024")
        if not self.header_timeout_s > 0:
            raise ValueError(f"header_timeout_s is {self.header_timeout_s}; it must be > 0")


def bounded_http_protocol(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """uvicorn's `http=` protocol class enforcing `limits`."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `HttpLimits` (see the module docstring)."""

    limits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes of the current request head so far; None once its headers are complete.
        self._head_bytes: int | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        head = self._head_bytes
        if head is not None and head > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"request headers are over {head - len(data)} bytes and not finished; "
                f"the limit is {limit} bytes (--max-header-bytes)",
            )

    def on_message_begin(self) -> None:
        if self._head_bytes is None:  # the next request on a kept-alive connection
            self._await_head()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._head_bytes = None
        super().on_headers_complete()

    def _await_head(self) -> None:
        self._head_bytes = 0
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None:
            seconds = self.limits.header_timeout_s
            self._refuse(
                408,
                "Request Timeout",
                f"no complete request head within {seconds:g} s (--header-timeout)",
            )

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer `status` with OpenAI's error JSON and close, as nginx does."""
        self._stop_head_timer()
        self._head_bytes = None
        if self.transport.is_closing():
            return
        body = json.dumps(error_body(message, "invalid_request_error")).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()
