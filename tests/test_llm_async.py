"""Asynchronous scheduling (step N+1 launched before step N's tokens are read) gives exactly
the outputs of synchronous stepping: greedy and seeded tokens, stops, limits, preemption,
chunked prefill, prefix hits, aborts, penalties and grammars (whose sampling waits for the
previous step's tokens, but whose forward pass does not)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fixtures_models import make_tiny_checkpoint
from omni.stages.contracts.structured_outputs import StructuredOutputs

from omni import LLM, SamplingParams

PROMPT_LENGTHS = [5, 32, 17, 45, 9, 3]
CODE = r"[a-f]{3}-[0-9]{2}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen3")
    make_tiny_checkpoint("qwen3", path)
    return path


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def mixed_params(llm: LLM) -> list[SamplingParams]:
    """Greedy with and without EOS, seeded random, a stop string, a stop token, max_tokens 1.
    The stop string and token are taken from the greedy output of their own prompts."""
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    stop_text, stop_token = llm.generate(prompts()[3:5], greedy, use_tqdm=False)
    return [
        greedy,
        SamplingParams(temperature=0.0, max_tokens=20),
        SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, stop=[stop_text.outputs[0].text[4:8]]),
        SamplingParams(
            temperature=0.0, max_tokens=12, stop_token_ids=[stop_token.outputs[0].token_ids[4]]
        ),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]


def outputs_of(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    return [
        (
            o.outputs[0].token_ids,
            o.outputs[0].text,
            o.outputs[0].finish_reason,
            o.outputs[0].stop_reason,
        )
        for o in llm.generate(prompts(), params, use_tqdm=False)
    ]


@pytest.mark.parametrize(
    "engine_options",
    [
        {"num_kv_blocks": 64, "block_size": 16},
        {"num_kv_blocks": 17, "block_size": 4},  # preemption
        {"num_kv_blocks": 64, "block_size": 16, "max_num_batched_tokens": 7},  # chunking
    ],
)
def test_async_equals_sync(checkpoint: Path, engine_options: dict) -> None:
    sync = LLM(str(checkpoint), device="cpu", async_scheduling=False, **engine_options)
    params = mixed_params(sync)
    expected = outputs_of(sync, params)
    assert expected[3][2] == "stop" and isinstance(expected[3][3], str)  # the stop string fired
    assert expected[4][2] == "stop" and isinstance(expected[4][3], int)  # the stop token fired

    llm = LLM(str(checkpoint), device="cpu", async_scheduling=True, **engine_options)
    assert outputs_of(llm, params) == expected
    # Again, now with prefix-cache hits.
    assert outputs_of(llm, params) == expected
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_free_blocks == engine_options["num_kv_blocks"] - 1
    if engine_options["num_kv_blocks"] == 17:
        assert engine.scheduler.num_preemptions > 0


def test_penalties_and_grammars_equal_synchronous_steps(checkpoint: Path) -> None:
    penalised = SamplingParams(
        temperature=0.0, max_tokens=10, repetition_penalty=1.3, min_tokens=4, ignore_eos=True
    )
    constrained = SamplingParams(
        temperature=0.0, max_tokens=14, structured_outputs=StructuredOutputs(regex=CODE)
    )
    seeded = SamplingParams(
        temperature=1.0, seed=5, max_tokens=9, frequency_penalty=0.8, ignore_eos=True
    )
    params = [penalised, constrained, seeded, constrained, penalised, seeded]
    sync = LLM(str(checkpoint), device="cpu", num_kv_blocks=64, async_scheduling=False)
    llm = LLM(str(checkpoint), device="cpu", num_kv_blocks=64, async_scheduling=True)
    expected = outputs_of(sync, params)
    assert re.fullmatch(CODE, expected[1][1]) and re.fullmatch(CODE, expected[3][1])
    assert outputs_of(llm, params) == expected


def test_a_grammar_step_is_launched_before_the_previous_is_read(checkpoint: Path) -> None:
    """The forward pass of step N+1 is queued before step N's tokens are read; only the
    sampling waits for them."""
    llm = LLM(str(checkpoint), device="cpu", num_kv_blocks=64, async_scheduling=True)
    engine = llm.engine
    events: list[str] = []
    launch_forward, resolve = engine.runner.launch_forward, engine._resolve
    engine.runner.launch_forward = lambda *a: events.append("forward") or launch_forward(*a)
    engine._resolve = lambda *a: events.append("resolve") or resolve(*a)
    params = SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True,
        structured_outputs=StructuredOutputs(regex=CODE),
    )
    llm.generate(prompts()[0], params, use_tqdm=False)
    assert events == ["forward", "forward", "resolve", "forward", "resolve", "forward",
                      "resolve", "resolve"]


def test_stream_abandoned_in_async_mode_frees_everything(checkpoint: Path) -> None:
    llm = LLM(str(checkpoint), device="cpu", num_kv_blocks=64, async_scheduling=True)
    expected = llm.generate(
        prompts()[1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    stream = llm.stream(
        prompts()[1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    )
    seen = [next(stream).outputs[0].token_ids for _ in range(3)]
    assert seen[-1] == expected[0].outputs[0].token_ids[:3]  # no placeholder ever shows
    stream.close()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()  # the step launched before the abort is read and dropped
    assert llm.engine.kv_cache.num_free_blocks == 63
