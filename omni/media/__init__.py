"""Media intake: decode images and audio under hard limits, and hash them by content."""

from omni.media.audio import AUDIO_FORMATS, load_audio, resample
from omni.media.data_url import decode_base64, decode_data_url
from omni.media.errors import MediaError
from omni.media.hashing import hash_audio, hash_image, hash_media_item
from omni.media.images import IMAGE_FORMATS, EncodedImage, load_image, probe_image, to_rgb
from omni.media.limits import MediaLimits, PixelBudget, check_item_count

__all__ = [
    "AUDIO_FORMATS",
    "IMAGE_FORMATS",
    "EncodedImage",
    "MediaError",
    "MediaLimits",
    "PixelBudget",
    "check_item_count",
    "decode_base64",
    "decode_data_url",
    "hash_audio",
    "hash_image",
    "hash_media_item",
    "load_audio",
    "load_image",
    "probe_image",
    "resample",
    "to_rgb",
]
