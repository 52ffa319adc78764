"""Server-sent events in OpenAI's streaming format: `data: JSON` blocks, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


def event(payload: dict[str, Any]) -> bytes:
    # Compact JSON, and never a raw newline inside one event (json.dumps escapes them).
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
