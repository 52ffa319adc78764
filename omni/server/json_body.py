"""A JSON request body parsed, or refused with a 400 naming what is wrong with it.

Two things `json.loads` accepts would fail later, as a 500, far from the body:

* nesting: a body of 100,000 opening brackets exhausts the parser's recursion (RecursionError),
  and one just under Python's limit would exhaust whatever walks it next. Bodies deeper than
  `MAX_DEPTH` are refused; OpenAI requests are a few levels deep (a tool's JSON schema, the
  deepest part, rarely passes 20).
* lone surrogates: JSON may escape half of a UTF-16 pair (`"\\ud800"`), which Python keeps as a
  str that cannot be encoded as UTF-8, so the tokenizer fails on it. Such a string is refused
  by its place in the body (`messages[0].content`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from omni.server.protocol import APIError

MAX_DEPTH = 100
# A \u escape of a UTF-16 surrogate (D800-DFFF). Raw UTF-8 bytes cannot hold one (the decoder
# refuses them), so a body without this pattern needs no walk for lone surrogates.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_body(body: bytes) -> Any:
    """`body` parsed, or the APIError (400) that names why it cannot be served."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    _check_tree(payload, surrogates=_SURROGATE_ESCAPE.search(body) is not None)
    return payload


def _check_tree(payload: Any, *, surrogates: bool) -> None:
    """Walk the parsed body without recursion: refuse it past `MAX_DEPTH`, and (when the body
    escapes surrogates) refuse a string that is not valid Unicode."""
    stack: list[tuple[Any, str, int]] = [(payload, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for key, item in value.items():
                if surrogates:
                    _check_text(key, f"{where}.{key!r}" if where else repr(key), "a key")
                stack.append((item, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif surrogates and isinstance(value, str):
            _check_text(value, where or "body", "a string")


def _check_text(text: str, where: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        position = exc.start
        raise APIError(
            400,
            f"{where} is {what} with a lone UTF-16 surrogate "
            f"(\\u{ord(text[position]):04x} at character {position}); JSON text must be "
            "valid Unicode",
            param=where,
        ) from None


def _too_deep() -> APIError:
    return APIError(
        400, f"request body is nested more than {MAX_DEPTH} levels deep; the limit is {MAX_DEPTH}"
    )
