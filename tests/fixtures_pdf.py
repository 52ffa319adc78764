"""Hand-written PDFs for the tests: byte-for-byte the same on every run.

`minimal_pdf` writes each page as a filled rectangle (inset 10 points) in a given colour and,
optionally, one line of Helvetica text; `encrypted_pdf` adds a standard security handler whose
user password is not empty, so a reader cannot open it without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Page:
    width: int  # points
    height: int
    rgb: tuple[float, float, float] = (1.0, 0.0, 0.0)
    text: str = ""  # ASCII without parentheses or backslashes


def minimal_pdf(
    pages: list[Page], trailer_extra: str = "", extra_objects: str = "", font_extra: str = ""
) -> bytes:
    kids = [4 + 2 * i for i in range(len(pages))]
    objects = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>",
        3: f"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica{font_extra} >>",
    }
    for page, number in zip(pages, kids, strict=True):
        r, g, b = page.rgb
        content = f"{r:g} {g:g} {b:g} rg 10 10 {page.width - 20} {page.height - 20} re f"
        if page.text:
            content += f"\n0 0 0 rg BT /F1 10 Tf 12 {page.height - 24} Td ({page.text}) Tj ET"
        objects[number] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {page.width} {page.height}] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {number + 1} 0 R >>"
        )
        objects[number + 1] = f"<< /Length {len(content)} >>\nstream\n{content}\nendstream"
    if extra_objects:
        objects[len(objects) + 1] = extra_objects
    out = "%PDF-1.4\n"
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += f"{number} 0 obj\n{objects[number]}\nendobj\n"
    xref = len(out)
    size = len(objects) + 1
    out += f"xref\n0 {size}\n0000000000 65535 f \n"
    out += "".join(f"{offsets[n]:010d} 00000 n \n" for n in range(1, size))
    out += f"trailer\n<< /Size {size} /Root 1 0 R{trailer_extra} >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("ascii")


def encrypted_pdf(pages: list[Page]) -> bytes:
    """RC4 40-bit standard security (revision 2) with /O and /U that no empty password fits."""
    number = 4 + 2 * len(pages)
    handler = f"<< /Filter /Standard /V 1 /R 2 /O <{'11' * 32}> /U <{'22' * 32}> /P -4 >>"
    trailer = f" /Encrypt {number} 0 R /ID [<{'33' * 16}> <{'33' * 16}>]"
    return minimal_pdf(pages, trailer_extra=trailer, extra_objects=handler)


# A ToUnicode map sending every printable character code to the private-use area: the page
# still shows Helvetica's letters, but its text layer reads as glyph garbage.
_PRIVATE_USE_CMAP = """/CIDInit /ProcSet findresource begin
12 dict begin
begincmap
/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def
/CMapName /Adobe-Identity-UCS def
/CMapType 2 def
1 begincodespacerange
<00> <FF>
endcodespacerange
1 beginbfrange
<20> <7E> <E020>
endbfrange
endcmap
CMapName currentdict /CMap defineresource pop
end
end"""


def garbled_text_layer_pdf(page: Page) -> bytes:
    """One page whose text layer maps its characters to private-use code points."""
    number = 6  # after the catalog, the page tree, the font, the page and its contents
    stream = f"<< /Length {len(_PRIVATE_USE_CMAP)} >>\nstream\n{_PRIVATE_USE_CMAP}\nendstream"
    return minimal_pdf([page], extra_objects=stream, font_extra=f" /ToUnicode {number} 0 R")


def page_count(data: bytes) -> int:
    return len(re.findall(rb"/Type /Page\b(?!s)", data))
