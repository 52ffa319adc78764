"""Mixture-of-experts pieces: the torch expert path against a token-by-token reference,
routing (renormalised, scaled, group-limited), and loading per-expert or stacked checkpoint
tensors into the stacked parameters. Greedy tokens against transformers are in
test_llm_engine.py; the Triton kernel is in test_fused_moe_triton.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import make_tiny_checkpoint
from omni.stages.llm.models import load_model
from omni.stages.llm.models.moe import Routing, fused_moe
from safetensors.torch import load_file, save_file


def reference_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Float64, one token and one chosen expert at a time, straight from the definition."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    intermediate = w13.shape[1] // 2
    for t in range(hidden.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if not 0 <= e < w13.shape[0]:
                continue
            x = hidden[t].double()
            gate = w13[e, :intermediate].double() @ x
            up = w13[e, intermediate:].double() @ x
            out[t] += float(topk_weights[t, k]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


def random_moe_inputs(
    num_tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int, seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, intermediate, generator=gen) / intermediate**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = Routing(top_k=top_k, renormalize=True).select(logits)
    return x, w13, w2, ids, weights


def test_torch_path_matches_the_token_by_token_reference() -> None:
    x, w13, w2, ids, weights = random_moe_inputs(11, 24, 20, 6, 2, seed=0)
    out = fused_moe(x, w13, w2, ids, weights)
    expected = reference_moe(x, w13, w2, ids, weights)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6)


def test_expert_map_leaves_out_experts_held_elsewhere() -> None:
    # Expert parallelism: this rank holds global experts 4 and 1 as local 0 and 1.
    x, w13, w2, ids, weights = random_moe_inputs(9, 16, 8, 6, 3, seed=1)
    expert_map = torch.tensor([-1, 1, -1, -1, 0, -1])
    local = fused_moe(x, w13[[4, 1]], w2[[4, 1]], ids, weights, expert_map=expert_map)
    kept = torch.where((ids == 4) | (ids == 1), ids, -1)
    torch.testing.assert_close(
        local.double(), reference_moe(x, w13, w2, kept, weights), rtol=1e-5, atol=2e-6
    )
    # A token none of whose experts is local gets exactly zero.
    none_local = ~((ids == 4) | (ids == 1)).any(dim=1)
    assert torch.count_nonzero(local[none_local]) == 0


def test_routing_weights_exact_values() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.2, 0.3, 0.45, 0.05]]))
    weights, ids = Routing(top_k=2).select(logits)
    assert ids.tolist() == [[1, 3], [2, 1]]
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.3], [0.45, 0.3]]))
    weights, _ = Routing(top_k=2, renormalize=True).select(logits)
    torch.testing.assert_close(weights, torch.tensor([[4 / 7, 3 / 7], [0.6, 0.4]]))
    weights, _ = Routing(top_k=2, scaling=2.0, float32_logits=True).select(logits.half())
    assert weights.dtype == torch.float32
    # Qwen casts the weights back to the logits' dtype; DeepSeek keeps float32.
    assert Routing(top_k=2).select(logits.half())[0].dtype == torch.float16


def test_group_limited_routing_only_picks_from_the_best_groups() -> None:
    # 3 groups of 2 experts; the best single expert sits in group 0, but with topk_group=2 the
    # groups are ranked by their best expert: group 0 (0.30) and group 2 (0.28) win, so
    # expert 2 (0.27, group 1) is never chosen although it beats expert 5 (0.02).
    probs = torch.tensor([[0.30, 0.01, 0.27, 0.10, 0.28, 0.04]])
    routing = Routing(top_k=3, num_groups=3, topk_groups=2, float32_logits=True)
    weights, ids = routing.select(probs.log())
    assert sorted(ids[0].tolist()) == [0, 4, 5]
    assert weights.dtype == torch.float32
    ungrouped = Routing(top_k=3, float32_logits=True).select(probs.log())[1]
    assert sorted(ungrouped[0].tolist()) == [0, 2, 4]
    with pytest.raises(ValueError, match="topk_group 3 must be between 1 and n_group 2"):
        Routing(top_k=2, num_groups=2, topk_groups=3)


def test_input_shapes_are_checked_before_any_work() -> None:
    x, w13, w2, ids, weights = random_moe_inputs(3, 8, 4, 4, 2, seed=2)
    with pytest.raises(ValueError, match=r"w2 must be \[E, H, I\] = \(4, 8, 4\), got \(4, 4, 8\)"):
        fused_moe(x, w13, w2.transpose(1, 2), ids, weights)
    with pytest.raises(ValueError, match=r"topk_ids must be \[T=3, top_k\]"):
        fused_moe(x, w13, w2, ids[:2], weights[:2])


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


def test_per_expert_tensors_are_stacked_in_order(qwen3_moe_dir: Path) -> None:
    model, _ = load_model(str(qwen3_moe_dir))
    tensors = load_file(str(qwen3_moe_dir / "model.safetensors"))
    experts = model.model.layers[2].mlp.experts
    for e in range(8):
        prefix = f"model.layers.2.mlp.experts.{e}"
        gate, up = experts.gate_up_proj[e].chunk(2)
        assert torch.equal(gate, tensors[f"{prefix}.gate_proj.weight"])
        assert torch.equal(up, tensors[f"{prefix}.up_proj.weight"])
        assert torch.equal(experts.down_proj[e], tensors[f"{prefix}.down_proj.weight"])
    # Layer 1 is in mlp_only_layers: a dense MLP of intermediate_size.
    assert model.model.layers[1].mlp.gate_up_proj.weight.shape == (2 * 128, 64)


def test_stacked_checkpoint_tensors_load_by_name(qwen3_moe_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(str(qwen3_moe_dir / "model.safetensors"))
    stacked = {}
    for layer in (0, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        per_expert = [
            torch.cat([tensors.pop(f"{prefix}.{e}.{p}.weight") for p in ("gate_proj", "up_proj")])
            for e in range(8)
        ]
        stacked[f"{prefix}.gate_up_proj"] = torch.stack(per_expert)
        stacked[f"{prefix}.down_proj"] = torch.stack(
            [tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in range(8)]
        )
    folder = tmp_path / "stacked"
    folder.mkdir()
    (folder / "config.json").write_text((qwen3_moe_dir / "config.json").read_text())
    save_file({**tensors, **stacked}, str(folder / "model.safetensors"))
    expected, _ = load_model(str(qwen3_moe_dir))
    model, _ = load_model(str(folder))
    for (name, param), (_, want) in zip(
        model.named_parameters(), expected.named_parameters(), strict=True
    ):
        assert torch.equal(param, want), name


def test_missing_expert_tensor_is_named(qwen3_moe_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(str(qwen3_moe_dir / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    folder = tmp_path / "missing"
    folder.mkdir()
    (folder / "config.json").write_text((qwen3_moe_dir / "config.json").read_text())
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\) the model needs: "
                       r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight$"):
        load_model(str(folder))


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_dummy_weights_build_the_moe_geometry(arch: str, tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(arch, tmp_path / arch)
    model, _ = load_model(str(folder), dtype="bfloat16", load_format="dummy", seed=3)
    again, _ = load_model(str(folder), dtype="bfloat16", load_format="dummy", seed=3)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert tuple(experts.gate_up_proj.shape) == (8, 64, 64)
    assert torch.equal(experts.down_proj, again.model.layers[0].mlp.experts.down_proj)
