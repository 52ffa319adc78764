"""Multi-modal prompt processing: placeholder expansion, item hashes and M-RoPE positions."""

from omni.multimodal.hashing import audio_item_hash, image_item_hash
from omni.multimodal.mrope import ImageSpan, decode_mrope_positions, mrope_positions
from omni.multimodal.prompt import MultiModalPrompt
from omni.multimodal.qwen2_audio import (
    ProcessedAudio,
    Qwen2AudioPrompt,
    Qwen2AudioPromptProcessor,
)
from omni.multimodal.qwen2_vl import (
    ProcessedImage,
    Qwen2VLImageItems,
    Qwen2VLPrompt,
    Qwen2VLPromptProcessor,
    prepare_qwen2_vl_prompt,
)

__all__ = [
    "ImageSpan",
    "MultiModalPrompt",
    "ProcessedAudio",
    "ProcessedImage",
    "Qwen2AudioPrompt",
    "Qwen2AudioPromptProcessor",
    "Qwen2VLImageItems",
    "Qwen2VLPrompt",
    "Qwen2VLPromptProcessor",
    "audio_item_hash",
    "decode_mrope_positions",
    "image_item_hash",
    "mrope_positions",
    "prepare_qwen2_vl_prompt",
]
