"""The language model of Qwen2-VL and Qwen2.5-VL: Qwen2 with multimodal rotary (M-RoPE).

Registered under the checkpoints' own architecture names
(`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`), but only the
language model lives here: the vision tower runs in its own stage
(`omni.stages.encoders.vision.VisionEncoder`), so its `visual.*` tensors are skipped when
loading. Everything else is checked as strictly as for the text-only models.

Entry point for the model runner, the same signature as every native model:

    hidden = model(None, positions, kv_caches, attn_meta, backend, inputs_embeds=embeds)

where `positions` is int64 `[3, T]` (temporal, height, width; from
`omni.multimodal.qwen2_vl.mrope_positions` for a prompt, and `text position +
mrope_position_delta` in all three rows while decoding) and `embeds` are
`model.embed_tokens(ids)` with the vision encoder's outputs written over the image
placeholder rows. A `[T]` positions tensor is accepted for text-only batches.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from omni.stages.llm.models.mrope import MRotaryEmbedding
from omni.stages.llm.models.multimodal_lm import MultiModalLanguageModel
from omni.stages.llm.models.qwen2 import Qwen2ForCausalLM


class Qwen2VLForCausalLM(MultiModalLanguageModel, Qwen2ForCausalLM):
    """Qwen2(.5)-VL's language model over a paged KV cache, rotating with M-RoPE."""

    # Tells the model runner to build [3, T] positions (and 3-row CUDA-graph inputs).
    uses_mrope: ClassVar[bool] = True
    IGNORED_CHECKPOINT_PREFIXES: ClassVar[tuple[str, ...]] = ("visual.", "model.visual.")
    # Checkpoints name the language model either the original way (`model.layers...`, what
    # the released Qwen checkpoints and transformers' save_pretrained write) or transformers
    # 5's module way (`model.language_model.layers...`); the latter is folded onto the former.
    CHECKPOINT_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model.language_model.", "model."),
    )

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__(config, dtype)
        self.model.rotary_emb = MRotaryEmbedding(self.config, self.geometry.head_dim)
