"""Mixture-of-experts throughput: omni against vLLM 0.24.0 and the workload's floor (issue 16).

Run on one H200 (vLLM installed as ../shared/gpu/VLLM.md says; omni installed editable):
    python3 benchmarks/moe_throughput.py                 # omni, then vLLM, then the table
    python3 benchmarks/moe_throughput.py --engines omni  # omni alone
    python3 benchmarks/moe_throughput.py --smoke         # CPU check: tiny geometry, omni only

Workload: Qwen3-30B-A3B geometry (48 layers, hidden 2048, 32 query / 4 KV heads of 128, 128
experts of 768, 8 per token), dummy bf16 weights on both engines, 256 requests x 512 random
prompt tokens -> 256 output tokens (greedy, ignore_eos), token ids in, no tokenizer. Each engine
runs in its own process (a clean GPU each), after a warm-up; the timed call is one
`generate` of all 256 requests.

The floor: prefill FLOPs (active parameters: attention, the router, 8 experts a token, and the
vocabulary projection of each prompt's last token; attention over a mean context of half the
prompt) over the measured bf16 matmul rate, plus for each decode step the larger of its FLOPs
over that rate and its bytes over the measured copy bandwidth. A step's bytes are the weights
it must read (attention, routers, the LM head, and the experts that its batch activates: with
B tokens each choosing 8 of 128 experts, E * (1 - (1 - 8/E)^B) of them in expectation, all 128
at B = 256) plus the KV cache it reads (every request's whole context).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ENGINES = ("omni", "vllm")


@dataclass(frozen=True)
class MoEGeometry:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_inter: int

    def hf_config(self, max_positions: int) -> Any:
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=6144,  # dense MLP size; no layer is dense here
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_experts=self.experts,
            num_experts_per_tok=self.top_k,
            moe_intermediate_size=self.expert_inter,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=max_positions,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
            architectures=["Qwen3MoeForCausalLM"],
            dtype="bfloat16",
        )

    # ---- parameters (bf16, 2 bytes each) ----------------------------------------------------

    @property
    def attention_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 2 * self.head_dim

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_inter

    @property
    def router_params(self) -> int:
        return self.hidden * self.experts

    def active_experts(self, batch: int) -> float:
        """Expected distinct experts a layer runs for `batch` tokens routed uniformly."""
        return self.experts * (1.0 - (1.0 - self.top_k / self.experts) ** batch)

    def step_weight_bytes(self, batch: int) -> float:
        """Weights one forward over `batch` tokens reads (the embedding table: only its rows)."""
        per_layer = (
            self.attention_params
            + self.router_params
            + self.active_experts(batch) * self.expert_params
        )
        return 2.0 * (self.layers * per_layer + self.hidden * self.vocab)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def token_flops(self, context: int) -> float:
        """One token's matmuls (attention projections, router, its top_k experts) plus its
        attention (QK and PV) over `context` positions."""
        linear = self.attention_params + self.router_params + self.top_k * self.expert_params
        attention = 4 * context * self.heads * self.head_dim
        return self.layers * (2.0 * linear + attention)


QWEN3_30B_A3B = MoEGeometry(
    vocab=151936, hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128,
    experts=128, top_k=8, expert_inter=768,
)  # fmt: skip
# The smoke geometry: the same structure in miniature, for a CPU run.
TINY = MoEGeometry(
    vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
    experts=8, top_k=2, expert_inter=32,
)  # fmt: skip


# ---- the ceilings ----------------------------------------------------------------------------


def measure_ceilings(device: str) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s): ceilings.py's on a GPU; a quick estimate on the CPU,
    where only the smoke run uses them."""
    if device == "cuda":
        from ceilings import measure_copy_bandwidth, measure_matmul_tflops

        return measure_matmul_tflops() * 1e12, measure_copy_bandwidth()
    a = torch.randn(512, 512)
    started = time.perf_counter()
    for _ in range(8):
        a @ a
    flops = 8 * 2 * 512**3 / (time.perf_counter() - started)
    src = torch.empty(1 << 26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    started = time.perf_counter()
    for _ in range(4):
        dst.copy_(src)
    return flops, 4 * 2 * src.numel() / (time.perf_counter() - started)


# ---- the engines, each in its own process --------------------------------------------------


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def warm_up_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """8 prompts of the workload's length that share no block with it, so the warm-up leaves
    no prefix-cache hits for the timed run (both engines cache prefixes by default)."""
    vocab = max(max(p) for p in prompts) + 1
    return random_prompts(8, len(prompts[0]), vocab, seed=1)


def run_omni(folder: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    from omni import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        dtype="bfloat16",
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    if args.smoke:
        kwargs.update(device="cpu", dtype="float32", num_kv_blocks=256)
    llm = LLM(folder, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(warm_up_prompts(prompts), warm, use_tqdm=False)
    return timed(lambda: llm.generate(prompts, params, use_tqdm=False), args.smoke)


def run_vllm(folder: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    # vLLM at its defaults (torch.compile, CUDA graphs) with the same limits as omni.
    llm = LLM(
        model=folder,
        load_format="dummy",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False
    )
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate([{"prompt_token_ids": p} for p in warm_up_prompts(prompts)], warm, use_tqdm=False)
    return timed(lambda: llm.generate(requests, params, use_tqdm=False), args.smoke)


def timed(generate: Any, smoke: bool) -> dict[str, float]:
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    sync()
    started = time.perf_counter()
    outputs = generate()
    sync()
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": elapsed, "output_tokens": float(tokens), "tokens_per_s": tokens / elapsed}


def child(engine: str, folder: str, args: argparse.Namespace) -> dict[str, float] | None:
    """One engine in its own process; its last stdout line is its JSON result (None: failed,
    the other engine still runs)."""
    command = [sys.executable, __file__, "--engine", engine, "--folder", folder]
    for flag in ("num_requests", "prompt_len", "output_len", "max_num_batched_tokens"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--smoke"] if args.smoke else []
    env = dict(os.environ, VLLM_USE_FLASHINFER_SAMPLER="0", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    for line in lines[:-1]:
        print(f"  [{engine}] {line}", flush=True)
    if done.returncode != 0 or not lines:
        print(f"{engine}: failed (exit {done.returncode})", flush=True)
        return None
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="omni,vllm", help="comma-separated: omni, vllm")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: a 2-layer, 8-expert geometry, 8 x (32 -> 16), omni only")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    geometry = TINY if args.smoke else QWEN3_30B_A3B
    if args.smoke:
        args.num_requests, args.prompt_len, args.output_len = 8, 32, 16
        args.engines = "omni"
    args.max_model_len = 1 << math.ceil(math.log2(args.prompt_len + args.output_len))
    prompts = random_prompts(args.num_requests, args.prompt_len, geometry.vocab)
    if args.engine is not None:
        run = run_omni if args.engine == "omni" else run_vllm
        print(json.dumps(run(args.folder, args, prompts)), flush=True)
        return

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - set(ENGINES):
        parser.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    device = "cpu" if args.smoke else "cuda"
    flops_rate, bandwidth = measure_ceilings(device)
    card = "CPU" if args.smoke else torch.cuda.get_device_name()
    print(f"card: {card}; bf16 matmul {flops_rate / 1e12:.1f} TFLOP/s; "
          f"copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    from ceilings import workload_floor  # the dense benchmark's floor; steps read active experts

    floor_s = workload_floor(
        geometry, args.num_requests, args.prompt_len, args.output_len, flops_rate, bandwidth
    )
    floor_tps = args.num_requests * args.output_len / floor_s

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        geometry.hf_config(args.max_model_len).save_pretrained(folder)
        for engine in engines:
            result = child(engine, folder, args)
            if result is not None:
                results[engine] = result
                print(f"{engine}: {result}", flush=True)

    print()
    print(f"workload: {args.num_requests} requests x {args.prompt_len} prompt + "
          f"{args.output_len} output tokens, {geometry.layers}-layer "
          f"{'tiny MoE' if args.smoke else 'Qwen3-30B-A3B'} geometry, dummy weights, {card}")
    print(f"{'engine':<10}{'out tok/s':>12}{'of floor':>10}{'seconds':>10}")
    print(f"{'floor':<10}{floor_tps:>12.0f}{'100%':>10}{floor_s:>10.2f}")
    for name, r in results.items():
        print(f"{name:<10}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / floor_tps:>10.0%}"
              f"{r['seconds']:>10.2f}")
        expected = args.num_requests * args.output_len
        if r["output_tokens"] != expected:
            print(f"{name}: {r['output_tokens']:.0f} output tokens, expected {expected}")
    if "omni" in results and "vllm" in results:
        ratio = results["omni"]["tokens_per_s"] / results["vllm"]["tokens_per_s"]
        print(f"omni / vLLM throughput: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "floor_tps": floor_tps, "floor_s": floor_s,
                       "tflops": flops_rate / 1e12, "tbps": bandwidth / 1e12,
                       "geometry": asdict(geometry), **results}, f)


if __name__ == "__main__":
    main()
