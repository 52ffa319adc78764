"""`n` samples and log-probabilities over HTTP, on a tiny random Qwen2 checkpoint in fp32.

- `n=4` at temperature 1 returns four choices, choice i being exactly what the offline engine
  samples with seed + i; the prompt was prefilled once: the prefix-cache counters show the
  other three samples served its full blocks from the first one's;
- `top_logprobs=5` at temperature 0 equals transformers' top-5 token ids and their
  log-probabilities (within 1e-4) at every step, offline and through chat completions, whole
  and streamed; completions' `logprobs=5` gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fixtures_models import load_reference
from server_fixtures import (
    ENGINE_OPTIONS,
    MESSAGES,
    NO_PERCEPTION,
    live_server,
    metric,
    tiny_chat_model,
    wait_for_metric,
)

from omni import LLM, SamplingParams
from omni.server.app import build_app
from omni.server.config import ServeConfig
from omni.server.pipeline import Pipeline

MODEL = "tiny"
BLOCK = int(ENGINE_OPTIONS["block_size"])
STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("samples-model"))


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", num_kv_blocks=64)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    config = ServeConfig(
        **NO_PERCEPTION,
        model=str(model_dir), served_model_name=MODEL, single_process=True, speech=False,
        devices={"llm": ("cpu",)}, engine_options={**ENGINE_OPTIONS, "dtype": "float32"},
    )  # fmt: skip
    with Pipeline(config) as pipeline, live_server(build_app(pipeline.orchestrator)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def test_n_samples_share_one_prefill(server: str, llm: LLM) -> None:
    # Two full blocks and one more token: each later sample recomputes only that token.
    prompt = [(7 * i + 3) % 300 + 20 for i in range(2 * BLOCK + 1)]
    queries = metric(server, "omni:prefix_cache_queries_total")
    hits = metric(server, "omni:prefix_cache_hits_total")
    reply = client(server).completions.create(
        model=MODEL, prompt=prompt, n=4, temperature=1.0, seed=11, max_tokens=STEPS
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    generated = 0
    for index, choice in enumerate(reply.choices):
        params = SamplingParams(temperature=1.0, seed=11 + index, max_tokens=STEPS)
        [alone] = llm.generate([prompt], params, use_tqdm=False)
        assert choice.text == alone.outputs[0].text
        generated += len(alone.outputs[0].token_ids)
    assert len({c.text for c in reply.choices}) > 1
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == generated
    wait_for_metric(server, "omni:prefix_cache_queries_total", queries + 4 * len(prompt))
    # Samples 1-3 found the first one's two blocks: 3 x 32 tokens, so the prompt's tokens
    # were computed 33 + 3 times, not 4 x 33.
    wait_for_metric(server, "omni:prefix_cache_hits_total", hits + 3 * 2 * BLOCK)
    assert metric(server, "omni:prefix_cache_hits_total") == hits + 3 * 2 * BLOCK


def test_offline_n_returns_n_completions(llm: LLM) -> None:
    [output] = llm.generate(["Hello"], SamplingParams(n=3, temperature=1.0, seed=2,
                                                      max_tokens=4), use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    for index, completion in enumerate(output.outputs):
        [alone] = llm.generate(["Hello"], SamplingParams(temperature=1.0, seed=2 + index,
                                                         max_tokens=4), use_tqdm=False)
        assert completion.token_ids == alone.outputs[0].token_ids


@pytest.fixture(scope="module")
def reference(model_dir: Path, llm: LLM) -> dict[str, Any]:
    """The chat prompt's greedy tokens and transformers' top-5 at each step, in fp32."""
    from transformers import AutoModelForCausalLM

    prompt = llm.chat_prompt_ids(MESSAGES)
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=STEPS, logprobs=5),
                         use_tqdm=False)
    tokens = out.outputs[0].token_ids
    model = load_reference(AutoModelForCausalLM, model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logprobs = logits[len(prompt) - 1 : len(prompt) - 1 + STEPS].log_softmax(dim=-1)
    top = logprobs.topk(5, dim=-1)
    return {
        "omni": out.outputs[0].logprobs,
        "tokens": tokens,
        "chosen": logprobs.gather(1, torch.tensor(tokens)[:, None]).squeeze(1).tolist(),
        "top_ids": top.indices.tolist(),
        "top_values": top.values.tolist(),
    }


def test_offline_top5_equals_transformers(reference: dict[str, Any]) -> None:
    omni = reference["omni"]
    assert len(omni) == STEPS
    for step, entry in enumerate(omni):
        assert entry.top_token_ids == reference["top_ids"][step]
        assert entry.top_logprobs == pytest.approx(reference["top_values"][step], abs=1e-4)
        assert entry.logprob == pytest.approx(reference["chosen"][step], abs=1e-4)


def _chat(server: str, **fields: Any) -> Any:
    return client(server).chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=STEPS, logprobs=True,
        top_logprobs=5, **fields,
    )


def test_chat_top_logprobs_equal_transformers(
    server: str, reference: dict[str, Any], llm: LLM
) -> None:
    assert llm.tokenizer is not None
    content = _chat(server).choices[0].logprobs.content
    assert len(content) == STEPS
    for step, entry in enumerate(content):
        assert entry.token == llm.tokenizer.decode([reference["tokens"][step]])
        assert entry.logprob == pytest.approx(reference["chosen"][step], abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [
            llm.tokenizer.decode([i]) for i in reference["top_ids"][step]
        ]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            reference["top_values"][step], abs=1e-4
        )
    streamed = []
    for chunk in _chat(server, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content or []
    # The second request reuses the first one's prefix blocks, so its logits come from a
    # differently shaped prefill: the same tokens, logprobs equal to float rounding.
    assert [_tokens_of(e) for e in streamed] == [_tokens_of(e) for e in content]
    for got, want in zip(streamed, content, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [t.logprob for t in want.top_logprobs], abs=1e-4
        )


def _tokens_of(entry: Any) -> list[tuple[str, list[int] | None]]:
    """An entry's chosen token and its alternatives, with their bytes, without logprobs."""
    return [(entry.token, entry.bytes)] + [(t.token, t.bytes) for t in entry.top_logprobs]


def test_completion_logprobs_five(server: str, reference: dict[str, Any], llm: LLM) -> None:
    prompt = llm.chat_prompt_ids(MESSAGES)
    choice = client(server).completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=STEPS, logprobs=5
    ).choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs == pytest.approx(reference["chosen"], abs=1e-4)
    assert choice.logprobs.top_logprobs is not None
    for step, top in enumerate(choice.logprobs.top_logprobs):
        best = max(top, key=lambda token: top[token])
        assert best == llm.tokenizer.decode([reference["top_ids"][step][0]])  # type: ignore[union-attr]
        assert top[best] == pytest.approx(reference["top_values"][step][0], abs=1e-4)
