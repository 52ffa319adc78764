"""Greedy tokens of omni's GPU path (Triton attention, fused kernels, CUDA graphs) against
transformers on the same random weights, in float32 and bfloat16.

Run on a GPU:
    python3 benchmarks/llm_gpu_check.py

float32 should match token for token (both sides compute in IEEE float32); bfloat16 with random
weights has near-ties in the logits, where two correct implementations can part, so its figure
is reported as the mean length of the matching prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch
from llm_throughput import QWEN25_7B, hf_greedy, save_random_checkpoint

PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 64, 32
# The throughput benchmark's Qwen2.5-7B geometry, cut to 4 layers so float32 fits easily.
CONFIG = {**QWEN25_7B, "num_hidden_layers": 4, "max_position_embeddings": 4096}


# (fused kernels, eager, async scheduling) per dtype: the served configuration, the plain-torch
# elementwise ops, (float32) the eager path without CUDA graphs, and asynchronous scheduling,
# whose device-side token feed and pinned staging only run on a GPU.
VARIANTS = {
    "float32": [
        (True, False, False),
        (False, False, False),
        (True, True, False),
        (True, False, True),
    ],
    "bfloat16": [(True, False, False), (False, False, False), (True, False, True)],
}


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, CONFIG["vocab_size"], (PROMPTS, PROMPT_LEN), generator=gen).tolist()


def reference(model_dir: str, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map="cuda")
    return hf_greedy(model, prompts(), NEW_TOKENS)


def omni_child(model_dir: str, dtype: str, eager: bool, async_scheduling: bool) -> None:
    from omni import LLM, SamplingParams

    llm = LLM(
        model_dir,
        dtype=dtype,
        skip_tokenizer_init=True,
        max_model_len=256,
        max_num_seqs=16,
        enforce_eager=eager,
        async_scheduling=async_scheduling,
        gpu_memory_utilization=0.5,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts(), params, use_tqdm=False)
    print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outputs]))


def run_omni(
    model_dir: str, dtype: str, fused: bool, eager: bool, async_scheduling: bool
) -> list[list[int]] | None:
    env = {**os.environ, "OMNI_FUSED_OPS": "1" if fused else "0"}
    flags = ["1" if eager else "0", "1" if async_scheduling else "0"]
    done = subprocess.run(
        [sys.executable, __file__, "--child", model_dir, dtype, *flags],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("TOKENS "):
            return json.loads(line[len("TOKENS ") :])
    print(done.stderr[-3000:])
    return None


def prefix_lengths(got: list[list[int]], ref: list[list[int]]) -> list[int]:
    return [
        next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(r))
        for g, r in zip(got, ref, strict=True)
    ]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        save_random_checkpoint(CONFIG, model_dir, torch.float32)
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            ref = reference(model_dir, dtype)
            torch.cuda.empty_cache()
            for fused, eager, async_scheduling in VARIANTS[dtype_name]:
                got = run_omni(model_dir, dtype_name, fused, eager, async_scheduling)
                label = (
                    f"{dtype_name:<9} fused={fused!s:<5} graphs={not eager!s:<5}"
                    f" async={async_scheduling!s:<5}"
                )
                if got is None:
                    rows.append(f"{label} FAILED")
                    continue
                lengths = prefix_lengths(got, ref)
                equal = sum(n == NEW_TOKENS for n in lengths)
                rows.append(f"{label} equal {equal}/{PROMPTS}  prefixes {lengths}")
    print(torch.cuda.get_device_name())
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        omni_child(sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5] == "1")
    else:
        main()
