"""The language model of Qwen2-Audio (`Qwen2AudioForConditionalGeneration`): plain Qwen2.

The audio tower and its projector run in the audio encoder stage
(`omni.stages.encoders.audio.AudioEncoder`); here only the Qwen2 decoder is built, and the
engine splices the audio embeddings over the `<|AUDIO|>` placeholder rows through
`inputs_embeds`, exactly like images for Qwen2-VL. Positions are ordinary 1-D ones.
"""

from __future__ import annotations

from typing import ClassVar

from omni.stages.llm.models.multimodal_lm import MultiModalLanguageModel
from omni.stages.llm.models.qwen2 import Qwen2ForCausalLM


class Qwen2AudioForCausalLM(MultiModalLanguageModel, Qwen2ForCausalLM):
    """Qwen2-Audio's Qwen2 language model over a paged KV cache."""

    IGNORED_CHECKPOINT_PREFIXES: ClassVar[tuple[str, ...]] = (
        "audio_tower.",
        "multi_modal_projector.",
        "model.audio_tower.",
        "model.multi_modal_projector.",
    )
    CHECKPOINT_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        # transformers 5.17's save_pretrained doubles the inner `model.` when it writes the
        # released layout back; its own loader reads that form too.
        ("language_model.model.model.", "model."),
        # The released Qwen2-Audio checkpoints.
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        # transformers 5's module names.
        ("model.language_model.", "model."),
    )
