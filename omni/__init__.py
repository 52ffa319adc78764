"""omni: a multi-modal pipeline inference engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from omni.llm import LLM
    from omni.stages.contracts.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy, so processes that only need the transport (stage workers, clients) do not pay for
    # importing torch and transformers.
    if name == "LLM":
        from omni.llm import LLM

        return LLM
    if name == "SamplingParams":
        from omni.stages.contracts.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'omni' has no attribute {name!r}")
