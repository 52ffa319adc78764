"""The PDF render worker: a child process that renders pages with PDFium for `PdfRenderer`.

PDFium is not thread-safe and is a large C++ parser fed bytes from the network, so it runs in
processes of its own: a crash or a runaway document takes down one worker, not the server.
Workers are plain `python -m omni.media.pdf_worker` subprocesses speaking length-prefixed
msgpack frames over stdin/stdout (multiprocessing's channels pickle what they carry; these
frames hold only bytes, numbers and strings).

Request: {"data": bytes, "dpi": float, "max_pages": int, "max_page_pixels": int,
"text": bool, "max_text_chars": int, "images": "all" | "untexted"}.
Reply: {"pages": [[width, height, rgb bytes, text, problem], ...]}, where `problem` is why
the text layer cannot stand in for the page ("no text layer", "glyph garbage") or "" when it
can; with "images": "untexted" only such pages are rendered (the others' rgb is b"", and their
text is what is wanted). Or {"error": kind, ...} with kind
one of "encrypted", "corrupt", "no_pages", "too_many_pages" (+ "pages"), "page_too_large"
(+ "page", "width", "height"), "out_of_memory". Every limit is checked before any page is
rendered. `$OMNI_PDF_WORKER_MEMORY_MIB` caps the worker's address space: a document that needs
more is answered "out_of_memory" and the worker goes on.
"""

from __future__ import annotations

import math
import os
import resource
import struct
import sys
from typing import IO, Any

import msgpack

from omni.media.text_layer import text_layer_problem

# A frame is its msgpack payload's length (8 bytes, little endian), then the payload.
_LENGTH = struct.Struct("<Q")
# pypdfium2's error codes (FPDF_ERR_*): a password is needed, or the security handler is
# one PDFium does not support. Either way the document cannot be read without a password.
_PASSWORD_ERRORS = (4, 5)
MEMORY_CAP_ENV = "OMNI_PDF_WORKER_MEMORY_MIB"


def write_frame(stream: IO[bytes], message: dict[str, Any]) -> None:
    payload = msgpack.packb(message, use_bin_type=True)
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def read_frame(stream: IO[bytes], max_bytes: int) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream; EOFError if cut off mid-frame."""
    header = _read_exactly(stream, _LENGTH.size, allow_eof=True)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > max_bytes:
        raise ValueError(f"a frame of {length} bytes exceeds the limit of {max_bytes}")
    payload = _read_exactly(stream, length, allow_eof=False)
    assert payload is not None
    message = msgpack.unpackb(payload, raw=False)
    if not isinstance(message, dict):
        raise ValueError(f"a frame holds a {type(message).__name__}, not a map")
    return message


def _read_exactly(stream: IO[bytes], size: int, *, allow_eof: bool) -> bytes | None:
    chunks = []
    remaining = size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            if allow_eof and remaining == size:
                return None
            raise EOFError(f"stream ended {remaining} bytes short of a {size}-byte read")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def page_pixels(width_pt: float, height_pt: float, rotation: int, dpi: float) -> tuple[int, int]:
    """(width, height) in pixels of a page rendered at `dpi`: pypdfium2's own rounding."""
    scale = dpi / 72.0
    width, height = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
    return (height, width) if rotation in (90, 270) else (width, height)


def render_document(request: dict[str, Any]) -> dict[str, Any]:
    """Render one document as the module docstring describes."""
    import numpy as np
    import pypdfium2 as pdfium

    dpi = float(request["dpi"])
    try:
        document = pdfium.PdfDocument(bytes(request["data"]))
    except pdfium.PdfiumError as error:
        if getattr(error, "err_code", None) in _PASSWORD_ERRORS:
            return {"error": "encrypted"}
        return {"error": "corrupt"}
    try:
        count = len(document)
        if count == 0:
            return {"error": "no_pages"}
        if count > int(request["max_pages"]):
            return {"error": "too_many_pages", "pages": count}
        pages = [document[index] for index in range(count)]
        sizes = []
        for page in pages:
            width_pt, height_pt = page.get_size()
            sizes.append(page_pixels(width_pt, height_pt, page.get_rotation(), dpi))
        for index, (width, height) in enumerate(sizes):
            if width * height > int(request["max_page_pixels"]) or min(width, height) < 1:
                return {"error": "page_too_large", "page": index, "width": width, "height": height}
        rendered = []
        every_image = request.get("images", "all") == "all"
        for page, (width, height) in zip(pages, sizes, strict=True):
            wants_text = request["text"] or not every_image
            text = _page_text(page, int(request["max_text_chars"])) if wants_text else ""
            problem = text_layer_problem(text) or ""
            rgb = b""
            if every_image or problem:
                # rev_byteorder: RGB rather than PDFium's native BGR; forms are not drawn (no
                # form environment is set up, so widgets would not run anyway).
                bitmap = page.render(scale=dpi / 72.0, rev_byteorder=True, may_draw_forms=False)
                pixels = np.ascontiguousarray(bitmap.to_numpy()[:, :, :3])
                if pixels.shape != (height, width, 3):
                    return {"error": "corrupt"}
                rgb = pixels.tobytes()
            rendered.append([width, height, rgb, text, problem])
        return {"pages": rendered}
    except pdfium.PdfiumError:
        return {"error": "corrupt"}
    finally:
        document.close()


def _page_text(page: Any, max_chars: int) -> str:
    text_page = page.get_textpage()
    try:
        text = text_page.get_text_range()
    finally:
        text_page.close()
    # PDFium ends lines with \r\n; a page's text goes into a prompt, where \n is the norm.
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    return str(text[:max_chars])


def main() -> int:
    # The replies go out on a private copy of stdout; fd 1 then points at stderr, so that a
    # stray print (or C library message) can never corrupt the frame stream.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    cap_mib = os.environ.get(MEMORY_CAP_ENV)
    if cap_mib:
        cap = int(cap_mib) << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    requests = sys.stdin.buffer
    while True:
        request = read_frame(requests, max_bytes=1 << 40)
        if request is None:  # the server closed our stdin: shut down
            return 0
        try:
            # write_frame packs the whole reply before it writes a byte, so a reply too large
            # to pack fails here too and never leaves half a frame on the stream.
            write_frame(replies, render_document(request))
        except MemoryError:
            write_frame(replies, {"error": "out_of_memory"})


if __name__ == "__main__":
    sys.exit(main())
