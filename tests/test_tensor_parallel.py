"""Tensor parallelism on the CPU with gloo: sizes 1, 2 and 4 give transformers' greedy tokens.

Each `LLM(tensor_parallel_size=N)` starts N - 1 follower processes, so the scenarios share
one engine per size: a batch of mixed lengths that the small KV cache forces to preempt and
the small token budget to chunk, then one prompt twice, the second time from the prefix cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.models.loader import check_shardable, load_model
from omni.stages.llm.models.parallel_layers import attention_head_shards
from omni.stages.llm.parallel.group import TensorParallel, building_with
from omni.stages.llm.parallel.ranks import rank_devices
from omni.stages.llm.worker import LLMWorker
from omni.stages.runtime import WorkerOptions
from safetensors.torch import load_file

from omni import LLM, SamplingParams
from tests.fixtures_models import make_tiny_checkpoint, tiny_config
from tests.test_llm_engine import make_prompts, reference_greedy

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[list[int]], list[list[int]]]:
    """Qwen3 (per-head q/k norms, 4 query and 2 KV heads: replicated at 4 ranks) with a
    vocabulary of 387, which no group size divides (the padded vocab-parallel slices)."""
    path = make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"), vocab_size=387)
    prompts = make_prompts(384)
    return path, prompts, reference_greedy(path, prompts)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_tensor_parallel_sizes_match_transformers(size: int, qwen3) -> None:
    path, prompts, reference = qwen3
    # The store folder of a rank 0 that was SIGKILLed (no such pid): the next one sweeps it.
    stale = Path(tempfile.gettempdir()) / "omni-tp-999999999-stale"
    if size > 1:
        stale.mkdir(exist_ok=True)
    with LLM(
        str(path),
        dtype="float32",
        device="cpu",
        tensor_parallel_size=size,
        block_size=4,
        num_kv_blocks=17,  # 16 usable blocks of 4 tokens: five prompts of up to 57 preempt
        max_num_batched_tokens=16,  # prompts of up to 45 tokens prefill in chunks
    ) as llm:
        if llm.engine.ranks is not None:
            # On the CPU the ranks' store is removed once they have met.
            assert not Path(llm.engine.ranks.store_path).parent.exists()
            assert not stale.exists()
        first = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in first] == reference
        assert llm.engine.scheduler.num_preemptions > 0
        # The 32-token prompt alone, twice: the second time all its full blocks but the one
        # holding its last token come from the prefix cache.
        [cold] = llm.generate([prompts[1]], GREEDY, use_tqdm=False)
        [warm] = llm.generate([prompts[1]], GREEDY, use_tqdm=False)
        assert cold.outputs[0].token_ids == warm.outputs[0].token_ids == reference[1]
        assert warm.num_cached_tokens == 28


# Three prompts (5, 32 and 17 tokens) and 8 new tokens: each extra rank is a process to start.
MOE_PROMPTS = make_prompts(384)[:3]


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list]]:
    folders = {}
    for arch in ("qwen3_moe", "qwen2_moe", "deepseek_v2"):
        folders[arch] = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch))
    return {
        arch: (path, reference_greedy(path, MOE_PROMPTS, new_tokens=8))
        for arch, path in folders.items()
    }


@pytest.mark.parametrize(
    ("arch", "size", "expert_parallel"),
    [
        # Every expert's intermediate features split over 2 and 4 ranks (size 1 is the
        # engine's own tests).
        ("qwen3_moe", 2, False),
        ("qwen3_moe", 4, False),
        # Whole experts on the ranks, 2 of the 8 each: Qwen2-MoE, whose gated shared expert
        # is split like a dense MLP and summed with the routed experts'.
        ("qwen2_moe", 4, True),
        # 4 of the 8 each: DeepSeek-V2, MLA's heads split (the latent whole on each rank),
        # shared experts beside them, group-limited routing.
        ("deepseek_v2", 2, True),
    ],
)
def test_mixture_of_experts_over_ranks_match_transformers(
    arch: str, size: int, expert_parallel: bool, moe_checkpoints
) -> None:
    path, reference = moe_checkpoints[arch]
    with LLM(
        str(path),
        dtype="float32",
        device="cpu",
        tensor_parallel_size=size,
        enable_expert_parallel=expert_parallel,
        num_kv_blocks=64,
        block_size=8,
        max_num_batched_tokens=24,  # the longer prompts prefill in chunks
    ) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outputs = llm.generate(MOE_PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == reference


# ---- each rank's shard, without starting any process --------------------------------------


def _rank(rank: int, world_size: int) -> TensorParallel:
    return TensorParallel.layout(rank, world_size)  # loading runs no collective


@pytest.mark.parametrize(("rank", "world_size"), [(1, 2), (3, 4)])
def test_each_rank_loads_its_slice_of_every_tensor(
    rank: int, world_size: int, tmp_path: Path
) -> None:
    """Llama with every bias (q/k/v and o, gate/up and down) and tied embeddings, vocabulary
    387: each parameter holds exactly its slice of the checkpoint tensor."""
    path = make_tiny_checkpoint(
        "llama", tmp_path, vocab_size=387, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True,
    )  # fmt: skip
    with building_with(_rank(rank, world_size)):
        model, _ = load_model(str(path), dtype="float32")
    full = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    hd, inter = 16, 128  # head_dim, intermediate_size of the tiny config
    heads, q_start = 4 // world_size, rank * (4 // world_size) * hd
    # 2 KV heads: split at 2 ranks (rank 1 holds head 1), replicated at 4 (rank 3 reads head 1).
    kv_start = hd * 1
    share, i_start = inter // world_size, rank * inter // world_size
    layer = "model.layers.1."

    def rows(name: str, start: int, size: int) -> torch.Tensor:
        return full[name][start : start + size]

    for kind in ("weight", "bias"):
        qkv = torch.cat([
            rows(f"{layer}self_attn.q_proj.{kind}", q_start, heads * hd),
            rows(f"{layer}self_attn.k_proj.{kind}", kv_start, hd),
            rows(f"{layer}self_attn.v_proj.{kind}", kv_start, hd),
        ])  # fmt: skip
        assert torch.equal(params[f"{layer}self_attn.qkv_proj.{kind}"], qkv)
    o_proj = full[layer + "self_attn.o_proj.weight"][:, q_start : q_start + heads * hd]
    assert torch.equal(params[layer + "self_attn.o_proj.weight"], o_proj)
    assert torch.equal(
        params[layer + "self_attn.o_proj.bias"], full[layer + "self_attn.o_proj.bias"]
    )
    gate_up = torch.cat([
        rows(layer + "mlp.gate_proj.weight", i_start, share),
        rows(layer + "mlp.up_proj.weight", i_start, share),
    ])  # fmt: skip
    assert torch.equal(params[layer + "mlp.gate_up_proj.weight"], gate_up)
    down = full[layer + "mlp.down_proj.weight"][:, i_start : i_start + share]
    assert torch.equal(params[layer + "mlp.down_proj.weight"], down)
    assert torch.equal(
        params[layer + "input_layernorm.weight"], full[layer + "input_layernorm.weight"]
    )
    # The vocabulary padded to a multiple of the group: 388 rows at 2 and 4 ranks.
    vocab_share = 388 // world_size
    real = min(vocab_share, 387 - rank * vocab_share)
    embed = params["model.embed_tokens.weight"]
    assert embed.shape == (vocab_share, 64)
    assert torch.equal(embed[:real], rows("model.embed_tokens.weight", rank * vocab_share, real))
    assert torch.equal(embed[real:], torch.zeros(vocab_share - real, 64))
    assert model.kv_cache_spec.num_kv_heads == 1


def test_sizes_that_do_not_shard_are_refused() -> None:
    with pytest.raises(ValueError, match="num_attention_heads is 4, which tensor_parallel_size 3"):
        attention_head_shards(4, 2, _rank(0, 3))
    with pytest.raises(
        ValueError,
        match="num_key_value_heads is 3; with fewer KV heads than "
        "ranks, tensor_parallel_size 4 must be a multiple of it",
    ):
        attention_head_shards(12, 3, _rank(0, 4))
    with pytest.raises(ValueError, match="intermediate_size is 100, which tensor_parallel_size 8"):
        _rank(0, 8).split(100, "intermediate_size")
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1, got 0"):
        EngineConfig(model="m", tensor_parallel_size=0)


def test_a_model_that_does_not_shard_is_refused_before_any_rank_starts(tmp_path: Path) -> None:
    """Checked from config.json alone, on the meta device: the server's pre-flight check."""
    config = tiny_config("qwen3_moe", 384, num_attention_heads=16, num_key_value_heads=16,
                         num_experts=6)  # fmt: skip
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_attention_heads is 16, which "
                       "tensor_parallel_size 3 does not divide"):
        LLMWorker.check_options(
            WorkerOptions(model=str(tmp_path), extra={"tensor_parallel_size": "3"})
        )
    check_shardable(str(tmp_path), 4, expert_parallel=False)  # each expert's features split
    with pytest.raises(ValueError, match="the number of experts is 6, which "
                       "tensor_parallel_size 4 does not divide"):
        check_shardable(str(tmp_path), 4, expert_parallel=True)


def test_rank_devices() -> None:
    assert rank_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    assert rank_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert rank_devices("cuda:2", 2) == ["cuda:2", "cuda:3"]
    assert rank_devices("cuda:0, cuda:3", 2) == ["cuda:0", "cuda:3"]
    with pytest.raises(ValueError, match="names 3 devices for tensor_parallel_size 2"):
        rank_devices("cuda:0,cuda:1,cuda:2", 2)
