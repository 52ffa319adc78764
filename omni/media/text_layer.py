"""Whether a PDF page's text layer can stand in for the page, or the page must be read by OCR.

A scan has no text layer, or only a page number. Some PDFs carry a layer that is there but
wrong: fonts without a usable ToUnicode map come out as private-use code points, U+FFFD, control
characters or dingbats, or as letters of the wrong glyphs ("Gsvl Gvwt"). Such a layer is
"glyph garbage": as text for a model it is worse than nothing, so the page is read by OCR
instead. The checks are cheap and on the text alone (docling and marker decide the same way,
from the share of unreadable characters).
"""

from __future__ import annotations

import re
import unicodedata

# Fewer letters and digits than this is no text layer (a page number, a stray mark).
MIN_ALNUM = 16
# More than this share of the visible characters unreadable is glyph garbage.
MAX_UNREADABLE_SHARE = 0.1
# Words of four or more Latin letters with no vowel: text extracted through the wrong glyph map
# has them everywhere; English, German or French text almost never ("rhythm", "strength").
MAX_VOWELLESS_SHARE = 0.5
MIN_WORDS_FOR_VOWEL_CHECK = 4

_UNREADABLE_CATEGORIES = {"Co", "Cn", "Cs", "Cc", "So"}
_WORD = re.compile(r"[A-Za-z]{4,}")
_VOWELS = set("aeiouyAEIOUY")


def text_layer_problem(text: str) -> str | None:
    """None if `text` reads as a page's real text; else why not ("no text layer",
    "glyph garbage")."""
    visible = [c for c in text if not c.isspace()]
    unreadable = sum(
        1 for c in visible
        if c == "\ufffd" or unicodedata.category(c) in _UNREADABLE_CATEGORIES
    )  # fmt: skip
    if len(visible) >= MIN_ALNUM and unreadable > MAX_UNREADABLE_SHARE * len(visible):
        return "glyph garbage"
    if sum(c.isalnum() for c in visible) < MIN_ALNUM:
        return "no text layer"
    words = _WORD.findall(text)
    if len(words) >= MIN_WORDS_FOR_VOWEL_CHECK:
        vowelless = sum(1 for word in words if not _VOWELS & set(word))
        if vowelless > MAX_VOWELLESS_SHARE * len(words):
            return "glyph garbage"
    return None
