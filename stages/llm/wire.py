"""The LLM stage's request format on the wire, written and read in one place.

A request is tensors plus plain params (the transport's typed message carries both):

- tensors: `prompt_token_ids` int64 [P]; `mm_embedding_<i>` [length_i, hidden] for each item
  that was encoded; `mrope_positions` int64 [3, P] for M-RoPE models.
- params: `sampling` (SamplingParams fields), `cache_salt`, `mm_items` ([item_hash, offset,
  length] per item, in order), `mrope_position_delta`; or `probe: true` to ask only how many
  prompt tokens the prefix cache holds (the orchestrator's question before it encodes items).
- A text prompt may come as `params["prompt"]` instead of token ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omni.cache.block_hash import MultiModalPlaceholder
from omni.stages.llm.mm_inputs import MultiModalInputs
from omni.stages.llm.sampling_params import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass(frozen=True)
class LLMRequestSpec:
    prompt: str | list[int]
    sampling_params: SamplingParams
    mm: MultiModalInputs | None = None
    cache_salt: str | None = None
    probe: bool = False


def encode_llm_request(
    prompt_token_ids: list[int],
    sampling: Mapping[str, Any] | None = None,
    mm: MultiModalInputs | None = None,
    cache_salt: str | None = None,
    probe: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"prompt_token_ids": torch.tensor(prompt_token_ids, dtype=torch.int64)}
    params: dict[str, Any] = {"sampling": dict(sampling or {})}
    if cache_salt is not None:
        params["cache_salt"] = cache_salt
    if probe:
        params["probe"] = True
    if mm is not None:
        params["mm_items"] = [[p.item_hash, p.offset, p.length] for p in mm.placeholders]
        for index, embedding in enumerate(mm.embeddings):
            if embedding is not None:
                tensors[f"mm_embedding_{index}"] = embedding.contiguous()
        if mm.mrope_positions is not None:
            tensors["mrope_positions"] = torch.from_numpy(mm.mrope_positions)
            params["mrope_position_delta"] = int(mm.mrope_position_delta)
    return tensors, params


def decode_llm_request(
    inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> LLMRequestSpec:
    """Raises ValueError naming what is malformed."""
    prompt: str | list[int]
    if "prompt_token_ids" in inputs:
        prompt = inputs["prompt_token_ids"].flatten().tolist()
    elif isinstance(params.get("prompt"), str):
        prompt = params["prompt"]
    else:
        raise ValueError("a request needs params['prompt'] (text) or prompt_token_ids")
    sampling = params.get("sampling") or {}
    unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unknown sampling parameters {unknown}")
    return LLMRequestSpec(
        prompt=prompt,
        sampling_params=SamplingParams(**sampling),
        mm=_decode_mm(inputs, params),
        cache_salt=params.get("cache_salt"),
        probe=bool(params.get("probe", False)),
    )


def _decode_mm(
    inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> MultiModalInputs | None:
    items = params.get("mm_items")
    if not items:
        return None
    placeholders = []
    for index, item in enumerate(items):
        if not (isinstance(item, list | tuple) and len(item) == 3):
            raise ValueError(f"mm_items[{index}] must be [item_hash, offset, length]")
        placeholders.append(MultiModalPlaceholder(str(item[0]), int(item[1]), int(item[2])))
    embeddings = [inputs.get(f"mm_embedding_{i}") for i in range(len(placeholders))]
    mrope = inputs.get("mrope_positions")
    return MultiModalInputs(
        placeholders=placeholders,
        embeddings=embeddings,
        mrope_positions=None if mrope is None else mrope.to(torch.int64).numpy(),
        mrope_position_delta=int(params.get("mrope_position_delta", 0)),
    )
