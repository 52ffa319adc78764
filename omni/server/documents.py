"""OpenAI `file` content parts (PDFs) to the image and text items of a chat message.

`{"type": "file", "file": {"file_data": "data:application/pdf;base64,...", "filename":
"report.pdf"}}` is OpenAI's shape. Each page of the document becomes one image item, in page
order, followed by its text layer (`Page 2 text: ...`) where the page has one and the server
passes text layers on; a vision-language model then reads the page both ways.

Rendering runs in `PdfRenderer`'s worker processes. `render_async` does it on a thread, so
the event loop keeps serving other requests while a document renders; the pages stay on the
part (a private attribute no client can set) for the (synchronous) prompt building.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from omni.media import MediaError, decode_base64
from omni.media.data_url import split_data_url
from omni.media.pdf import PdfPage, PdfRenderer
from omni.server.protocol import APIError, ChatMessage, TextContentPart

# Media types a client may declare for a PDF in a data: URL (the bytes decide anyway).
_PDF_MEDIA_TYPES = ("application/pdf", "application/x-pdf", "application/octet-stream")

# A check run on every file part before any rendering (the orchestrator refuses file parts
# for models that take no images); it raises APIError.
PartCheck = Callable[[TextContentPart, str], Any]


def file_parts(messages: Sequence[ChatMessage]) -> Iterator[tuple[str, TextContentPart]]:
    """(part name, part) of every `file` part, in request order."""
    for m_index, message in enumerate(messages):
        if isinstance(message.content, list):
            for p_index, part in enumerate(message.content):
                if part.type == "file":
                    yield f"messages[{m_index}].content[{p_index}]", part


def page_items(
    pages: Sequence[PdfPage], with_text: bool, page_texts: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The chat items of one document: each page's image, then its text: as perception read
    it (`page_texts`, marked where it came from), else its text layer if any."""
    items: list[dict[str, Any]] = []
    for index, page in enumerate(pages):
        assert page.image is not None, "a document for the vision stage renders every page"
        items.append({"type": "image", "image": page.image})
        if page_texts is not None:
            items.append({"type": "text", "text": page_texts[index]})
        elif with_text and page.text:
            items.append({"type": "text", "text": f"Page {page.index + 1} text: {page.text}\n"})
    return items


class Documents:
    """Decodes and renders the PDFs of one server's requests."""

    def __init__(self, renderer: PdfRenderer, images: str = "all") -> None:
        self.renderer = renderer
        # "all", or "untexted" when pages reach the model as text only: then only the pages
        # that need OCR are rendered (see PdfRenderer.render).
        self.images = images

    @property
    def with_text(self) -> bool:
        return self.renderer.settings.text

    def render_all(
        self, messages: Sequence[ChatMessage], check: PartCheck, dpi: float | None = None
    ) -> None:
        """Render every file part not rendered yet, keeping its pages on the part (see
        `pages_of`); all of a request's documents share one page budget."""
        parts = list(file_parts(messages))
        for name, part in parts:
            check(part, name)
        pages_left = self.renderer.settings.max_pages
        for name, part in parts:
            assert part.file is not None  # `check` refused file parts without one
            if part.file._pages is None:
                part.file._pages = self.render(part, name, dpi, pages_left)
            pages_left -= len(part.file._pages)

    async def render_async(
        self, messages: Sequence[ChatMessage], check: PartCheck, dpi: float | None = None
    ) -> None:
        """`render_all` on a thread, leaving the event loop free while documents render."""
        if any(True for _ in file_parts(messages)):
            await asyncio.to_thread(self.render_all, messages, check, dpi)

    @staticmethod
    def pages_of(part: TextContentPart) -> list[PdfPage]:
        assert part.file is not None and part.file._pages is not None, "render_all first"
        return list(part.file._pages)

    def render(
        self, part: TextContentPart, name: str, dpi: float | None, pages_left: int
    ) -> list[PdfPage]:
        """One file part's pages; APIError(400) naming the part (and its file name)."""
        label = name
        if part.file is not None and part.file.filename:
            label = f"{name} ({part.file.filename})"
        try:
            data = self._file_bytes(part, name, label)
            return self.renderer.render(
                data, name=label, dpi=dpi, max_pages=pages_left, images=self.images
            )
        except MediaError as exc:
            raise APIError(400, str(exc), param=name, code="invalid_media") from None

    def _file_bytes(self, part: TextContentPart, name: str, label: str) -> bytes:
        file = part.file
        if file is None:
            raise APIError(400, f"{name}: a file part needs 'file'", param=name)
        if file.file_data is None:
            if file.file_id is not None:
                raise APIError(
                    400,
                    f"{name}: file_id is not supported (omni keeps no uploaded files); send the "
                    "PDF in file_data as a data: URL, or post it to /v1/uploads/chat",
                    param=name,
                )
            raise APIError(400, f"{name}: a file part needs 'file_data'", param=name)
        payload = file.file_data
        if payload[:5].lower() == "data:":
            parts = split_data_url(payload)
            if parts is None or not parts[1]:
                raise MediaError(f"{label} is a data: URL without ';base64,' data", item=name)
            media_type, _, payload = parts
            if media_type.lower() not in _PDF_MEDIA_TYPES:
                raise MediaError(
                    f"{label} has media type {media_type!r}; file parts carry PDFs "
                    "(application/pdf)",
                    item=name,
                )
        limit = self.renderer.settings.max_bytes
        return decode_base64(payload, limit, "max_pdf_bytes", name=label)
