"""`data:` URLs (RFC 2397), the way OpenAI-style requests inline images and audio."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse

from omni.media.errors import MediaError
from omni.media.limits import MediaLimits, check_num_bytes

# type/subtype, then optional ;name=value parameters; the media type is case-insensitive.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")


def decode_data_url(url: str, *, name: str, limits: MediaLimits) -> tuple[str, bytes]:
    """The media type (lower case, no parameters) and bytes of an image or audio data URL.

    The decoded size is computed from the encoded length and checked against the limit for
    the media type (`max_image_bytes` or `max_audio_bytes`) before anything is decoded.
    """
    if not url[:5].lower() == "data:":
        raise MediaError(f"{name} is not a data: URL", item=name)
    parts = split_data_url(url)
    if parts is None:
        raise MediaError(f"{name} is a data: URL without a ',' before its data", item=name)
    media_type, is_base64, payload = parts
    media_type = media_type.lower()
    if not _MEDIA_TYPE.fullmatch(media_type) or not media_type.startswith(("image/", "audio/")):
        shown = media_type or "text/plain"  # RFC 2397's default when none is given
        raise MediaError(
            f"{name} has media type {shown!r}; only image/* and audio/* data URLs are accepted",
            item=name,
        )
    if media_type.startswith("image/"):
        limit, limit_name = limits.max_image_bytes, "max_image_bytes"
    else:
        limit, limit_name = limits.max_audio_bytes, "max_audio_bytes"

    if not is_base64:
        # Percent-encoding never shrinks data, so the encoded length bounds the decoded one.
        if len(payload) > 3 * limit:
            check_num_bytes(len(payload) // 3, limit, limit_name, name=name)
        data = urllib.parse.unquote_to_bytes(payload)
        check_num_bytes(len(data), limit, limit_name, name=name)
        return media_type, data

    what = f"{name} is a data: URL whose base64 data is invalid"
    return media_type, decode_base64(payload, limit, limit_name, name=name, invalid=what)


def split_data_url(url: str) -> tuple[str, bool, str] | None:
    """(media type as written, stripped; whether the data is base64; the data) of a URL that
    starts with `data:`, or None when no ',' ends its header."""
    meta, comma, payload = url[5:].partition(",")
    if not comma:
        return None
    media_type, *params = meta.split(";")
    return media_type.strip(), bool(params) and params[-1].strip().lower() == "base64", payload


def decode_base64(
    payload: str, limit: int, limit_name: str, *, name: str, invalid: str | None = None
) -> bytes:
    """The bytes of base64 `payload`; their size (computed from the encoded length) is checked
    against `limit` before anything is decoded. MediaError naming `name` (`invalid` is the
    message for malformed base64)."""
    invalid = invalid or f"{name} is not valid base64"
    if len(payload) % 4:
        raise MediaError(invalid, item=name)
    padding = len(payload) - len(payload.rstrip("="))
    check_num_bytes(len(payload) // 4 * 3 - min(padding, 2), limit, limit_name, name=name)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise MediaError(invalid, item=name) from error
