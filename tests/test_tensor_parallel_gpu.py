"""Tensor parallelism over two GPUs (NCCL, each rank capturing its CUDA graphs): the tokens of
one GPU. Skipped without two CUDA devices (the CPU tests run the same code over gloo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from omni import LLM, SamplingParams
from tests.fixtures_models import make_tiny_checkpoint
from tests.test_llm_engine import make_prompts

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two CUDA devices",
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize(
    ("arch", "expert_parallel", "engine"),
    [
        # KV blocks sized from memory: each rank profiles, the smallest count wins.
        ("qwen3", False, {"gpu_memory_utilization": 0.3}),
        ("qwen3_moe", False, {"num_kv_blocks": 256}),
        ("qwen3_moe", True, {"num_kv_blocks": 256}),
        ("deepseek_v2", False, {"num_kv_blocks": 256}),
    ],
)
def test_two_gpus_give_the_tokens_of_one(
    arch: str, expert_parallel: bool, engine: dict[str, Any], tmp_path: Path
) -> None:
    path = make_tiny_checkpoint(arch, tmp_path / arch)
    prompts = make_prompts(384)
    options: dict[str, Any] = {"dtype": "float32", "device": "cuda", "max_num_seqs": 8, **engine}
    with LLM(str(path), **options) as one:
        expected = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM(
        str(path), tensor_parallel_size=2, enable_expert_parallel=expert_parallel, **options
    ) as two:
        assert two.engine.runner.graphs is not None  # rank 0 captured; rank 1 did alike
        outputs = two.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
