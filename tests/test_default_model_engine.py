"""The embedded default model (SmolLM2-135M-Instruct, real weights) through omni's engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omni import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llm(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir), device="cpu", dtype="float32", num_kv_blocks=256)


def chat_prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer.encode(text))


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_on_real_weights(smollm2_dir: Path, llm: LLM) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(out[0, len(prompt) :].tolist())

    # One batch of mixed lengths; EOS handling is the engine's own (SmolLM2's <|im_end|>).
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for output, tokens in zip(outputs, expected, strict=True):
        assert output.outputs[0].text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in outputs[0].outputs[0].text


@pytest.mark.slow
def test_chat_and_stream_answer_sensibly(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=16)
    [answer] = llm.chat([{"role": "user", "content": QUESTIONS[0]}], params, use_tqdm=False)
    assert "Paris" in answer.outputs[0].text
    prompt = llm.chat_prompt_ids([{"role": "user", "content": QUESTIONS[0]}])
    deltas = [o.outputs[0].text_delta for o in llm.stream(prompt, params)]
    assert len(deltas) > 1
    assert "".join(deltas) == answer.outputs[0].text
    # Nothing is left behind: every usable block is free again.
    assert llm.engine.kv_cache.num_free_blocks == 255


@pytest.mark.slow
def test_cli_generate_answers(smollm2_dir: Path) -> None:
    env = dict(os.environ, OMNI_CACHE_DIR=str(smollm2_dir.parent.parent))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "omni.cli",
            "generate",
            "What is the capital of France?",
            "--max-tokens",
            "16",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
