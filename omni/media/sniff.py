"""What a file is, from its first bytes (magic numbers), never from its name or declared type.

Uploads arrive as files whose names and Content-Type headers are whatever the client says;
the bytes decide which decoder sees them. Only the formats intake accepts are recognised.
"""

from __future__ import annotations

from dataclasses import dataclass

from omni.media.pdf import looks_like_pdf


@dataclass(frozen=True)
class FileType:
    kind: str  # "image", "audio" or "pdf"
    format: str  # "png", "jpeg", "webp", "gif", "bmp", "wav", "flac", "ogg", "mp3", "pdf"
    media_type: str  # the MIME type, for data: URLs


def sniff(data: bytes) -> FileType | None:
    """The type of `data` by its signature, or None for anything intake does not take."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return FileType("image", "png", "image/png")
    if head.startswith(b"\xff\xd8\xff"):
        return FileType("image", "jpeg", "image/jpeg")
    if head.startswith((b"GIF87a", b"GIF89a")):
        return FileType("image", "gif", "image/gif")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return FileType("image", "webp", "image/webp")
    if head.startswith(b"BM") and len(data) >= 26:
        return FileType("image", "bmp", "image/bmp")
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return FileType("audio", "wav", "audio/wav")
    if head.startswith(b"fLaC"):
        return FileType("audio", "flac", "audio/flac")
    if head.startswith(b"OggS"):
        return FileType("audio", "ogg", "audio/ogg")
    # MP3: an ID3v2 tag, or straight into an MPEG audio frame (11 sync bits, layer III).
    if head.startswith(b"ID3") or (
        len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 == 0x02
    ):
        return FileType("audio", "mp3", "audio/mpeg")
    if looks_like_pdf(data):
        return FileType("pdf", "pdf", "application/pdf")
    return None
