"""A stage's `--option key=value` texts as typed values: the one parser every stage uses.

Options are the fields of a stage's settings dataclass (the LLM stage's `EngineConfig`, the
image stage's `ImageStageSettings`, ...), so a field's declared type says how its text parses:
`int`, `float`, `str`, `bool` ("true" / "false", or "1" / "0"), or any of them `| None`
("none" or "null" for None; "auto" too for `bool | None`, meaning "let the stage decide").
A text that does not parse is a ValueError naming the option and what it must be.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

_TRUE = ("true", "1")
_FALSE = ("false", "0")


def parse_option(key: str, text: str, kind: Any) -> Any:
    """`text` as a value of `kind` (a field's resolved type)."""
    lowered = text.lower()
    base = kind
    args = typing.get_args(kind)
    if type(None) in args and (typing.get_origin(kind) in (typing.Union, types.UnionType)):
        base = next(arg for arg in args if arg is not type(None))
        if lowered in ("none", "null") or (base is bool and lowered == "auto"):
            return None
    if base is bool:
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        choices = "true, false, auto" if base is not kind else "true, false"
        raise ValueError(f"option {key} must be {choices}, got {text!r}")
    if base is int or base is float:
        try:
            return base(text)
        except ValueError:
            what = "an integer" if base is int else "a number"
            raise ValueError(f"option {key} must be {what}, got {text!r}") from None
    if base is str:
        return text
    raise TypeError(f"option {key} has type {kind!r}, which --option cannot set")


def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their resolved types (annotations may be strings)."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def parse_options(
    extra: Mapping[str, str], fields: Mapping[str, Any], stage: str
) -> dict[str, Any]:
    """Every option of `extra`, each a key of `fields` (name -> type), parsed; an unknown key
    is a ValueError that lists the known ones."""
    parsed = {}
    for key, text in extra.items():
        if key not in fields:
            raise ValueError(f"unknown {stage} stage option {key!r}; known: {sorted(fields)}")
        parsed[key] = parse_option(key, text, fields[key])
    return parsed
