"""Greedy token ids from omni's engine equal transformers' generate on the same weights, with
and without prefix-cache hits, preemption and chunked prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from omni import LLM, SamplingParams
from tests.fixtures_models import make_tiny_checkpoint

ARCHES = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "deepseek_v2"]
NEW_TOKENS = 12
# Mixed lengths: shorter than a block, exactly two blocks, and ragged ones.
PROMPT_LENGTHS = [5, 32, 17, 45, 9]


@pytest.fixture(scope="module", params=ARCHES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_checkpoint(request.param, path, dtype=torch.float32)
    return path


def make_prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def reference_greedy(
    path: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS
) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly new_tokens, like ignore_eos
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> tuple[list[list[int]], list[list[int]]]:
    vocab = AutoModelForCausalLM.from_pretrained(checkpoint).config.vocab_size
    prompts = make_prompts(vocab)
    return prompts, reference_greedy(checkpoint, prompts)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def omni_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_batch_matches_transformers(checkpoint: Path, expected) -> None:
    prompts, reference = expected
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", num_kv_blocks=64, block_size=16)
    assert omni_greedy(llm, prompts) == reference
    # Everything was freed: all usable blocks are back in the pool.
    assert llm.engine.kv_cache.num_free_blocks == 63


def test_prefix_cache_hits_give_same_tokens(checkpoint: Path, expected) -> None:
    prompts, reference = expected
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", num_kv_blocks=64, block_size=8)
    assert omni_greedy(llm, prompts) == reference
    hits_before = llm.engine.kv_cache.prefix_cache_hits
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    # Every full block but the one holding the last prompt token is served from cache.
    cached = [o.num_cached_tokens for o in outputs]
    assert cached == [(n - 1) // 8 * 8 for n in PROMPT_LENGTHS]
    assert llm.engine.kv_cache.prefix_cache_hits - hits_before == sum(cached)


def test_preemption_gives_same_tokens(checkpoint: Path, expected) -> None:
    prompts, reference = expected
    # 16 usable blocks of 4 tokens cannot hold five requests of up to 57 tokens at once.
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", num_kv_blocks=17, block_size=4)
    assert omni_greedy(llm, prompts) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_cache.num_free_blocks == 16


def test_chunked_prefill_gives_same_tokens(checkpoint: Path, expected) -> None:
    prompts, reference = expected
    llm = LLM(
        str(checkpoint),
        dtype="float32",
        device="cpu",
        num_kv_blocks=64,
        block_size=16,
        max_num_batched_tokens=7,
    )
    assert omni_greedy(llm, prompts) == reference
