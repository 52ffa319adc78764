"""Test and benchmark helpers: random paged batches and a float64 naive reference.

Kept in the package (not under tests/) because the GPU benchmark builds the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omni.stages.llm.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class RequestShape:
    """One request of a test batch: `prefix_len` tokens already cached, `query_len` new."""

    prefix_len: int
    query_len: int

    def __post_init__(self) -> None:
        if self.prefix_len < 0 or self.query_len < 0:
            raise ValueError(f"prefix_len and query_len must be >= 0, got {self}")

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.query_len


@dataclass
class PagedBatch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata


def build_paged_batch(
    requests: Sequence[RequestShape],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    num_padding_tokens: int = 0,
    spare_blocks: int = 3,
    seed: int = 0,
) -> PagedBatch:
    """A random batch whose cached prefixes are already in a randomly paged cache.

    Blocks are handed out in a shuffled order (block 0, the null block, never) so a kernel
    that ignores the block table gets the wrong answer. `num_padding_tokens` extra tokens
    follow the last request with slot -1, as in a padded CUDA-graph batch.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-r.seq_len // block_size) for r in requests]
    num_blocks = 1 + sum(blocks_per_req) + spare_blocks
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max([*blocks_per_req, 1])
    block_tables = torch.zeros(len(requests), max_blocks, dtype=torch.int32)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    num_tokens = sum(r.query_len for r in requests) + num_padding_tokens
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64)
    query_start_loc = [0]
    for req, (shape, n_blocks) in enumerate(zip(requests, blocks_per_req, strict=True)):
        ids = [order.pop() for _ in range(n_blocks)]
        block_tables[req, :n_blocks] = torch.tensor(ids, dtype=torch.int32)
        start = query_start_loc[-1]
        positions = torch.arange(shape.prefix_len, shape.seq_len)
        table = torch.tensor(ids, dtype=torch.int64)
        if shape.query_len:
            slot_mapping[start : start + shape.query_len] = (
                table[positions // block_size] * block_size + positions % block_size
            )
        query_start_loc.append(start + shape.query_len)
    # Slots that the new tokens will fill hold garbage, so a kernel that reads before the
    # write, or a write that lands in the wrong slot, shows up.
    valid = slot_mapping >= 0
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    flat[:, slot_mapping[valid]] = 1e3
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([r.seq_len for r in requests], dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=slot_mapping.to(device),
        max_query_len=max([r.query_len for r in requests], default=0),
        max_seq_len=max([r.seq_len for r in requests], default=0),
        is_decode_only=all(r.query_len == 1 for r in requests),
    )
    return PagedBatch(
        query=query.to(device=device, dtype=dtype),
        key=key.to(device=device, dtype=dtype),
        value=value.to(device=device, dtype=dtype),
        kv_cache=cache.to(device=device, dtype=dtype),
        meta=meta,
    )


def naive_paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Float64, one token and one head at a time, straight from the contract's definition.

    Takes the cache *before* the write and the new K/V separately, so it checks the write
    too. Returns float64 [num_tokens, num_heads, head_dim]; unowned tokens are zeros.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    cache = kv_cache.detach().to("cpu", torch.float64).clone()
    new_k = key.detach().to("cpu", torch.float64)
    new_v = value.detach().to("cpu", torch.float64)
    slots = meta.slot_mapping.cpu().tolist()
    for token, slot in enumerate(slots):
        if slot >= 0:
            cache[0, slot // block_size, slot % block_size] = new_k[token]
            cache[1, slot // block_size, slot % block_size] = new_v[token]
    q = query.detach().to("cpu", torch.float64)
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float64)
    starts = meta.query_start_loc.cpu().tolist()
    seq_lens = meta.seq_lens.cpu().tolist()
    tables = meta.block_tables.cpu()
    for req, seq_len in enumerate(seq_lens):
        query_len = starts[req + 1] - starts[req]
        positions = torch.arange(seq_len)
        blocks = tables[req, positions // block_size].long()
        keys = cache[0, blocks, positions % block_size]  # [seq_len, kv_heads, head_dim]
        values = cache[1, blocks, positions % block_size]
        for i in range(query_len):
            visible = seq_len - query_len + i + 1
            for h in range(num_heads):
                kv = h // group
                scores = keys[:visible, kv] @ q[starts[req] + i, h] * scale
                weights = torch.softmax(scores, dim=0)
                out[starts[req] + i, h] = weights @ values[:visible, kv]
    return out
