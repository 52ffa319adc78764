"""Chat messages whose media parts a model does not take, rewritten into text it does.

Each media part the modes send as text becomes a text part that says plainly where its text
came from, for example:

    [document report.pdf, page 2, text found by OCR]: Invoice number 4711 ...
    [document report.pdf, page 3, text layer]: Total 35 EUR ...
    [image 1, text found by OCR]: EXIT 24 / Main Street
    [image 2: no text found]
    [audio clip 1, transcript]: The capital of France is Paris.

A PDF page is its text layer where that layer can stand in for it, else the OCR stage's reading
of the rendered page (a scan, an empty layer or glyph garbage; see omni.media.text_layer). With
a mode of "both", the part stays (the model gets the media too) and its text follows it. All
of a request's pages, images and clips are read at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import numpy as np

from omni.media import MediaError, PixelBudget, decode_base64, decode_data_url, probe_image
from omni.media.fetch import is_data_url
from omni.media.pdf import PdfPage
from omni.server.documents import Documents
from omni.server.perception import BOTH, Perception
from omni.server.protocol import APIError, ChatMessage, TextContentPart
from omni.stages.contracts import ocr


def label_text(label: str, source: str, text: str, nothing: str) -> str:
    """`[label, source]: text`, or `[label: nothing]` when there is no text."""
    text = text.strip()
    return f"[{label}, {source}]: {text}\n" if text else f"[{label}: {nothing}]\n"


class PartReader:
    """Turns one request's media parts into marked text (see the module docstring)."""

    def __init__(self, perception: Perception, documents: Documents) -> None:
        self.perception = perception
        self.documents = documents

    async def rewrite(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """`messages` with the parts the modes send as text read; the rest as they were."""
        modes = self.perception.modes
        counts = {"image_url": 0, "input_audio": 0, "file": 0}
        budget = PixelBudget(self.perception.limits)
        # Per message: a list of parts, each a part kept as it is or the text it became.
        planned: list[list[TextContentPart | Awaitable[Any]]] = []
        for m_index, message in enumerate(messages):
            parts: list[TextContentPart | Awaitable[Any]] = []
            content = message.content if isinstance(message.content, list) else []
            for p_index, part in enumerate(content):
                if part.type not in counts or not modes.as_text(part.type):
                    parts.append(part)
                    continue
                counts[part.type] += 1
                name = f"messages[{m_index}].content[{p_index}]"
                if modes.as_media(part.type) and part.type != "file":
                    parts.append(part)  # "both": the media, then its text
                parts.append(self._read(part, name, counts[part.type], budget))
            planned.append(parts)
        if not any(counts.values()):
            return list(messages)
        awaitables = [p for parts in planned for p in parts if not isinstance(p, TextContentPart)]
        texts = iter(await asyncio.gather(*awaitables))
        rewritten = []
        for message, parts in zip(messages, planned, strict=True):
            if not isinstance(message.content, list):
                rewritten.append(message)
                continue
            new_content: list[TextContentPart] = []
            for step in parts:
                if isinstance(step, TextContentPart):
                    new_content.append(step)
                    continue
                result = next(texts)
                if isinstance(result, TextContentPart):  # a PDF kept for "both"
                    new_content.append(result)
                else:
                    new_content.append(TextContentPart(type="text", text=result))
            rewritten.append(message.model_copy(update={"content": new_content}))
        return rewritten

    def _read(self, part: TextContentPart, name: str, number: int, budget: PixelBudget
              ) -> Awaitable[Any]:
        if part.type == "image_url":
            return self._image(part, name, number, budget)
        if part.type == "input_audio":
            return self._audio(part, name, number)
        return self._document(part, name, number)

    async def _image(self, part: TextContentPart, name: str, number: int,
                     budget: PixelBudget) -> str:
        if part.image_url is None:
            raise APIError(400, f"{name}: an image_url part needs 'image_url'", param=name)
        limits = self.perception.limits
        try:
            data = part.image_url._fetched
            if data is None:
                if not is_data_url(part.image_url.url):
                    raise MediaError(f"{name} is an image URL that was not fetched", item=name)
                _, data = decode_data_url(part.image_url.url, name=name, limits=limits)
            image = probe_image(data, name=name, limits=limits)
            budget.spend(image.width, image.height, name=name)
        except MediaError as exc:
            raise APIError(400, str(exc), param=name, code="invalid_media") from None
        found = await self.perception.read_file(data, name)
        return label_text(f"image {number}", "text found by OCR", found.text, "no text found")

    async def _audio(self, part: TextContentPart, name: str, number: int) -> str:
        if part.input_audio is None:
            raise APIError(400, f"{name}: an input_audio part needs 'input_audio'", param=name)
        limits = self.perception.limits
        try:
            data = decode_base64(part.input_audio.data, limits.max_audio_bytes,
                                 "max_audio_bytes", name=name)
        except MediaError as exc:
            raise APIError(400, str(exc), param=name, code="invalid_media") from None
        pieces = await self.perception.transcribe(data, name)
        text = " ".join(piece.text for piece in pieces if piece.text)
        return label_text(f"audio clip {number}", "transcript", text, "no speech heard")

    async def _document(self, part: TextContentPart, name: str, number: int
                        ) -> str | TextContentPart:
        assert part.file is not None  # render_documents refused file parts without one
        document = f"document {part.file.filename or number}"
        pages = self.documents.pages_of(part)
        texts = await asyncio.gather(*(self._page(page, document, name) for page in pages))
        if self.perception.modes.pdf == BOTH:
            part.file._page_texts = list(texts)
            return part
        return "".join(texts)

    async def _page(self, page: PdfPage, document: str, name: str) -> str:
        label = f"{document}, page {page.index + 1}"
        if not page.text_problem:
            return label_text(label, "text layer", page.text, "no text found")
        assert page.image is not None  # rendered: its layer cannot stand in for it
        found: ocr.PageText = await self.perception.read_pixels(
            np.asarray(page.image), f"{name} page {page.index + 1}"
        )
        return label_text(label, "text found by OCR", found.text, "no text found")
