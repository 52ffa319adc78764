"""Multi-modal embeddings spliced at placeholder positions: the engine's tokens equal
transformers' generate from the same inputs_embeds, whole or chunked, and two items with the
same placeholder layout never share KV blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_models import make_tiny_checkpoint
from omni.cache.block_hash import MultiModalPlaceholder
from omni.stages.llm.mm_inputs import MultiModalInputs
from transformers import AutoModelForCausalLM

from omni import LLM, SamplingParams

NEW_TOKENS = 8
PLACEHOLDER_ID = 3
# Text, a 20-token item, more text: the item straddles blocks of 8 tokens.
PROMPT = [11, 12, 13, 14, 15] + [PLACEHOLDER_ID] * 20 + [16, 17, 18, 19]
ITEM = MultiModalPlaceholder(item_hash="a" * 64, offset=5, length=20)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen2")
    make_tiny_checkpoint("qwen2", path)
    return path


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def item_embedding(hf_model, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    hidden = hf_model.config.hidden_size
    return torch.randn(ITEM.length, hidden, generator=gen) * 0.5


def reference(hf_model, embedding: torch.Tensor, prompt: list[int] = PROMPT) -> list[int]:
    embeds = hf_model.get_input_embeddings()(torch.tensor([prompt])).detach().clone()
    embeds[0, ITEM.offset : ITEM.offset + ITEM.length] = embedding
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, -NEW_TOKENS:].tolist()


def mm(embedding: torch.Tensor, item_hash: str = ITEM.item_hash) -> MultiModalInputs:
    placeholder = MultiModalPlaceholder(item_hash, ITEM.offset, ITEM.length)
    return MultiModalInputs(placeholders=[placeholder], embeddings=[embedding])


def run(llm: LLM, request_id: str, inputs: MultiModalInputs) -> tuple[list[int], int]:
    engine = llm.engine
    engine.add_request(request_id, PROMPT, GREEDY, mm=inputs, stream=False)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == request_id and output.finished:
                return output.outputs[0].token_ids, output.num_cached_tokens
    raise AssertionError("request did not finish")


@pytest.mark.parametrize("token_budget", [4096, 7])
def test_spliced_embeddings_match_transformers(checkpoint: Path, hf_model, token_budget) -> None:
    first, second = item_embedding(hf_model, 1), item_embedding(hf_model, 2)
    expected_first, expected_second = reference(hf_model, first), reference(hf_model, second)
    assert expected_first != expected_second  # the test can tell the items apart
    llm = LLM(
        str(checkpoint),
        device="cpu",
        num_kv_blocks=64,
        block_size=8,
        max_num_batched_tokens=token_budget,
    )
    assert run(llm, "first", mm(first)) == (expected_first, 0)
    # Same placeholder tokens, another item: every block overlaps the item (the first block's
    # last three tokens are its start), so nothing is shared.
    assert run(llm, "second", mm(second, item_hash="b" * 64)) == (expected_second, 0)
    # The same item again: every full block before the last prompt token is served from cache.
    assert run(llm, "again", mm(first)) == (expected_first, 24)


def test_bad_multimodal_inputs_are_rejected(checkpoint: Path, hf_model) -> None:
    llm = LLM(str(checkpoint), device="cpu", num_kv_blocks=16)
    hidden = hf_model.config.hidden_size
    wrong_rows = MultiModalInputs([ITEM], [torch.zeros(19, hidden)])
    with pytest.raises(ValueError, match=r"item 0 has embeddings of shape \(19, "):
        llm.engine.add_request("a", PROMPT, GREEDY, mm=wrong_rows)
    past_end = MultiModalInputs(
        [MultiModalPlaceholder("c" * 64, 20, 20)], [torch.zeros(20, hidden)]
    )
    with pytest.raises(ValueError, match=r"covers tokens 20\.\.39, past the prompt's 29 tokens"):
        llm.engine.add_request("b", PROMPT, GREEDY, mm=past_end)
    assert not llm.engine.has_unfinished_requests()


def test_item_inside_a_prefix_hit_needs_no_embedding(checkpoint: Path, hf_model) -> None:
    embedding = item_embedding(hf_model, 1)
    prompt = [*PROMPT, *range(20, 30)]  # 39 tokens: the hit can cover all 25 through the item
    expected = reference(hf_model, embedding, prompt)

    llm = LLM(str(checkpoint), device="cpu", num_kv_blocks=64, block_size=8)
    engine = llm.engine
    assert engine.cached_prefix_tokens(prompt, [ITEM]) == 0
    engine.add_request("first", prompt, GREEDY, mm=mm(embedding), stream=False)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.outputs[0].token_ids for o in outputs] == [expected]
    # The probe changes no statistics, and another item's hash gets no hit past block 0's start.
    queries = engine.kv_cache.prefix_cache_queries
    assert engine.cached_prefix_tokens(prompt, [ITEM]) == 32
    assert engine.cached_prefix_tokens(prompt, [MultiModalPlaceholder("b" * 64, 5, 20)]) == 0
    assert engine.kv_cache.prefix_cache_queries == queries

    skipped = MultiModalInputs(placeholders=[ITEM], embeddings=[None])
    engine.add_request("second", prompt, GREEDY, mm=skipped, stream=False)
    done = [o for _ in range(NEW_TOKENS + 1) for o in engine.step()]
    assert [o.outputs[0].token_ids for o in done] == [expected]
    assert done[0].num_cached_tokens == 32

    # Evicted meanwhile: the request fails with a clear error instead of reading garbage.
    engine.kv_cache.reset_prefix_cache()
    engine.add_request("third", prompt, GREEDY, mm=skipped, stream=False)
    [failed] = engine.step()
    assert failed.finished and failed.outputs[0].finish_reason == "abort"
    assert failed.error == (
        "multi-modal item 0 was sent without its embedding, but the prefix cache no longer "
        "holds it; send the request again with it"
    )
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_free_blocks == 63
