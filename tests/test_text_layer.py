"""Which PDF text layers can stand in for their page, and which send it to OCR."""

from __future__ import annotations

import pytest

from omni.media.text_layer import text_layer_problem


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Invoice number 4711, total 35 EUR", None),
        ("The rhythm of strength lies in this sentence here", None),
        ("Zahlung bis 31.12.2026 an Müller & Söhne GmbH", None),
        ("Σ 12,50 € + 3,10 € = 15,60 €  (Summe der Positionen)", None),
        ("", "no text layer"),
        ("  7  \n", "no text layer"),
        ("Page 12 of 40", "no text layer"),
        # Private-use code points: a font whose ToUnicode map is wrong.
        ("\ue049\ue06e\ue076\ue06f\ue069\ue063\ue065 \ue06e\ue075\ue06d\ue062\ue065\ue072 "
         "\ue034\ue037\ue031\ue031", "glyph garbage"),
        ("Total \ufffd\ufffd\ufffd\ufffd \ufffd\ufffd\ufffd amount 1234567", "glyph garbage"),
        # The right code points through the wrong glyph map: words without vowels.
        ("Gsvl Gvwt xlmgizxg nfhg yv hrtmvw gszg", "glyph garbage"),
    ],
)
def test_text_layer_problem(text: str, problem: str | None) -> None:
    assert text_layer_problem(text) == problem
