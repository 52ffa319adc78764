"""Media parts of chat messages made ready for the model's prompt processor.

`image_url` (data: URLs, or http(s) and file URLs where the fetch policy allows them),
`input_audio` and `file` (PDF) parts are counted against the limits, fetched or rendered off
the event loop, decoded and bounded, then handed to the prompt processor, which expands them
into placeholders. Every refusal is an APIError naming the part.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from omni.media import (
    MediaError,
    MediaLimits,
    PixelBudget,
    check_item_count,
    decode_base64,
    decode_data_url,
    load_audio,
    probe_image,
)
from omni.media.fetch import MediaFetchPolicy, fetch_media_url, is_data_url
from omni.multimodal.prompt import MultiModalPrompt
from omni.server.documents import Documents, page_items
from omni.server.protocol import APIError, ChatMessage, ImageURL, TextContentPart

# Content part type -> (the prompt processor's media kind, what the model takes, in errors).
MEDIA_PARTS = {
    "image_url": ("image", "images"),
    "input_audio": ("audio", "audio"),
    # A PDF's pages are images (see omni.server.documents).
    "file": ("image", "PDF files"),
}
AUDIO_PART_FORMATS = ("wav", "mp3", "flac", "ogg")


class MediaPrompts:
    """The media half of prompt building for one served model."""

    def __init__(
        self,
        model_name: str,
        documents: Documents,
        mm_processor: Any = None,
        media_limits: MediaLimits | None = None,
        fetch_policy: MediaFetchPolicy | None = None,
        read_as_text: frozenset[str] = frozenset(),
    ) -> None:
        self.model_name = model_name
        # Part types that perception turns into text before prompt building (see
        # omni.server.perceived_parts), so the model need not take them.
        self.read_as_text = read_as_text
        # The model's multi-modal prompt processor (Qwen2-VL: images, Qwen2-Audio: audio);
        # None for a text-only model.
        self.mm_processor = mm_processor
        self.media_limits = media_limits or MediaLimits()
        # Which http(s) hosts and local folder image_url may name (none by default).
        self.fetch_policy = fetch_policy or MediaFetchPolicy()
        # PDFs of `file` parts; its render workers start on the first document.
        self.documents = documents

    def prepare(self, messages: Sequence[ChatMessage]) -> MultiModalPrompt:
        """The conversation through the prompt processor, its media parts decoded."""
        self.check_media_count(messages)
        # PDFs not rendered by `render_documents` (synchronous callers) render here.
        self.documents.render_all(messages, self._media_kind)
        budget = PixelBudget(self.media_limits)
        conversation = [self._mm_message(m, i, budget) for i, m in enumerate(messages)]
        assert self.mm_processor is not None
        try:
            prompt: MultiModalPrompt = self.mm_processor.prepare(messages=conversation)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return prompt

    def check_media_count(self, messages: Sequence[ChatMessage]) -> None:
        """Refuse a conversation with more media parts than the limit, before any work."""
        count = sum(
            1
            for m in messages
            if isinstance(m.content, list)
            for part in m.content
            if part.type in MEDIA_PARTS
        )
        try:
            check_item_count(count, self.media_limits, item="messages")
        except MediaError as exc:
            raise APIError(400, str(exc), param="messages", code="too_many_items") from None

    async def render_documents(
        self, messages: Sequence[ChatMessage], dpi: float | None = None
    ) -> None:
        """Render the PDFs of `file` parts (at `dpi`, default the server's) in the render
        workers, off the event loop; parts for a model that takes no images are refused
        first."""
        await self.documents.render_async(messages, self._media_kind, dpi)

    async def fetch_media(self, messages: Sequence[ChatMessage]) -> None:
        """Fetch the http(s) and file image URLs of `messages` (as the fetch policy allows)
        into their parts, concurrently; data: URLs are left to prompt building."""
        self.check_media_count(messages)
        wanted = [
            (f"messages[{i}].content[{k}]", part.image_url)
            for i, m in enumerate(messages)
            if isinstance(m.content, list)
            for k, part in enumerate(m.content)
            if part.type == "image_url"
            and part.image_url is not None
            and not is_data_url(part.image_url.url)
        ]
        if not wanted:
            return
        limits = self.media_limits

        async def fetch(name: str, image_url: ImageURL) -> None:
            image_url._fetched = await fetch_media_url(
                image_url.url,
                self.fetch_policy,
                name=name,
                max_bytes=limits.max_image_bytes,
                limit_name="max_image_bytes",
            )

        results = await asyncio.gather(
            *(fetch(name, image_url) for name, image_url in wanted), return_exceptions=True
        )
        for result in results:
            if isinstance(result, MediaError):
                raise APIError(400, str(result), param=result.item, code="invalid_media")
            if isinstance(result, BaseException):
                raise result

    def _mm_message(
        self, message: ChatMessage, index: int, budget: PixelBudget
    ) -> dict[str, Any]:
        if message.content is None or isinstance(message.content, str):
            return {"role": message.role, "content": message.content or ""}
        items: list[dict[str, Any]] = []
        for k, part in enumerate(message.content):
            name = f"messages[{index}].content[{k}]"
            if part.type == "text":
                items.append({"type": "text", "text": part.text or ""})
                continue
            kind = self._media_kind(part, name)
            if part.type == "file":
                pages = self.documents.pages_of(part)
                assert part.file is not None
                items.extend(page_items(pages, self.documents.with_text, part.file._page_texts))
                continue
            try:
                if kind == "image":
                    items.append({"type": "image", "image": self._image(part, name, budget)})
                else:
                    items.append({"type": "audio", "audio": self._audio(part, name)})
            except MediaError as exc:
                raise APIError(400, str(exc), param=name, code="invalid_media") from None
        return {"role": message.role, "content": items}

    def _media_kind(self, part: TextContentPart, name: str) -> str:
        """The media kind of a non-text part, refusing parts this model does not take."""
        if part.type not in MEDIA_PARTS:
            raise APIError(
                400,
                f"{name}: content part type {part.type!r} is not supported; 'text', "
                "'image_url', 'input_audio' and 'file' (PDF) parts are",
                param=name,
                code="unsupported_content",
            )
        kind, plural = MEDIA_PARTS[part.type]
        if not self.takes(part.type):
            raise APIError(
                400,
                f"{name}: model {self.model_name!r} does not take {plural}",
                param=name,
                code="unsupported_content",
            )
        if getattr(part, part.type) is None:
            raise APIError(400, f"{name}: an {part.type} part needs {part.type!r}", param=name)
        return kind

    def takes(self, part_type: str) -> bool:
        """Whether this server serves media parts of `part_type`: the model takes them, or
        perception reads them as text."""
        if part_type in self.read_as_text:
            return True
        taken = getattr(self.mm_processor, "MEDIA", None)
        return taken is not None and taken.name == MEDIA_PARTS[part_type][0]

    def _image(self, part: TextContentPart, name: str, budget: PixelBudget) -> Any:
        """The image's bytes with its header checked, its pixels counted against the
        request's budget; the vision stage decodes it."""
        assert part.image_url is not None
        data = part.image_url._fetched
        if data is None:
            if not is_data_url(part.image_url.url):
                raise MediaError(f"{name} is an image URL that was not fetched", item=name)
            _, data = decode_data_url(part.image_url.url, name=name, limits=self.media_limits)
        image = probe_image(data, name=name, limits=self.media_limits)
        budget.spend(image.width, image.height, name=name)
        return image

    def _audio(self, part: TextContentPart, name: str) -> Any:
        """Mono float32 samples at the model's rate; a clip longer than the model's window is
        refused from the file's header, before it is decoded."""
        assert part.input_audio is not None
        audio_format = part.input_audio.format.lower()
        if audio_format not in AUDIO_PART_FORMATS:
            raise MediaError(
                f"{name} has format {part.input_audio.format!r}; supported: "
                f"{', '.join(AUDIO_PART_FORMATS)}",
                item=name,
            )
        limits = self.media_limits
        data = decode_base64(
            part.input_audio.data, limits.max_audio_bytes, "max_audio_bytes", name=name
        )
        max_seconds = min(limits.max_audio_seconds, self.mm_processor.max_seconds)
        samples = load_audio(
            data,
            name=name,
            sampling_rate=self.mm_processor.sampling_rate,
            limits=dataclasses.replace(limits, max_audio_seconds=max_seconds),
        )
        if samples.size < self.mm_processor.min_samples:
            raise MediaError(self.mm_processor.too_short(name, samples.size), item=name)
        return samples


def has_media_parts(message: ChatMessage) -> bool:
    """Whether the message has image or audio parts (the multi-modal path names the parts the
    model cannot take)."""
    content = message.content
    return isinstance(content, list) and any(part.type in MEDIA_PARTS for part in content)
