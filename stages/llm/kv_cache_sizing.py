"""How many KV blocks fit, and allocating them.

On a GPU the cache gets what is left of `gpu_memory_utilization` of the card after the weights
and the activation peak of the largest step (measured by running that step once). On the CPU it
gets `cpu_kv_cache_gib`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from omni.stages.llm.models.base import CausalLM
from omni.stages.llm.step_inputs import HostStepInputs, to_device

if TYPE_CHECKING:
    from omni.stages.llm.model_runner import ModelRunner

# Kept free for CUDA-graph pools, sampler temporaries and allocator fragmentation.
_GPU_HEADROOM_BYTES = 1 << 30


def kv_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    return model.kv_cache_spec.block_bytes(block_size, dtype)


def allocate_kv_caches(
    model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    # Zero-filled, so the null block and padded graph rows read finite values. The layout is
    # the model's: [2, ...] keys and values, or MLA's single latent plane [1, ...].
    spec = model.kv_cache_spec
    shape = spec.layer_shape(num_blocks, block_size)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]


def _profile_inputs(num_tokens: int, block_size: int, mrope: bool) -> HostStepInputs:
    """One request prefilling num_tokens tokens: the largest step the scheduler can issue."""
    num_blocks = math.ceil(num_tokens / block_size)
    positions = np.arange(num_tokens, dtype=np.int64)
    return HostStepInputs(
        token_ids=np.zeros(num_tokens, np.int64),
        positions=positions,
        query_start_loc=np.array([0, num_tokens], np.int32),
        seq_lens=np.array([num_tokens], np.int32),
        block_tables=np.arange(1, num_blocks + 1, dtype=np.int32)[None, :],
        slot_mapping=positions + block_size,
        logits_indices=np.array([num_tokens - 1], np.int64),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        rope_positions=np.broadcast_to(positions, (3, num_tokens)).copy() if mrope else None,
    )


@torch.inference_mode()
def num_blocks_for_memory(runner: ModelRunner) -> int:
    config, model = runner.config, runner.model
    block_bytes = kv_block_bytes(model, runner.block_size, runner.dtype)
    if runner.device.type != "cuda":
        return max(2, int(config.cpu_kv_cache_gib * (1 << 30)) // block_bytes)

    num_tokens = min(config.max_num_batched_tokens, runner.max_model_len)
    host = _profile_inputs(num_tokens, runner.block_size, runner.uses_mrope)
    profile_blocks = host.block_tables.shape[1] + 1
    caches = allocate_kv_caches(
        model, profile_blocks, runner.block_size, runner.dtype, runner.device
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated()
    inputs = to_device(host, runner.device)
    hidden = model(inputs.token_ids, inputs.positions, caches, inputs.attn, runner.attn_backend)
    # The logits of a full batch of sequences are the other large transient.
    rows = hidden[:1].expand(config.max_num_seqs, -1).contiguous()
    model.compute_logits(rows)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - profile_blocks * block_bytes
    activations = torch.cuda.max_memory_allocated() - allocated_before
    del caches, hidden, rows
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    outside_torch = total - free - torch.cuda.memory_reserved()
    budget = (
        total * config.gpu_memory_utilization
        - outside_torch
        - peak
        - _graph_pool_bytes(runner, activations, num_tokens)
        - _GPU_HEADROOM_BYTES
    )
    num_blocks = int(budget // block_bytes)
    if num_blocks < 2:
        raise ValueError(
            f"no room for the KV cache: weights and activations take {peak / 2**30:.1f} GiB of "
            f"{total / 2**30:.1f} GiB at gpu_memory_utilization={config.gpu_memory_utilization}"
        )
    return num_blocks


def _graph_pool_bytes(runner: ModelRunner, activations: int, num_tokens: int) -> int:
    """What the mixed CUDA graphs' private pool will hold: the activations of the largest
    captured step, scaled from the profiled step's (the pool is not the caching allocator's,
    so the eager peak does not cover it). The decode graphs' share fits the headroom."""
    config = runner.config
    if config.enforce_eager:
        return 0
    return int(activations * min(1.0, config.max_graph_tokens / max(num_tokens, 1)))
