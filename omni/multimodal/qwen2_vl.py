"""Prompt processing for Qwen2-VL / Qwen2.5-VL requests: one request in, engine inputs out.

Entry point (what the engine calls for each multimodal request):

    processor = Qwen2VLPromptProcessor.from_pretrained(model_folder)
    prompt = prepare_qwen2_vl_prompt(processor, messages=[...])          # chat messages, or
    prompt = prepare_qwen2_vl_prompt(processor, prompt=text, images=[...])

`messages` are chat messages whose `content` is a string or a list of items
`{"type": "text", "text": ...}` / `{"type": "image", "image": <PIL image or EncodedImage>}`
(a decoded image, or one whose header media intake checked: the server leaves decoding to the
vision stage, since the patch grid, hence the placeholder run, follows from the size alone).
A text `prompt` marks each image with Qwen's
`<|vision_start|><|image_pad|><|vision_end|>` (one `<|image_pad|>` per image, in order).

The result, a `Qwen2VLPrompt`, carries
  * `prompt_token_ids`: each image's single `<|image_pad|>` expanded to its run of
    `grid_t * grid_h * grid_w / merge_size**2` tokens (as transformers' processor does);
  * per image: `pixel_values` `[patches, C*T*P*P]`, `grid_thw`, and the
    `MultiModalPlaceholder(item_hash, offset, length)` of its run (block hashing's extra key);
  * `pixel_values` / `image_grid_thw`: all images concatenated, the vision encoder's inputs;
  * `mrope_positions` int64 `[3, P]` and `mrope_position_delta` (see `omni.multimodal.mrope`):
    prompt token i uses column i; a generated token at sequence index p uses p + delta.

Then, with the vision encoder (`omni.stages.encoders.vision`):

    per_image = prompt.split_embeddings(encoder.encode(*prompt.encoder_inputs()))
    engine.add_request(request_id, prompt.prompt_token_ids, sampling,
                       mm=prompt.to_multimodal_inputs(per_image))

(`encoder_inputs([i, ...])` selects the images that still need encoding; pass None in
`to_multimodal_inputs` for an image skipped as prefix-cached.) Through the stages, each image
instead travels to the LLM stage as its vision-stage request (`encoder_item`), which the LLM
stage sends on only if its caches lack the image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from omni.cache import MultiModalPlaceholder
from omni.media import EncodedImage, MediaError, MediaLimits, hash_media_item, load_image, to_rgb
from omni.multimodal.chat import (
    ChatText,
    MediaKind,
    load_tokenizer_with_template,
    render_chat,
)
from omni.multimodal.hashing import image_item_hash, plain_settings
from omni.multimodal.mrope import ImageSpan, mrope_positions
from omni.multimodal.prompt import EncoderItem, MultiModalPrompt, expand_placeholders
from omni.stages.contracts import vision
from omni.stages.llm.mm_inputs import MultiModalInputs

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Qwen's smart_resize rejects aspect ratios beyond this; checked up front for a clear error.
MAX_ASPECT_RATIO = 200
DEFAULT_MAX_IMAGES = 16
# The server checked an encoded image's bytes and header already; what decodes here is bounded
# by that, and PIL's own decompression-bomb guard still applies.
_NO_LIMITS = MediaLimits(max_image_bytes=2**62, max_image_pixels=2**62)
IMAGE_ITEMS = MediaKind(
    "image", (Image.Image, EncodedImage), "a decoded PIL image or an EncodedImage"
)


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the vision encoder takes it, with its content hash. The pixels are made
    on first use: the grid (hence the placeholder run) comes from the image's size alone, so an
    image that the prefix or encoder cache already covers is never resized or normalised."""

    grid_thw: tuple[int, int, int]
    item_hash: str
    make_pixels: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    # What the vision stage is sent to make the embeddings: the client's file, or the pixels.
    source: EncodedImage | Image.Image | None = field(default=None, repr=False, compare=False)

    @cached_property
    def pixel_values(self) -> torch.Tensor:
        """float32 [grid_t * grid_h * grid_w, C * T * P * P]"""
        return self.make_pixels()

    def encoder_item(self, name: str) -> EncoderItem:
        """The vision stage's request for this image: its file as sent, or its RGB pixels."""
        t, h, w = self.grid_thw
        if isinstance(self.source, EncodedImage):
            data = torch.frombuffer(bytearray(self.source.data), dtype=torch.uint8)
            request = vision.EncodeImage(
                item=self.source.name,
                source="encoded",
                width=self.source.width,
                height=self.source.height,
                grid_thw=[t, h, w],
            )
        elif self.source is not None:
            rgb = to_rgb(self.source)
            data = torch.from_numpy(np.asarray(rgb).copy())
            width, height = rgb.size
            request = vision.EncodeImage(
                item=name, source="rgb", width=width, height=height, grid_thw=[t, h, w]
            )
        else:
            raise ValueError(f"{name} has no source image to send to the vision stage")
        return EncoderItem(vision.ROLE, vision.CONTRACT.encode(request), {vision.IMAGE: data})


@dataclass(frozen=True)
class Qwen2VLPrompt(MultiModalPrompt):
    """Everything the engine needs for one Qwen2(.5)-VL prompt (see the module docstring)."""

    ENCODER_ROLE: ClassVar[str] = "vision"
    ITEM_NOUN: ClassVar[str] = "images"

    prompt_token_ids: list[int]
    images: tuple[ProcessedImage, ...]
    placeholders: tuple[MultiModalPlaceholder, ...]
    mrope_positions: torch.Tensor  # int64 [3, len(prompt_token_ids)]
    mrope_position_delta: int

    def __post_init__(self) -> None:
        if len(self.images) != len(self.placeholders):
            raise ValueError(f"{len(self.images)} images but {len(self.placeholders)} placeholders")
        if tuple(self.mrope_positions.shape) != (3, len(self.prompt_token_ids)):
            raise ValueError(
                f"mrope_positions has shape {tuple(self.mrope_positions.shape)}; expected "
                f"(3, {len(self.prompt_token_ids)})"
            )

    def encoder_inputs(
        self, item_indices: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values, image_grid_thw) of the given images (all by default), in that order:
        the vision encoder's inputs when some items need no encoding (cached)."""
        chosen = [self.images[i] for i in self.selected_items(item_indices)]
        pixels = torch.cat([image.pixel_values for image in chosen])
        grid = torch.tensor([image.grid_thw for image in chosen], dtype=torch.int64)
        return pixels, grid

    def encoder_request(self, item_indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        pixel_values, grid_thw = self.encoder_inputs(item_indices)
        return {vision.PIXEL_VALUES: pixel_values, vision.IMAGE_GRID_THW: grid_thw}

    def encoder_items(self) -> list[EncoderItem]:
        return [image.encoder_item(f"image {i}") for i, image in enumerate(self.images)]

    def mrope_tensor(self) -> torch.Tensor | None:
        return self.mrope_positions

    def mrope_delta(self) -> int:
        return self.mrope_position_delta

    def to_multimodal_inputs(self, embeddings: Sequence[torch.Tensor | None]) -> MultiModalInputs:
        """The LLM engine's `mm=` argument: per image its embeddings (None for an item the
        orchestrator skipped as prefix-cached), plus this prompt's M-RoPE positions."""
        return MultiModalInputs(
            placeholders=list(self.placeholders),
            embeddings=list(embeddings),
            mrope_positions=self.mrope_positions.numpy(),
            mrope_position_delta=self.mrope_position_delta,
        )

    @cached_property
    def pixel_values(self) -> torch.Tensor | None:
        """All images' patches concatenated in prompt order (None for a text-only prompt)."""
        if not self.images:
            return None
        return torch.cat([image.pixel_values for image in self.images])

    @cached_property
    def image_grid_thw(self) -> torch.Tensor | None:
        """int64 [num_images, 3], rows in prompt order (None for a text-only prompt)."""
        if not self.images:
            return None
        return torch.tensor([image.grid_thw for image in self.images], dtype=torch.int64)


class Qwen2VLImageItems:
    """Turns images into `ProcessedImage`s with one checkpoint's image processor."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        self.merge_size = int(image_processor.merge_size)
        # Everything in the image processor's settings shapes the pixels the tower sees.
        self.processor_settings: Mapping[str, Any] = image_processor.to_dict()
        self._plain_settings = plain_settings(self.processor_settings)

    def process(self, index: int, image: Image.Image | EncodedImage) -> ProcessedImage:
        """Image `index` of a request: checked, hashed, its grid known, pixels on demand."""
        if isinstance(image, EncodedImage):
            return self._process_encoded(index, image)
        width, height = image.size
        self._check_size(index, width, height)
        item_hash = image_item_hash(image, self.processor_settings)
        grid = self._grid_of(width, height)
        if grid is None:
            pixels, grid = self._pixels_and_grid(image)
            return ProcessedImage(grid, item_hash, lambda: pixels, image)
        expected = grid

        def make_pixels() -> torch.Tensor:
            pixels, grid = self._pixels_and_grid(image)
            if grid != expected:
                raise RuntimeError(
                    f"image {index}: the image processor made a {grid} patch grid where its "
                    f"settings give {expected}"
                )
            return pixels

        return ProcessedImage(grid, item_hash, make_pixels, image)

    def _process_encoded(self, index: int, image: EncodedImage) -> ProcessedImage:
        """An image left encoded: hashed by its bytes, its grid from its header's size."""
        self._check_size(index, image.width, image.height)
        grid = self._grid_of(image.width, image.height)
        if grid is None:
            # Processor settings whose grid we cannot predict: decode it here after all.
            try:
                decoded = load_image(image.data, name=image.name, limits=_NO_LIMITS)
            except MediaError as exc:
                raise ValueError(str(exc)) from None
            return self.process(index, decoded)
        data = np.frombuffer(image.data, dtype=np.uint8)
        item_hash = hash_media_item("encoded-image", "", data, self._plain_settings)

        def make_pixels() -> torch.Tensor:
            try:
                decoded = load_image(image.data, name=image.name, limits=_NO_LIMITS)
            except MediaError as exc:
                raise ValueError(str(exc)) from None
            pixels, _ = self._pixels_and_grid(decoded)
            return pixels

        return ProcessedImage(grid, item_hash, make_pixels, image)

    def _check_size(self, index: int, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"image {index} is {width}x{height} pixels; it is empty")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise ValueError(
                f"image {index} is {width}x{height} pixels; the aspect ratio limit is "
                f"{MAX_ASPECT_RATIO}"
            )

    def _pixels_and_grid(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        out = self.image_processor(images=[image], return_tensors="pt")
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        return out["pixel_values"], (t, h, w)

    def _grid_of(self, width: int, height: int) -> tuple[int, int, int] | None:
        """The patch grid the image processor will make for a still image of this size, by
        its own resize rule; None where its settings are not the resizing kind this knows."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        processor = self.image_processor
        size = getattr(processor, "size", None)
        # transformers 5 keeps `size` as a SizeDict (None for unset fields); older ones a dict.
        min_pixels = size.get("shortest_edge") if size is not None else None
        max_pixels = size.get("longest_edge") if size is not None else None
        if not getattr(processor, "do_resize", False) or min_pixels is None or max_pixels is None:
            return None
        patch = int(processor.patch_size)
        resized_height, resized_width = smart_resize(
            height,
            width,
            factor=patch * self.merge_size,
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
        )
        return 1, resized_height // patch, resized_width // patch


class Qwen2VLPromptProcessor:
    """Tokenizer plus image processor for one Qwen2(.5)-VL checkpoint."""

    # The media items its messages carry (the server maps content parts onto it).
    MEDIA: ClassVar[MediaKind] = IMAGE_ITEMS

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        max_images: int = DEFAULT_MAX_IMAGES,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if max_images < 0:
            raise ValueError(f"max_images is {max_images}; it must be >= 0")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_images = max_images
        self.max_prompt_tokens = max_prompt_tokens
        self.items = Qwen2VLImageItems(image_processor)
        self.merge_size = self.items.merge_size
        self.image_token_id = self._special_token_id(IMAGE_PAD)
        self.processor_settings = self.items.processor_settings

    @classmethod
    def from_pretrained(cls, folder: str, **limits: Any) -> Qwen2VLPromptProcessor:
        """From a checkpoint folder holding the tokenizer and `preprocessor_config.json` /
        `processor_config.json` (no network)."""
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(folder)
        return cls(load_tokenizer_with_template(folder), image_processor, **limits)

    def _special_token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token; is this a Qwen2-VL model?")
        return int(token_id)

    # ---- the one entry point ----------------------------------------------------------------

    def prepare(
        self,
        messages: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | None = None,
        images: Sequence[Image.Image] = (),
        add_generation_prompt: bool = True,
    ) -> Qwen2VLPrompt:
        """Process one request: `messages` (images inside them) or `prompt` plus `images`."""
        if (messages is None) == (prompt is None):
            raise ValueError("pass exactly one of messages or prompt")
        if messages is not None:
            if images:
                raise ValueError("with messages, images go inside the message content")
            chat, images = render_chat(
                self.tokenizer, messages, self.MEDIA, add_generation_prompt
            )
        else:
            assert prompt is not None
            chat = ChatText(prompt)
        self._check_prompt(chat.text, images)

        processed = [self.items.process(index, image) for index, image in enumerate(images)]
        text_ids = chat.encode(self.tokenizer)
        token_ids, placeholders, spans = self._expand_image_pads(text_ids, processed)
        if self.max_prompt_tokens is not None and len(token_ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens with its images expanded; the limit is "
                f"{self.max_prompt_tokens}"
            )
        positions, delta = mrope_positions(len(token_ids), spans, self.merge_size)
        return Qwen2VLPrompt(token_ids, tuple(processed), tuple(placeholders), positions, delta)

    # ---- steps ------------------------------------------------------------------------------

    def _check_prompt(self, prompt: str, images: Sequence[Image.Image]) -> None:
        if VIDEO_PAD in prompt:
            raise ValueError(f"the prompt contains {VIDEO_PAD}; video input is not supported")
        if len(images) > self.max_images:
            raise ValueError(
                f"request has {len(images)} images (each page of a PDF is one); the limit is "
                f"{self.max_images}"
            )
        markers = prompt.count(IMAGE_PAD)
        if markers != len(images):
            raise ValueError(
                f"the prompt has {markers} {IMAGE_PAD} markers for {len(images)} images; "
                "each image needs exactly one"
            )

    def _expand_image_pads(
        self, text_ids: list[int], images: Sequence[ProcessedImage]
    ) -> tuple[list[int], list[MultiModalPlaceholder], list[ImageSpan]]:
        """Replace the i-th `<|image_pad|>` id with image i's run; record where each run is."""
        lengths = [ImageSpan(0, image.grid_thw).num_tokens(self.merge_size) for image in images]
        token_ids, placeholders = expand_placeholders(
            text_ids, self.image_token_id, lengths, [image.item_hash for image in images], IMAGE_PAD
        )
        spans = [
            ImageSpan(item.offset, image.grid_thw)
            for item, image in zip(placeholders, images, strict=True)
        ]
        return token_ids, placeholders, spans


def prepare_qwen2_vl_prompt(
    processor: Qwen2VLPromptProcessor,
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt: str | None = None,
    images: Sequence[Image.Image] = (),
    add_generation_prompt: bool = True,
) -> Qwen2VLPrompt:
    """Token ids, image inputs, placeholders and M-RoPE positions for one request."""
    return processor.prepare(messages, prompt, images, add_generation_prompt)
