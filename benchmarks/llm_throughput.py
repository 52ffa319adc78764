"""LLM throughput and batch-1 decode: omni against transformers' generate and the workload floor.

Run on a GPU:
    python3 benchmarks/llm_throughput.py            # Qwen2.5-7B geometry, random bf16 weights
    python3 benchmarks/llm_throughput.py --variants async      # also synchronous stepping
    OMNI_BENCH_ASYNC=0 python3 benchmarks/llm_throughput.py --batch1-only  # synchronous

Both engines serve the same random weights on the same GPU in one run. The workload's floor is
prefill FLOPs over the measured bf16 matmul rate, plus, for each decode step, the larger of its
FLOPs over that rate and its bytes (weights plus the KV it reads) over the measured
device-to-device copy bandwidth. Batch-1 decode is compared with weight bytes over bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from ceilings import Geometry, measure_copy_bandwidth, measure_matmul_tflops, workload_floor

QWEN25_7B = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    torch_dtype="bfloat16",
)


def hf_config_of(config: dict):
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    hf_config.architectures = config["architectures"]
    return hf_config


def save_random_checkpoint(config: dict, folder: str, dtype: torch.dtype) -> None:
    """transformers' own random initialisation of `config`, built on the GPU and saved."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config_of(config), dtype=dtype)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of equal-length prompts, exactly new_tokens each."""
    ids = torch.tensor(prompts, device="cuda")
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :].tolist()


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def run_transformers(
    model_dir: str, prompts: list[list[int]], output_len: int, batch: int, decode_tokens: int
) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map="cuda"
    ).eval()

    def generate(chunk: list[list[int]], new_tokens: int) -> None:
        ids = torch.tensor(chunk, device="cuda")
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    generate(prompts[:2], 4)  # warm-up
    # Reference greedy tokens for the correctness check of omni's GPU path.
    reference = hf_greedy(model, prompts[:CHECK_PROMPTS], CHECK_TOKENS)
    with open(reference_path(model_dir), "w") as f:
        json.dump(reference, f)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        generate(prompts[i : i + batch], output_len)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    ms_per_token = batch1_decode_ms(lambda n: generate(prompts[:1], n), decode_tokens)
    model.to("meta")  # release the GPU memory before omni loads its copy
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "tokens_per_s": len(prompts) * output_len / elapsed,
        "seconds": elapsed,
        "batch1_ms": ms_per_token,
    }


def run_omni(
    model_dir: str, prompts: list[list[int]], output_len: int, decode_tokens: int, max_num_seqs: int
) -> dict[str, float]:
    from omni import LLM, SamplingParams

    llm = LLM(
        model_dir,
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=2048,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=8192,
        async_scheduling=ASYNC_SCHEDULING,
    )

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    step_times = time_steps(llm)
    check = greedy_check(llm, model_dir, prompts, params)
    llm.generate(prompts[:2], params(4), use_tqdm=False)  # warm-up
    # Fresh prompts: the warm-up must not turn the timed run into prefix-cache hits.
    llm.engine.kv_cache.reset_prefix_cache()
    torch.cuda.synchronize()
    step_times.clear()
    start = time.perf_counter()
    llm.generate(prompts, params(output_len), use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    phases = {
        "mixed_steps_s": sum(t for decode, t in step_times if not decode),
        "decode_steps_s": sum(t for decode, t in step_times if decode),
        "num_decode_steps": sum(1 for decode, _ in step_times if decode),
    }

    def generate_one(n: int) -> None:
        llm.engine.kv_cache.reset_prefix_cache()
        llm.generate([prompts[0]], params(n), use_tqdm=False)

    ms_per_token = batch1_decode_ms(generate_one, decode_tokens)
    return {
        "tokens_per_s": len(prompts) * output_len / elapsed,
        "seconds": elapsed,
        "batch1_ms": ms_per_token,
        **phases,
        **check,
    }


CHECK_PROMPTS, CHECK_TOKENS = 8, 32


def reference_path(model_dir: str) -> str:
    return os.path.join(model_dir, "hf_greedy.json")


def greedy_check(llm, model_dir: str, prompts, params) -> dict[str, float]:
    """omni's greedy tokens against transformers' on the same weights: how many prompts
    match all CHECK_TOKENS, and the mean length of the matching prefix. In bf16 two correct
    implementations may part at a near-tie, so this is reported, not asserted."""
    if not os.path.exists(reference_path(model_dir)):
        return {}
    with open(reference_path(model_dir)) as f:
        reference = json.load(f)
    outputs = llm.generate(prompts[:CHECK_PROMPTS], params(CHECK_TOKENS), use_tqdm=False)
    llm.engine.kv_cache.reset_prefix_cache()
    prefixes = []
    for out, ref in zip(outputs, reference, strict=True):
        got = out.outputs[0].token_ids
        prefixes.append(
            next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), len(ref))
        )
    return {
        "greedy_equal": sum(p == CHECK_TOKENS for p in prefixes),
        "greedy_checked": len(prefixes),
        "greedy_mean_prefix": sum(prefixes) / len(prefixes),
    }


def omni_batch1_dummy(config: dict, prompts: list[list[int]], decode_tokens: int) -> float:
    from omni import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as model_dir:
        hf_config_of(config).save_pretrained(model_dir)
        llm = LLM(
            model_dir,
            dtype="bfloat16",
            load_format="dummy",
            skip_tokenizer_init=True,
            max_model_len=2048,
            max_num_seqs=1,
            async_scheduling=ASYNC_SCHEDULING,
        )
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

        def generate_one(n: int) -> None:
            llm.engine.kv_cache.reset_prefix_cache()
            llm.generate([prompts[0]], dataclasses.replace(params, max_tokens=n), use_tqdm=False)

        return batch1_decode_ms(generate_one, decode_tokens)


# Child-process environments per variant set: "fallback" runs the fused kernels and, only if
# that fails, the plain torch ops; "both" runs each; "async" compares synchronous stepping with
# asynchronous scheduling.
VARIANTS = {
    "fallback": [("omni", {"OMNI_FUSED_OPS": "1"}), ("omni-unfused", {"OMNI_FUSED_OPS": "0"})],
    "both": [("omni", {"OMNI_FUSED_OPS": "1"}), ("omni-unfused", {"OMNI_FUSED_OPS": "0"})],
    "async": [("omni-sync", {"OMNI_BENCH_ASYNC": "0"}), ("omni", {"OMNI_BENCH_ASYNC": "1"})],
}
# Asynchronous scheduling is the engine's default; OMNI_BENCH_ASYNC=0 measures synchronous steps.
ASYNC_SCHEDULING = os.environ.get("OMNI_BENCH_ASYNC", "1") == "1"


def run_omni_child(model_dir: str, args: argparse.Namespace, env: dict[str, str]):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable,
            __file__,
            "--omni-child",
            model_dir,
            "--json",
            out.name,
            "--num-requests",
            str(args.num_requests),
            "--prompt-len",
            str(args.prompt_len),
            "--output-len",
            str(args.output_len),
            "--decode-tokens",
            str(args.decode_tokens),
        ]
        done = subprocess.run(command, env={**os.environ, **env}, check=False)
        if done.returncode != 0:
            return None
        with open(out.name) as f:
            return json.load(f)


def omni_child_main(args: argparse.Namespace) -> None:
    vocab = QWEN25_7B["vocab_size"]
    prompts = random_prompts(args.num_requests, args.prompt_len, vocab, seed=0)
    result = run_omni(
        args.omni_child,
        prompts,
        args.output_len,
        args.decode_tokens,
        max_num_seqs=args.num_requests,
    )
    with open(args.json, "w") as f:
        json.dump(result, f)


def time_steps(llm) -> list[tuple[bool, float]]:
    """Wraps the runner so each step's wall time is recorded with whether it was decode-only
    (the CUDA-graph path) or carried prefill tokens."""
    runner = llm.engine.runner
    execute = runner.execute
    times: list[tuple[bool, float]] = []

    def timed_execute(out):
        start = time.perf_counter()
        result = execute(out)  # ends in a device-to-host copy of the tokens: synchronous
        decode_only = all(s.num_new_tokens == 1 for s in out.scheduled)
        times.append((decode_only, time.perf_counter() - start))
        return result

    runner.execute = timed_execute
    return times


def batch1_decode_ms(generate, decode_tokens: int) -> float:
    """Time per decoded token at batch 1: the difference between generating decode_tokens + 1
    and 1 token, so prefill and start-up cancel out."""

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(n)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(2)
    one = min(timed(1) for _ in range(3))
    many = min(timed(decode_tokens + 1) for _ in range(2))
    return (many - one) / decode_tokens * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--hf-batch", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--layers", type=int, default=None, help="override layer count (smoke runs)"
    )
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument(
        "--variants",
        choices=tuple(VARIANTS),
        default="fallback",
        help="fallback: fused kernels, unfused only if that fails; both: each; "
        "async: synchronous stepping and asynchronous scheduling",
    )
    parser.add_argument(
        "--batch1-only",
        action="store_true",
        help="only omni's batch-1 decode against its floor, on random (dummy) weights",
    )
    parser.add_argument("--omni-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.omni_child:
        omni_child_main(args)
        return

    config = dict(QWEN25_7B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    g = Geometry(
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
    )

    flops_rate = measure_matmul_tflops() * 1e12
    bandwidth = measure_copy_bandwidth()
    card = torch.cuda.get_device_name()
    print(
        f"card: {card}; bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s; "
        f"copy {bandwidth / 1e12:.2f} TB/s"
    )

    prompts = random_prompts(args.num_requests, args.prompt_len, g.vocab, seed=0)
    if args.batch1_only:
        floor_b1_ms = g.weight_bytes / bandwidth * 1e3
        ms = omni_batch1_dummy(config, prompts, args.decode_tokens)
        print(
            f"omni batch-1 decode on {card}: {ms:.2f} ms/token; floor {floor_b1_ms:.2f} ms "
            f"(weights over copy bandwidth); {ms / floor_b1_ms:.2f}x floor"
        )
        return
    floor_s = workload_floor(
        g, args.num_requests, args.prompt_len, args.output_len, flops_rate, bandwidth
    )
    floor_tps = args.num_requests * args.output_len / floor_s
    floor_b1_ms = g.weight_bytes / bandwidth * 1e3

    with tempfile.TemporaryDirectory() as model_dir:
        # One set of random weights, saved once, read by both engines.
        save_random_checkpoint(config, model_dir, torch.bfloat16)

        results: dict[str, dict[str, float]] = {}
        if not args.skip_transformers:
            results["transformers"] = run_transformers(
                model_dir, prompts, args.output_len, args.hf_batch, args.decode_tokens
            )
            print("transformers:", results["transformers"], flush=True)
        # omni runs in a child process per variant: a clean GPU each, and a failure of one
        # variant (say the fused kernels) still leaves the other's figures.
        for name, env in VARIANTS[args.variants]:
            result = run_omni_child(model_dir, args, env)
            if result is None:
                print(f"{name}: failed", flush=True)
                continue
            results[name] = result
            print(f"{name}:", result, flush=True)
            if args.variants == "fallback":
                break

    print()
    print(
        f"workload: {args.num_requests} requests x {args.prompt_len} prompt + {args.output_len} "
        f"output tokens, {g.layers}-layer Qwen2.5-7B geometry, bf16, {card}"
    )
    print(f"{'engine':<14}{'out tok/s':>12}{'of floor':>10}{'b1 ms/tok':>12}{'x floor':>9}")
    print(f"{'floor':<14}{floor_tps:>12.0f}{'100%':>10}{floor_b1_ms:>12.2f}{1.0:>9.2f}")
    for name, r in results.items():
        print(
            f"{name:<14}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / floor_tps:>10.0%}"
            f"{r['batch1_ms']:>12.2f}{r['batch1_ms'] / floor_b1_ms:>9.2f}"
        )
    for name, r in results.items():
        # Asynchronous steps launch without runner.execute, so only synchronous runs are split.
        if r.get("num_decode_steps"):
            print(
                f"{name}: mixed prefill steps {r['mixed_steps_s']:.2f} s, "
                f"{r['num_decode_steps']} decode-only steps {r['decode_steps_s']:.2f} s"
            )
        if "transformers" in results and name != "transformers":
            ratio = r["tokens_per_s"] / results["transformers"]["tokens_per_s"]
            print(f"{name} / transformers throughput: {ratio:.1f}x")
        if "greedy_checked" in r:
            print(
                f"{name}: greedy tokens equal to transformers for {r['greedy_equal']} of "
                f"{r['greedy_checked']} prompts ({CHECK_TOKENS} tokens each; mean matching "
                f"prefix {r['greedy_mean_prefix']:.1f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "card": card,
                    "floor_tps": floor_tps,
                    "floor_b1_ms": floor_b1_ms,
                    "tflops": flops_rate / 1e12,
                    "tbps": bandwidth / 1e12,
                    **results,
                },
                f,
            )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
