"""Multi-modal prompt processing: placeholder expansion, item hashes and M-RoPE positions."""

from omni.multimodal.hashing import image_item_hash
from omni.multimodal.mrope import ImageSpan, decode_mrope_positions, mrope_positions
from omni.multimodal.qwen2_vl import (
    ProcessedImage,
    Qwen2VLPrompt,
    Qwen2VLPromptProcessor,
    prepare_qwen2_vl_prompt,
)

__all__ = [
    "ImageSpan",
    "ProcessedImage",
    "Qwen2VLPrompt",
    "Qwen2VLPromptProcessor",
    "decode_mrope_positions",
    "image_item_hash",
    "mrope_positions",
    "prepare_qwen2_vl_prompt",
]
