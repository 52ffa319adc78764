"""Paged attention: the metadata contract and the backends behind `attend`."""

from omni.stages.llm.attention.api import BACKENDS, attend
from omni.stages.llm.attention.metadata import AttentionMetadata

__all__ = ["BACKENDS", "AttentionMetadata", "attend"]
