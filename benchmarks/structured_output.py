"""JSON-schema-constrained generation against free generation, side by side in one run.

Run on a GPU (Qwen2.5-7B geometry, random bf16 weights, the SmolLM2 tokenizer; 256 requests):
    python3 benchmarks/structured_output.py                 # omni only
    python3 benchmarks/structured_output.py --vllm          # and vLLM in the same lease
CPU smoke check (the embedded default, 8 short requests):
    python3 benchmarks/structured_output.py --smoke

Each engine runs in its own process (so each has the GPU to itself) and serves the same
token-id prompts twice: free (greedy, ignore_eos, exactly --output-len tokens) and constrained
by `SCHEMA` (greedy, at most --output-len tokens: with random weights the strings rarely close,
so the constrained answers run about as long). Output tok/s is output tokens over wall time,
after a warm-up of both kinds; the ratio constrained / free is what issue 13 bounds (>= 0.85).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Nested object, array, strings and an integer: the shape document-extraction requests have.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "address", "tags"],
}


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    """Deterministic token-id prompts (ids below 32000 are ordinary text in both tokenizers)."""
    span = min(vocab, 32000) - 200
    return [[200 + (7919 * (i * length + j)) % span for j in range(length)] for i in range(count)]


def model_folder(smoke: bool) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vllm_models

    if smoke:
        from omni.default_model import default_model_path

        return Path(default_model_path())
    root = vllm_models.default_root()
    return vllm_models.build_once(root / vllm_models.QWEN7B, vllm_models.qwen7b_dummy)


def run_omni(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    from omni.stages.contracts.structured_outputs import StructuredOutputs

    from omni import LLM, SamplingParams

    device = "cpu" if args.smoke else "cuda"
    kwargs: dict[str, Any] = {"device": device, "max_num_seqs": args.num_requests}
    if not args.smoke:
        kwargs.update(load_format="dummy", dtype="bfloat16", max_model_len=4096)
    else:
        kwargs.update(num_kv_blocks=256)
    llm = LLM(str(folder), **kwargs)
    assert llm.tokenizer is not None
    free = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0, max_tokens=args.output_len,
        structured_outputs=StructuredOutputs(json=json.dumps(SCHEMA)),
    )  # fmt: skip

    def run(params: SamplingParams, batch: list[list[int]]) -> tuple[int, float]:
        started = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        if params.structured_outputs is not None and args.smoke:
            print("constrained sample:", outputs[0].outputs[0].text[:120], flush=True)
        return sum(len(o.outputs[0].token_ids) for o in outputs), elapsed

    batch = prompts(args.num_requests, args.input_len, len(llm.tokenizer))
    return measure(run, free, constrained, batch)


def run_vllm(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    try:
        from vllm.sampling_params import StructuredOutputsParams

        constraint = {"structured_outputs": StructuredOutputsParams(json=SCHEMA)}
    except ImportError:  # vLLM before 0.10.2 called it guided decoding
        from vllm.sampling_params import GuidedDecodingParams

        constraint = {"guided_decoding": GuidedDecodingParams(json=SCHEMA)}
    llm = LLM(model=str(folder), load_format="dummy", dtype="bfloat16", max_model_len=4096,
              max_num_seqs=args.num_requests)
    free = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.output_len, **constraint)

    def run(params: Any, batch: list[list[int]]) -> tuple[int, float]:
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        return sum(len(o.outputs[0].token_ids) for o in outputs), elapsed

    vocab = llm.get_tokenizer().vocab_size
    return measure(run, free, constrained, prompts(args.num_requests, args.input_len, vocab))


def measure(run: Any, free: Any, constrained: Any, batch: list[list[int]]) -> dict[str, float]:
    """Warm both kinds up, then time free, constrained, free, constrained; each kind's rate is
    its better round (the first round after warm-up still pays one-off costs on some GPUs)."""
    warm = batch[: max(1, len(batch) // 8)]
    run(free, warm)
    run(constrained, warm)
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    tokens: dict[str, int] = {}
    for _ in range(2):
        for name, params in (("free", free), ("constrained", constrained)):
            count, elapsed = run(params, batch)
            rates[name].append(count / elapsed)
            tokens[name] = count
    result = {f"{name}_tok_s": max(values) for name, values in rates.items()}
    result.update({f"{name}_tokens": float(count) for name, count in tokens.items()})
    result["ratio"] = result["constrained_tok_s"] / result["free_tok_s"]
    return result


def child(engine: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one engine in its own process; its last stdout line is its JSON result."""
    command = [sys.executable, __file__, "--engine", engine, "--num-requests",
               str(args.num_requests), "--input-len", str(args.input_len), "--output-len",
               str(args.output_len)] + (["--smoke"] if args.smoke else [])  # fmt: skip
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0")
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    for line in lines[:-1]:
        print(f"  [{engine}] {line}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--vllm", action="store_true", help="also run vLLM, in its own process")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: the embedded default, 8 requests of 16 tokens")
    parser.add_argument("--engine", choices=["omni", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.num_requests, args.input_len, args.output_len = 8, 32, 16
    folder = model_folder(args.smoke)
    if args.engine is not None:
        result = (run_omni if args.engine == "omni" else run_vllm)(folder, args)
        print(json.dumps(result), flush=True)
        return
    engines = ["omni"] + (["vllm"] if args.vllm else [])
    print(f"model {folder}, {args.num_requests} requests, {args.input_len} prompt tokens, "
          f"up to {args.output_len} output tokens; schema: {json.dumps(SCHEMA)}")
    print(f"{'engine':8} {'free tok/s':>12} {'json tok/s':>12} {'ratio':>7} "
          f"{'free tokens':>12} {'json tokens':>12}")
    for engine in engines:
        r = child(engine, args)
        print(f"{engine:8} {r['free_tok_s']:12.1f} {r['constrained_tok_s']:12.1f} "
              f"{r['ratio']:7.3f} {r['free_tokens']:12.0f} {r['constrained_tokens']:12.0f}",
              flush=True)


if __name__ == "__main__":
    main()
