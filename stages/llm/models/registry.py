"""Maps a Hugging Face `config.architectures[0]` to the native model class."""

from __future__ import annotations

from typing import Any

from omni.stages.llm.models.base import CausalLM
from omni.stages.llm.models.deepseek_v2 import DeepseekV2ForCausalLM
from omni.stages.llm.models.llama import LlamaForCausalLM
from omni.stages.llm.models.qwen2 import Qwen2ForCausalLM
from omni.stages.llm.models.qwen2_audio import Qwen2AudioForCausalLM
from omni.stages.llm.models.qwen2_vl import Qwen2VLForCausalLM
from omni.stages.llm.models.qwen3 import Qwen3ForCausalLM
from omni.stages.llm.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    # The language model only; the vision tower is the vision encoder stage.
    "Qwen2VLForConditionalGeneration": Qwen2VLForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2VLForCausalLM,
    # The language model only; the audio tower and projector are the audio encoder stage.
    "Qwen2AudioForConditionalGeneration": Qwen2AudioForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(config: Any) -> type[CausalLM]:
    """The native class for `config.architectures[0]`; ValueError naming the supported ones."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(
            f"config.json has no 'architectures' entry; expected one of {supported_architectures()}"
        )
    name = architectures[0]
    model_class = MODEL_REGISTRY.get(name)
    if model_class is None:
        raise ValueError(
            f"architecture {name!r} is not supported; supported: {supported_architectures()}"
        )
    return model_class
