"""The one `--option` parser every stage uses: a settings field's type says how its text
parses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from omni.stages.runtime.options import field_types, parse_option, parse_options


@dataclass(frozen=True)
class _Settings:
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    maybe: bool | None = None
    limit: int | None = None


def test_each_type_parses_its_text() -> None:
    kinds = field_types(_Settings)
    assert kinds == {"count": int, "rate": float, "name": str, "flag": bool,
                     "maybe": bool | None, "limit": int | None}
    assert parse_options(
        {"count": "3", "rate": "1e-3", "name": "none", "flag": "1", "maybe": "auto",
         "limit": "null"}, kinds, "test",
    ) == {"count": 3, "rate": 0.001, "name": "none", "flag": True, "maybe": None, "limit": None}
    assert parse_option("flag", "FALSE", bool) is False
    assert parse_option("maybe", "true", bool | None) is True
    assert parse_option("limit", "7", int | None) == 7


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("count", "many", "option count must be an integer, got 'many'"),
        ("count", "none", "option count must be an integer, got 'none'"),
        ("rate", "fast", "option rate must be a number, got 'fast'"),
        ("flag", "yes", "option flag must be true, false, got 'yes'"),
        ("flag", "auto", "option flag must be true, false, got 'auto'"),
        ("maybe", "yes", "option maybe must be true, false, auto, got 'yes'"),
        ("other", "1", "unknown test stage option 'other'; known: ['count', 'flag', 'limit', "
                       "'maybe', 'name', 'rate']"),
    ],
)
def test_bad_texts_are_named(key: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_options({key: text}, field_types(_Settings), "test")
    assert str(raised.value) == message
