"""`attend`: the one call a model's attention layer makes, whatever the backend."""

from __future__ import annotations

import torch
from omni.stages.llm.attention.metadata import AttentionMetadata
from omni.stages.llm.attention.torch_backend import paged_attention_torch, write_kv_cache_torch

BACKENDS = ("torch", "triton")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_attention_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    """Shape and dtype checks that need no device sync (so they are safe in CUDA graphs)."""
    if query.dim() != 3:
        raise ValueError(
            f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}"
        )
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, cache_head_dim = kv_cache.shape[3], kv_cache.shape[4]
    expected_kv = (num_tokens, num_kv_heads, head_dim)
    for name, tensor in (("key", key), ("value", value)):
        if tuple(tensor.shape) != expected_kv:
            raise ValueError(f"{name} must be {expected_kv}, got {tuple(tensor.shape)}")
    if cache_head_dim != head_dim:
        raise ValueError(f"kv_cache head_dim is {cache_head_dim}; query head_dim is {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    for name, tensor in (("query", query), ("kv_cache", kv_cache)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {tensor.dtype} is not one of {SUPPORTED_DTYPES}")
    if meta.num_tokens != num_tokens:
        raise ValueError(
            f"slot_mapping has {meta.num_tokens} entries but the batch has {num_tokens} tokens"
        )
    if meta.query_start_loc.shape[0] != meta.num_reqs + 1:
        raise ValueError(
            f"query_start_loc has {meta.query_start_loc.shape[0]} entries; "
            f"expected num_reqs + 1 = {meta.num_reqs + 1}"
        )
    if meta.block_tables.dim() != 2 or meta.block_tables.shape[0] != meta.num_reqs:
        raise ValueError(
            f"block_tables must be [num_reqs={meta.num_reqs}, max_blocks], "
            f"got {tuple(meta.block_tables.shape)}"
        )


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Write the new tokens' K/V into the paged cache, then attend causally over each context.

    query [num_tokens, num_heads, head_dim]; key/value [num_tokens, num_kv_heads, head_dim];
    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]. Returns
    [num_tokens, num_heads, head_dim] in the query's dtype. Tokens that belong to no request
    (past query_start_loc[-1]) come back as zeros.
    """
    check_attention_inputs(query, key, value, kv_cache, meta)
    if backend == "torch":
        write_kv_cache_torch(key, value, kv_cache, meta.slot_mapping)
        return paged_attention_torch(query, kv_cache, meta, scale)
    if backend == "triton":
        # Imported here so CPU-only users never pay for (or depend on) compiling Triton.
        from omni.stages.llm.attention.triton_backend import attend_triton

        return attend_triton(query, key, value, kv_cache, meta, scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
