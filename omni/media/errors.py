"""The one error type media intake raises, so the HTTP server can map it to a 400."""

from __future__ import annotations


class MediaError(ValueError):
    """A media item was refused.

    `item` names the item as the caller labelled it ("image 2", "audio 0"), so the message
    points at the exact part of the request; `limit` is the `MediaLimits` field that was
    exceeded, or None when the item is malformed rather than too large.
    """

    def __init__(self, message: str, *, item: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.item = item
        self.limit = limit
