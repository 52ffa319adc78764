"""Tensor parallelism on one host's GPUs: throughput and batch-1 decode at each size, side by
side in one run, as ratios to one GPU.

Run on a machine with at least as many GPUs as the largest size:
    python3 benchmarks/tensor_parallel.py                   # Qwen2.5-7B geometry, sizes 1 and 2
    python3 benchmarks/tensor_parallel.py --sizes 1,2,4 --num-requests 512
    python3 benchmarks/tensor_parallel.py --smoke      # a tiny geometry on the CPU (gloo)

Random (dummy) bf16 weights, each size in its own process (so each starts with a clean GPU),
the same prompts for all. Batch-1 decode is where tensor parallelism helps most (each rank
streams 1/N of the weights, plus two all-reduces a layer); throughput at a large batch gains
mostly from the KV cache that N GPUs hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from llm_throughput import QWEN25_7B, batch1_decode_ms, hf_config_of, random_prompts

# --smoke: a geometry that runs in seconds on the CPU, to check the script itself.
SMOKE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=1024)  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(size: int, args: argparse.Namespace) -> dict[str, float]:
    """One size, in this process: tokens/s over the whole batch and batch-1 ms/token."""
    from omni import LLM, SamplingParams

    config = {**QWEN25_7B, **(SMOKE if args.smoke else {})}
    prompts = random_prompts(args.num_requests, args.prompt_len, config["vocab_size"], seed=0)
    with tempfile.TemporaryDirectory() as model_dir:
        hf_config_of(config).save_pretrained(model_dir)
        with LLM(
            model_dir,
            dtype="bfloat16",
            load_format="dummy",
            skip_tokenizer_init=True,
            max_model_len=2048,
            max_num_seqs=args.max_num_seqs,
            tensor_parallel_size=size,
        ) as llm:

            def params(n: int) -> SamplingParams:
                return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

            llm.generate(prompts[:2], params(4), use_tqdm=False)  # warm-up
            llm.engine.kv_cache.reset_prefix_cache()
            _sync()
            start = time.perf_counter()
            llm.generate(prompts, params(args.output_len), use_tqdm=False)
            _sync()
            elapsed = time.perf_counter() - start

            def generate_one(n: int) -> None:
                llm.engine.kv_cache.reset_prefix_cache()
                llm.generate([prompts[0]], params(n), use_tqdm=False)

            return {
                "size": size,
                "tokens_per_s": args.num_requests * args.output_len / elapsed,
                # batch1_decode_ms times with CUDA syncs; a CPU smoke run skips it.
                "batch1_ms": batch1_decode_ms(generate_one, args.decode_tokens)
                if torch.cuda.is_available()
                else float("nan"),
                "kv_blocks": llm.engine.kv_cache.pool.num_usable_blocks,
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,2", help="tensor-parallel sizes, comma separated")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny geometry, CPU allowed")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        with open(args.out, "w") as file:
            json.dump(measure(args.child, args), file)
        return

    sizes = [int(size) for size in args.sizes.split(",")]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if max(sizes) > gpus and not args.smoke:
        sys.exit(f"--sizes {args.sizes} needs {max(sizes)} GPUs; {gpus} seen")
    machine = f"{torch.cuda.get_device_name()} x{gpus}" if gpus else "CPU"
    geometry = "tiny (--smoke)" if args.smoke else "Qwen2.5-7B"
    print(f"{machine}; {geometry} geometry, bf16 dummy weights; "
          f"{args.num_requests} x ({args.prompt_len} -> {args.output_len})")
    rows = []
    for size in sizes:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k not in ("sizes", "child", "out", "smoke")]
            forwarded += ["--smoke"] if args.smoke else []
            subprocess.run(
                [sys.executable, __file__, *forwarded, f"--child={size}", f"--out={out.name}"],
                check=True, env={**os.environ, "NCCL_NVLS_ENABLE": "0"},
            )  # fmt: skip
            with open(out.name) as file:
                rows.append(json.load(file))
    base = rows[0]
    print("| TP | tokens/s | vs TP=1 | batch-1 ms/token | vs TP=1 | KV blocks |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['size']} | {row['tokens_per_s']:.0f} | "
            f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x | {row['batch1_ms']:.2f} | "
            f"{base['batch1_ms'] / row['batch1_ms']:.2f}x | {row['kv_blocks']} |"
        )


if __name__ == "__main__":
    main()
