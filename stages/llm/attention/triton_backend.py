"""Host side of the Triton backend: launch configuration and the kernel launches.

Every decision here is made from host ints (shapes and the metadata's max_* fields), never
from device values, so a decode step stays CUDA-graph capturable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from omni.stages.llm.attention import triton_kernels
from omni.stages.llm.attention.metadata import AttentionMetadata

LOG2_E = 1.4426950408889634
# tl.dot needs at least 16 rows and 16 columns in each operand.
MIN_DOT_DIM = 16
MAX_SPLITS = 64


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _next_power_of_two(value: int) -> int:
    # Plain int math: triton.next_power_of_2 is a constexpr function, slow on the host path.
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


@dataclass(frozen=True)
class AttentionLaunchConfig:
    """Tile shape of one unified-attention launch.

    block_m: rows of a program's query tile (query tokens x the query heads of one kv head).
    block_q: query tokens per program, block_m // q_per_kv.
    tile: context positions streamed per loop step (may span several cache blocks).
    num_splits: context slices per query tile (flash-decoding); 1 means no split.
    """

    block_m: int
    block_q: int
    tile: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "tile"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value < MIN_DOT_DIM:
                raise ValueError(f"{name} is {value}; it must be a power of two >= {MIN_DOT_DIM}")
        if self.block_q < 1:
            raise ValueError(f"block_q is {self.block_q}; it must be >= 1")
        if not _is_power_of_two(self.num_splits) or self.num_splits > MAX_SPLITS:
            raise ValueError(
                f"num_splits is {self.num_splits}; it must be a power of two <= {MAX_SPLITS}"
            )
        if not _is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps is {self.num_warps}; it must be a power of two")


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton's interpreter on CPU: any small number keeps the grid honest.
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


@functools.lru_cache(maxsize=512)
def choose_launch_config(
    *,
    num_heads: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    num_reqs: int,
    num_sms: int,
) -> AttentionLaunchConfig:
    """Pick tile sizes: small query tiles for decode, big ones for prefill.

    Decode tiles hold one token's query-head group (padded to 16 rows for tl.dot). When a
    decode batch has too few (request, kv head) programs to fill the GPU and the contexts are
    long, the context is split across programs and merged afterwards.
    """
    q_per_kv = num_heads // num_kv_heads
    group_rows = _next_power_of_two(q_per_kv)
    if max_query_len <= 1:
        # Measured on an H100 (batch 256, context 640): 64-position tiles, 4 warps, 2 stages.
        block_m = max(MIN_DOT_DIM, group_rows)
        tile, num_warps, num_stages = 64, 4, 2
    else:
        # Prefill: enough query rows for a tensor-core sized tile, but no more than the
        # longest chunk needs (a chunk of 3 tokens should not pay for 128 rows).
        # 128 rows with 32-position tiles and 4 warps measured best on an H100 for 256 x
        # 512-token prompts at Qwen2.5-7B geometry (2.6 ms; 64 rows 2.7-3.3 ms, 64-position
        # tiles or 8 warps 2.9-3.4 ms).
        wanted_rows = _next_power_of_two(max_query_len * q_per_kv)
        block_m = min(max(MIN_DOT_DIM, group_rows, wanted_rows), max(128, group_rows))
        tile, num_warps, num_stages = 32, 4, 2
    block_q = max(1, block_m // q_per_kv)

    num_splits = 1
    query_tiles = num_reqs * math.ceil(max_query_len / block_q)
    programs = query_tiles * num_kv_heads
    if max_query_len <= block_q and programs < 2 * num_sms:
        # Each split should still stream a few tiles, or the merge costs more than it saves.
        by_occupancy = _next_power_of_two(math.ceil(4 * num_sms / max(programs, 1)))
        by_length = max(1, max_seq_len // (4 * tile))
        num_splits = min(by_occupancy, _next_power_of_two(by_length), MAX_SPLITS)
        if num_splits > by_length:
            num_splits //= 2
        num_splits = max(1, num_splits)
    return AttentionLaunchConfig(
        block_m=block_m,
        block_q=block_q,
        tile=tile,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def write_kv_cache_triton(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's K/V at its slot (slot -1 = padding, skipped)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _, _, block_size, _, _ = kv_cache.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    triton_kernels.write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=_next_power_of_two(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_next_power_of_two(head_dim),
        BLOCK_SIZE=block_size,
    )


def paged_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    config: AttentionLaunchConfig | None = None,
) -> torch.Tensor:
    """Unified paged attention over the cache (the new K/V must already be written)."""
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if config is None:
        config = choose_launch_config(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            num_reqs=meta.num_reqs,
            num_sms=_num_sms(query.device),
        )
    q_per_kv = num_heads // num_kv_heads
    if config.block_q * q_per_kv > config.block_m:
        raise ValueError(
            f"block_q {config.block_q} x {q_per_kv} query heads per kv head exceeds "
            f"block_m {config.block_m}"
        )
    head_dim_pad = max(MIN_DOT_DIM, _next_power_of_two(head_dim))
    split = config.num_splits > 1
    # Unsplit, tokens past the last request are never visited; zeros keep them defined. Split,
    # the merge kernel writes every token, padding included; so does a decode batch, whose
    # every token is a request of its own (a decode graph's padded rows too): no fill kernel.
    every_token_written = split or (meta.is_decode_only and num_tokens == meta.num_reqs)
    output = torch.empty_like(query) if every_token_written else torch.zeros_like(query)
    if num_tokens == 0 or meta.num_reqs == 0:
        return output.zero_()
    if split:
        partial_shape = (num_tokens, num_heads, config.num_splits)
        partial_out = torch.empty(
            (*partial_shape, head_dim_pad), dtype=torch.float32, device=query.device
        )
        partial_max = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
    else:
        partial_out = partial_max = partial_sum = output  # unused by the unsplit kernel
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # Triton's CPU interpreter computes bf16 dots on the raw bits (garbage), so off the GPU
    # the operands are widened first; on the GPU the tensor cores take bf16 directly.
    dot_in_fp32 = query.device.type != "cuda" and query.dtype == torch.bfloat16
    num_q_tiles = num_tokens // config.block_q + meta.num_reqs
    grid = (num_q_tiles, num_kv_heads, config.num_splits)
    triton_kernels.unified_attention_kernel[grid](
        output,
        query,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        partial_out,
        partial_max,
        partial_sum,
        scale * LOG2_E,
        meta.num_reqs,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        meta.block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_HEADS=num_heads,
        Q_PER_KV=q_per_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        TILE=config.tile,
        BLOCK_Q=config.block_q,
        BLOCK_M=config.block_m,
        NUM_SPLITS=config.num_splits,
        # fp32 stays fp32: TF32 would cost ~1e-3 relative error.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 or dot_in_fp32 else "tf32",
        DOT_IN_FP32=dot_in_fp32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split:
        triton_kernels.merge_splits_kernel[(num_tokens, num_heads)](
            output,
            partial_out,
            partial_max,
            partial_sum,
            meta.query_start_loc,
            meta.num_reqs,
            output.stride(0),
            output.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=config.num_splits,
        )
    return output


def check_triton_inputs(query: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """The kernels address the last dim as contiguous and read K/V in the query's dtype."""
    if kv_cache.dtype != query.dtype:
        raise ValueError(
            f"the triton backend needs kv_cache dtype {kv_cache.dtype} to match query {query.dtype}"
        )
    if query.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("the triton backend needs query and kv_cache contiguous in head_dim")


def attend_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write the new K/V, then run unified paged attention; the `attend` triton path."""
    check_triton_inputs(query, kv_cache)
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("the triton backend needs key and value contiguous in head_dim")
    write_kv_cache_triton(key, value, kv_cache, meta.slot_mapping)
    return paged_attention_triton(query, kv_cache, meta, scale)


def mla_launch_config(
    num_heads: int, latent_dim: int = 576, element_size: int = 2
) -> AttentionLaunchConfig:
    """Tiles for MLA's absorbed attention: one kv head of kv_lora_rank + rope dims (576,
    padded to 1024) shared by every query head. A program takes one token's query heads (16
    rows for DeepSeek-V2-Lite) and streams 16 positions at a time, so the [rows, 1024] float32
    accumulator stays in registers and the bf16 K and V tiles of two pipeline stages (4 x 32
    KiB) fit in shared memory; the default tiles would need 512 KiB. Float32 values get one
    stage."""
    block_m = max(MIN_DOT_DIM, _next_power_of_two(num_heads))
    tile = 16
    two_stages = 2 * 2 * tile * _next_power_of_two(latent_dim) * element_size
    stages = 2 if two_stages <= 200 * 1024 else 1
    return AttentionLaunchConfig(
        block_m=block_m, block_q=1, tile=tile, num_warps=8, num_stages=stages
    )


def paged_attention_mla_triton(
    query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Unified paged attention for MLA's absorbed form (`attention/mla.py`): query
    [T, heads, kv_lora_rank + rope] over one shared kv head, whose key and value planes are the
    same cached latents."""
    check_triton_inputs(query, kv_cache)
    config = mla_launch_config(query.shape[1], query.shape[2], query.element_size())
    return paged_attention_triton(query, kv_cache, meta, scale, config)
