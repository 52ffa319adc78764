"""The mixture-of-experts GPU path, checked and timed on the GPU before the throughput run.

    python3 benchmarks/moe_gpu_check.py                 # all three parts
    python3 benchmarks/moe_gpu_check.py --parts kernels,timing
    TRITON_INTERPRET=1 python3 benchmarks/moe_gpu_check.py --device cpu   # this script's own
        # check on a CPU: the kernels in the interpreter at 1 and 7 tokens, the engine eager

The kernels were written and tested in Triton's interpreter on a CPU machine; this is their
first run on a GPU. Parts:
  kernels  the Triton kernels against their torch references at Qwen3-30B-A3B's geometry (128
           experts of 768, hidden 2048, top 8, bf16): routing, the row sort, the fused MoE.
  engine   greedy tokens of omni's engine on the GPU (float32, with and without CUDA graphs)
           against transformers on the tests' tiny Qwen3-MoE, Qwen2-MoE and DeepSeek-V2
           checkpoints (DeepSeek's MLA through the Triton attention backend).
  timing   one MoE layer's experts (routing, sort, both GEMMs) at 1 to 8192 tokens: omni's
           fused_moe against vLLM's fused_experts (when vLLM is installed) on the same
           tensors, with the bandwidth each reaches over the weights of the experts it used.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
DEVICE = "cuda"  # --device


def moe_layer(num_tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 inputs of one Qwen3-30B-A3B MoE layer on the device."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = {"device": DEVICE, "generator": gen}
    x = torch.randn(num_tokens, HIDDEN, **dev).bfloat16()
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, **dev) / HIDDEN**0.5).bfloat16()
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, **dev) / INTER**0.5).bfloat16()
    gate = (torch.randn(EXPERTS, HIDDEN, **dev) / HIDDEN**0.5).bfloat16()
    return x, w13, w2, gate


def check_kernels() -> bool:
    from omni.stages.llm.models.fused_moe_triton import (
        align_rows_by_expert,
        align_rows_by_expert_torch,
        fused_moe_triton,
        softmax_topk_triton,
    )
    from omni.stages.llm.models.moe import Routing, fused_moe_torch

    ok = True
    routing = Routing(top_k=TOP_K, renormalize=True)
    for num_tokens in (1, 7, 256, 8192) if DEVICE == "cuda" else (1, 7):
        x, w13, w2, gate = moe_layer(num_tokens, seed=num_tokens)
        logits = torch.nn.functional.linear(x, gate)
        # The torch routing is the reference (Routing.select takes the kernel on CUDA).
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        ref_weights, ref_ids = torch.topk(probs, TOP_K, dim=-1)
        ref_weights = (ref_weights / ref_weights.sum(-1, keepdim=True)).bfloat16()
        weights, ids = softmax_topk_triton(logits, TOP_K, True, 1.0, torch.bfloat16)
        same_ids = float((ids.sort(-1).values == ref_ids.sort(-1).values).all(-1).float().mean())
        if DEVICE == "cuda":  # Routing.select takes the kernel on CUDA only
            assert torch.equal(routing.select(logits)[1], ids)

        aligned = align_rows_by_expert(ids, EXPERTS, 16)
        expected = align_rows_by_expert_torch(ids, EXPERTS, 16)
        total = int(expected.num_padded_rows)
        align_ok = int(aligned.num_padded_rows) == total and torch.equal(
            aligned.tile_expert[: total // 16], expected.tile_expert[: total // 16]
        )
        got_rows = aligned.sorted_rows[:total].view(-1, 16).sort(-1).values
        want_rows = expected.sorted_rows[:total].view(-1, 16).sort(-1).values
        # Rows within an expert may land in other tiles of its run: compare run by run.
        runs = expected.tile_expert[: total // 16]
        for expert in runs.unique().tolist():
            mine = got_rows[runs == expert].flatten().sort().values
            theirs = want_rows[runs == expert].flatten().sort().values
            align_ok &= torch.equal(mine, theirs)

        out = fused_moe_triton(x, w13, w2, ids, weights)
        reference = fused_moe_torch(x.float(), w13.float(), w2.float(), ids, weights.float())
        # Relative RMS error: bf16 rounding (the inputs, the gated intermediate, the output)
        # keeps it near 0.005; a wrong row or expert makes it order 1.
        error = float((out.float() - reference).norm() / reference.norm())
        passed = same_ids >= 0.99 and align_ok and error < 0.02
        ok &= passed
        print(f"kernels T={num_tokens:5d}: routing ids equal for {same_ids:.1%} of tokens (near-"
              f"ties in bf16 may differ); sort {'ok' if align_ok else 'WRONG'}; fused MoE relative "
              f"RMS error {error:.4f} against float32 torch: "
              f"{'ok' if passed else 'FAILED'}", flush=True)
    return ok


def check_engine() -> bool:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_models import make_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    from omni import LLM, SamplingParams

    ok = True
    gen = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (5, 32, 17, 45, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with tempfile.TemporaryDirectory() as root:
        for arch in ("qwen3_moe", "qwen2_moe", "deepseek_v2"):
            path = make_tiny_checkpoint(arch, Path(root) / arch)
            reference_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            reference = []
            for prompt in prompts:
                ids = torch.tensor([prompt])
                out = reference_model.eval().generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                    do_sample=False, pad_token_id=0, eos_token_id=None,
                )
                reference.append(out[0, len(prompt):].tolist())
            for eager in (False, True) if DEVICE == "cuda" else (True,):
                llm = LLM(str(path), dtype="float32", device=DEVICE, enforce_eager=eager,
                          num_kv_blocks=64, block_size=16, max_num_batched_tokens=16,
                          max_num_seqs=8)
                outputs = llm.generate(prompts, params, use_tqdm=False)
                got = [o.outputs[0].token_ids for o in outputs]
                equal = sum(g == r for g, r in zip(got, reference, strict=True))
                ok &= equal == len(prompts)
                print(f"engine {arch:12s} {'eager' if eager else 'graphs'}: greedy tokens equal "
                      f"to transformers for {equal} of {len(prompts)} prompts", flush=True)
                del llm
                torch.cuda.empty_cache()
    return ok


def time_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def vllm_fused_experts():
    """vLLM's fused_experts, or None (with the reason printed) when it cannot be called."""
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except Exception as error:  # any import failure means: no vLLM here
        print(f"timing: vLLM's fused_experts unavailable ({error!r}); omni alone", flush=True)
        return None
    return fused_experts


def timing() -> None:
    from omni.stages.llm.models.moe import Routing

    routing = Routing(top_k=TOP_K, renormalize=True)
    fused_experts = vllm_fused_experts()
    expert_bytes = 3 * HIDDEN * INTER * 2
    print(f"{'tokens':>7}{'experts':>9}{'omni us':>10}{'GB/s':>8}{'vLLM us':>10}{'GB/s':>8}"
          f"{'omni/vLLM':>11}", flush=True)
    for num_tokens in (1, 16, 64, 256, 1024, 8192):
        x, w13, w2, gate = moe_layer(num_tokens, seed=7)
        logits = torch.nn.functional.linear(x, gate)
        used = int(routing.select(logits)[1].unique().numel())
        omni_ms = time_ms(functools.partial(omni_layer, routing, logits, x, w13, w2))
        row = (f"{num_tokens:>7}{used:>9}{omni_ms * 1e3:>10.1f}"
               f"{used * expert_bytes / omni_ms / 1e6:>8.0f}")
        if fused_experts is not None:
            try:
                vllm_ms = time_ms(
                    functools.partial(vllm_layer, fused_experts, routing, logits, x, w13, w2)
                )
                row += (f"{vllm_ms * 1e3:>10.1f}{used * expert_bytes / vllm_ms / 1e6:>8.0f}"
                        f"{vllm_ms / omni_ms:>10.2f}x")
            except Exception as error:  # report it and go on with omni alone
                print(f"timing: vLLM's fused_experts failed: {error!r}", flush=True)
                fused_experts = None
        print(row, flush=True)


def omni_layer(routing, logits, x, w13, w2) -> None:
    from omni.stages.llm.models.moe import fused_moe

    weights, ids = routing.select(logits)
    fused_moe(x, w13, w2, ids, weights)


def vllm_layer(fused_experts, routing, logits, x, w13, w2) -> None:
    weights, ids = routing.select(logits)
    fused_experts(x, w13, w2, weights.float(), ids.to(torch.int32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="kernels,engine,timing")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if unknown := parts - {"kernels", "engine", "timing"}:
        parser.error(f"unknown parts {sorted(unknown)}")
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)")
    if DEVICE == "cpu":
        parts.discard("timing")
        sys.path.insert(0, str(ROOT / "tests"))
        from triton_interpreter import fix_interpreter_index

        fix_interpreter_index()
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU'}", flush=True)
    ok = True
    if "kernels" in parts:
        ok &= check_kernels()
    if "engine" in parts:
        ok &= check_engine()
    if "timing" in parts:
        timing()
    print("all checks passed" if ok else "SOME CHECKS FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
