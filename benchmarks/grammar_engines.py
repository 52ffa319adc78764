"""Grammar engines for structured output, measured on the CPU: compile time and per-token mask
time on the ten JSON schemas of tests/test_structured_output.py, with the embedded default's
tokenizer (SmolLM2, 49152 tokens), each walked along a valid answer.

    python3 benchmarks/grammar_engines.py        # needs `pip install outlines-core` for its row

Measured here (2 shared CPU cores, 2026-12): xgrammar 0.2.9 compiles a schema in 6 ms
(median; 9 ms the slowest) and fills a token's bitmask in 1.3 us (median; 36 us p99);
outlines-core 0.2.14 takes 59 ms (139 ms) to build its index and 0.4 us to list the allowed ids,
which must then become a mask in Python each step. omni uses xgrammar (see the README).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ANSWERS = [
    '{"x": 1, "y": -2}', '{"name": "Sky", "color": "blue"}',
    '{"name": "Ana", "age": 30, "nickname": null}', '{"tags": ["a", "bb"]}',
    '{"city": "Rome", "zip": "00100"}', '{"id": 7, "address": {"city": "Oslo", "zip": "12345"}}',
    '{"value": 10.5, "unit": "C"}', '{"scores": [1, 2, 3]}',
    '{"approved": true, "stars": 4, "comment": null}',
    '{"sku": "ABC-123", "price": 9.5, "colors": ["red"]}',
]  # fmt: skip


def report(name: str, compile_s: list[float], mask_s: list[float]) -> None:
    p99 = sorted(mask_s)[int(len(mask_s) * 0.99)]
    print(f"{name:14} compile median {statistics.median(compile_s) * 1e3:7.2f} ms, max "
          f"{max(compile_s) * 1e3:7.2f} ms | mask median {statistics.median(mask_s) * 1e6:6.1f} "
          f"us, p99 {p99 * 1e6:6.1f} us")


def xgrammar_row(tokenizer: Any, schemas: list[str], paths: list[list[int]], eos: int) -> None:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=len(tokenizer), stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    bitmask = xgrammar.allocate_token_bitmask(1, len(tokenizer))
    compile_s, mask_s = [], []
    for schema, path in zip(schemas, paths, strict=True):
        started = time.perf_counter()
        grammar = compiler.compile_json_schema(schema, any_whitespace=False)
        compile_s.append(time.perf_counter() - started)
        matcher = xgrammar.GrammarMatcher(grammar)
        for token in path:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            mask_s.append(time.perf_counter() - started)
            assert matcher.accept_token(token)
    report("xgrammar", compile_s, mask_s)


def outlines_row(tokenizer: Any, schemas: list[str], paths: list[list[int]], eos: int) -> None:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    by_text: dict[str, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id != eos:
            by_text.setdefault(tokenizer.convert_tokens_to_string([token]), []).append(token_id)
    vocabulary = outlines_core.Vocabulary(eos, by_text)
    compile_s, mask_s = [], []
    for schema, path in zip(schemas, paths, strict=True):
        started = time.perf_counter()
        index = outlines_core.Index(build_regex_from_schema(schema), vocabulary)
        compile_s.append(time.perf_counter() - started)
        guide = outlines_core.Guide(index)
        for token in path:
            started = time.perf_counter()
            guide.get_tokens()
            mask_s.append(time.perf_counter() - started)
            guide.advance(token)
    report("outlines-core", compile_s, mask_s)


def main() -> None:
    from test_structured_output import MODELS
    from transformers import AutoTokenizer

    from omni.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    schemas = [json.dumps(model.model_json_schema()) for model in MODELS]
    paths = [tokenizer.encode(answer, add_special_tokens=False) for answer in ANSWERS]
    xgrammar_row(tokenizer, schemas, paths, eos)
    try:
        outlines_row(tokenizer, schemas, paths, eos)
    except ImportError:
        print("outlines-core is not installed: pip install outlines-core")


if __name__ == "__main__":
    main()
