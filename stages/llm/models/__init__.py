"""Native model definitions (Llama, Qwen2, Qwen3) and their checkpoint loader."""

from omni.stages.llm.models.base import CausalLM, KVCacheSpec
from omni.stages.llm.models.loader import load_model, resolve_model_path
from omni.stages.llm.models.registry import get_model_class, supported_architectures

__all__ = [
    "CausalLM",
    "KVCacheSpec",
    "get_model_class",
    "load_model",
    "resolve_model_path",
    "supported_architectures",
]
