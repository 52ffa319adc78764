"""Structured output inside the LLM engine, on a tiny random Qwen2 checkpoint: constrained and
free requests share a batch without changing each other, and a grammar that is still compiling
holds back only its own request."""

from __future__ import annotations

import re
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from omni.stages.contracts.structured_outputs import StructuredOutputs

from omni import LLM, SamplingParams
from tests.fixtures_models import make_tiny_checkpoint

PROMPTS = [[5, 17, 33, 8, 91], [40, 41, 42, 43, 44, 45, 46]]
CODE = r"[a-f]{3}-[0-9]{2}"


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path: Path = make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("structured-engine"))
    return LLM(str(path), device="cpu", num_kv_blocks=64)


def test_constrained_and_free_rows_share_a_batch(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    code = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputs(
        regex=CODE))
    alone = [llm.generate([PROMPTS[0]], p, use_tqdm=False)[0].outputs[0] for p in (free, seeded)]
    together = llm.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1]], [free, seeded, code],
                            use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together[:2]] == [a.token_ids for a in alone]
    constrained = together[2].outputs[0]
    assert re.fullmatch(CODE, constrained.text), constrained.text
    assert constrained.finish_reason == "stop"
    # Without the constraint, the same request writes something else.
    plain = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12),
                         use_tqdm=False)[0].outputs[0]
    assert not re.fullmatch(CODE, plain.text)


class _SlowCompiler:
    """A grammar compiler whose grammars are ready only when the test says so."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.pending: list[tuple[Future[Any], StructuredOutputs]] = []

    def submit(self, spec: StructuredOutputs) -> Future[Any]:
        future: Future[Any] = Future()
        self.pending.append((future, spec))
        return future

    def finish(self) -> None:
        for future, spec in self.pending:
            future.set_result(self.real.submit(spec).result())


def test_a_compiling_grammar_holds_back_only_its_request(llm: LLM) -> None:
    engine = llm.engine
    slow = _SlowCompiler(engine._grammar_compiler())
    engine._grammars = slow  # type: ignore[assignment]
    try:
        engine.add_request("free", PROMPTS[0], SamplingParams(temperature=0, max_tokens=3))
        engine.add_request("code", PROMPTS[1], SamplingParams(
            temperature=0, max_tokens=12, structured_outputs=StructuredOutputs(regex=CODE)))
        finished: dict[str, Any] = {}
        while "free" not in finished:
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
        # Three steps ran for the free request while the other's grammar compiled.
        assert "code" not in finished and engine.has_unfinished_requests()
        assert engine.scheduler.num_unfinished == 0
        slow.finish()
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
        assert re.fullmatch(CODE, finished["code"].outputs[0].text)
    finally:
        engine._grammars = slow.real
