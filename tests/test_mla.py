"""DeepSeek-V2's multi-head latent attention over the paged latent cache: the cache layout, the
latent write, and the absorbed form (the GPU path) against the expanded one (the CPU path,
which matches transformers: greedy tokens are compared in test_llm_engine.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fixtures_models import greedy_native, load_reference, make_tiny_checkpoint
from omni.stages.llm.attention.mla import (
    attend_mla_absorbed,
    attend_mla_expanded,
    write_latent_cache,
)
from omni.stages.llm.attention.reference import RequestShape, build_paged_batch
from omni.stages.llm.attention.torch_backend import paged_attention_torch
from omni.stages.llm.kv_cache_sizing import allocate_kv_caches, kv_block_bytes
from omni.stages.llm.models import load_model
from transformers import AutoModelForCausalLM

# Decode rows, a chunk on a cached prefix, a fresh prompt, a request with no new tokens.
SHAPES = [RequestShape(5, 1), RequestShape(20, 7), RequestShape(0, 9), RequestShape(10, 0)]
HEADS, NOPE, ROPE, V_DIM, RANK = 4, 16, 8, 12, 32


def latent_batch(seed: int) -> tuple[torch.Tensor, ...]:
    """A paged batch whose one-plane cache holds random latents, plus MLA's query parts."""
    batch = build_paged_batch(
        SHAPES, num_heads=HEADS, num_kv_heads=1, head_dim=RANK + ROPE, block_size=4,
        dtype=torch.float32, seed=seed,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    cache = batch.kv_cache[:1].clone()
    num_tokens = batch.query.shape[0]
    latent = torch.randn(num_tokens, RANK, generator=gen)
    k_pe = torch.randn(num_tokens, ROPE, generator=gen)
    write_latent_cache(latent, k_pe, cache, batch.meta.slot_mapping)
    q_nope = torch.randn(num_tokens, HEADS, NOPE, generator=gen)
    q_pe = torch.randn(num_tokens, HEADS, ROPE, generator=gen)
    kv_b_weight = torch.randn(HEADS * (NOPE + V_DIM), RANK, generator=gen) / RANK**0.5
    return batch.meta, cache, q_nope, q_pe, kv_b_weight, latent, k_pe


def test_latent_write_lands_in_each_token_s_slot_only() -> None:
    meta, cache, *_, latent, k_pe = latent_batch(seed=0)
    flat = cache.view(-1, RANK + ROPE)
    for token, slot in enumerate(meta.slot_mapping.tolist()):
        assert torch.equal(flat[slot], torch.cat([latent[token], k_pe[token]]))
    with pytest.raises(ValueError, match=r"an MLA cache must be \[1, num_blocks"):
        write_latent_cache(latent, k_pe, torch.zeros(2, 4, 4, 1, RANK + ROPE), meta.slot_mapping)


def test_absorbed_attention_equals_expanded() -> None:
    meta, cache, q_nope, q_pe, kv_b_weight, *_ = latent_batch(seed=1)
    scale = (NOPE + ROPE) ** -0.5
    expanded = attend_mla_expanded(q_nope, q_pe, cache, meta, kv_b_weight, scale)
    absorbed = attend_mla_absorbed(
        q_nope, q_pe, cache, meta, kv_b_weight, scale, paged_attention_torch
    )
    assert expanded.shape == (q_nope.shape[0], HEADS, V_DIM)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-5, atol=1e-5)
    # Every token belongs to a request, so every row is written.
    assert torch.count_nonzero(expanded) == expanded.numel()


def test_deepseek_cache_is_one_latent_plane(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint("deepseek_v2", tmp_path / "ds")
    model, _ = load_model(str(folder), load_format="dummy")
    spec = model.kv_cache_spec
    # kv_lora_rank 32 + qk_rope_head_dim 8 values a token, one plane, over 2 layers.
    assert (spec.planes, spec.num_kv_heads, spec.head_dim, spec.num_layers) == (1, 1, 40, 2)
    caches = allocate_kv_caches(model, 5, 16, torch.bfloat16, torch.device("cpu"))
    assert [tuple(c.shape) for c in caches] == [(1, 5, 16, 1, 40)] * 2
    assert kv_block_bytes(model, 16, torch.bfloat16) == 2 * 16 * 40 * 2
    assert model.model.layers[0].self_attn.scale == pytest.approx(24**-0.5)


def test_q_compression_and_yarn_match_transformers(tmp_path: Path) -> None:
    # DeepSeek-V2 (not Lite): q through q_a_proj / q_a_layernorm / q_b_proj; DeepSeek's YaRN
    # with mscale_all_dim, which also scales the softmax; plain greedy routing.
    rope = {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0,
    }
    folder = make_tiny_checkpoint(
        "deepseek_v2", tmp_path / "v2", q_lora_rank=16, rope_parameters=rope,
        topk_method="greedy", n_group=1, topk_group=1,
    )
    model, _ = load_model(str(folder))
    mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert model.model.layers[1].self_attn.scale == pytest.approx(24**-0.5 * mscale**2)
    reference = load_reference(AutoModelForCausalLM, folder)
    prompt = [5, 17, 3, 250, 9, 41, 8, 100, 33, 2, 7, 64, 12, 90, 31, 4, 77, 21]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )[0, len(prompt):].tolist()
    assert greedy_native(model, prompt, 8) == expected
