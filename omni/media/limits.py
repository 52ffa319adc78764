"""Hard limits on media items, checked before the expensive work (decoding, resampling)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from omni.media.errors import MediaError


@dataclass(frozen=True)
class MediaLimits:
    """Per-item limits for media intake; one request's items are bounded by their count.

    The defaults bound the memory a single request can make the API process spend:
    20 MB of compressed image decodes to at most 40 M RGB pixels (120 MB); 25 MB of audio
    decodes to at most 600 s of mono float32 at the source rate.
    """

    max_image_bytes: int = 20 * 1000 * 1000
    # ~6300 x 6300. PIL's own decompression-bomb guard errors only above ~179 M pixels.
    max_image_pixels: int = 40_000_000
    max_audio_bytes: int = 25 * 1000 * 1000
    max_audio_seconds: float = 600.0
    # A FLAC of silence compresses to almost nothing, so the byte limit alone does not bound
    # the decoded size: the rate and channel count bound it together with the seconds.
    max_audio_sampling_rate: int = 192_000
    max_audio_channels: int = 8
    max_items_per_request: int = 16
    # All of one request's images together, from their headers: sixteen images each under
    # max_image_pixels (a 6000x6000 PNG of one colour is 35 KB) would decode to 1.7 GB. Four
    # images at the per-image limit, or thirteen 12-megapixel photos, fit.
    max_request_pixels: int = 160_000_000

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{field.name} is {value!r}; it must be a number")
            if not value > 0:
                raise ValueError(f"{field.name} is {value}; it must be positive")
            if not math.isfinite(value):
                raise ValueError(f"{field.name} is {value}; it must be finite")
            if field.type == "int" and not isinstance(value, int):
                raise ValueError(f"{field.name} is {value!r}; it must be an integer")


def check_item_count(count: int, limits: MediaLimits, *, item: str = "request") -> None:
    """Refuse a request carrying more media items than `limits` allows."""
    if count > limits.max_items_per_request:
        raise MediaError(
            f"{item} has {count} media items; the limit is {limits.max_items_per_request}",
            item=item,
            limit="max_items_per_request",
        )


class PixelBudget:
    """One request's images counted against `max_request_pixels` as their headers are read,
    so the item that passes the budget is refused before any of them is decoded."""

    def __init__(self, limits: MediaLimits) -> None:
        self.limit = limits.max_request_pixels
        self.used = 0

    def spend(self, width: int, height: int, *, name: str) -> None:
        self.used += width * height
        if self.used > self.limit:
            raise MediaError(
                f"{name} ({width}x{height} pixels) brings the request's images to {self.used} "
                f"pixels; the limit is {self.limit} pixels per request (max_request_pixels)",
                item=name,
                limit="max_request_pixels",
            )


def check_num_bytes(num_bytes: int, limit: int, limit_name: str, *, name: str) -> None:
    """Refuse an empty item or one larger than `limit` bytes, before any parsing."""
    if num_bytes == 0:
        raise MediaError(f"{name} is empty (0 bytes)", item=name)
    if num_bytes > limit:
        raise MediaError(
            f"{name} is {num_bytes} bytes; the limit is {limit} bytes",
            item=name,
            limit=limit_name,
        )
