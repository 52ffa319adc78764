"""Checkpoint loading: sharding, dtypes, missing/extra tensors, bad paths, dummy weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_models import make_tiny_checkpoint
from omni.stages.checkpoint import resolve_dtype, resolve_model_path, safetensors_files
from omni.stages.llm.models import load_model
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("ckpt") / "qwen2")


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        tensors.update(load_file(str(path)))
    return tensors


def test_fused_parameters_are_the_stacked_checkpoint_tensors(qwen2_dir: Path) -> None:
    model, _ = load_model(str(qwen2_dir))
    ckpt = checkpoint_tensors(qwen2_dir)
    params = dict(model.named_parameters())
    prefix = "model.layers.1"
    qkv = [ckpt[f"{prefix}.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(params[f"{prefix}.self_attn.qkv_proj.weight"], torch.cat(qkv))
    qkv_bias = [ckpt[f"{prefix}.self_attn.{p}_proj.bias"] for p in "qkv"]
    assert torch.equal(params[f"{prefix}.self_attn.qkv_proj.bias"], torch.cat(qkv_bias))
    gate_up = [ckpt[f"{prefix}.mlp.{p}_proj.weight"] for p in ("gate", "up")]
    assert torch.equal(params[f"{prefix}.mlp.gate_up_proj.weight"], torch.cat(gate_up))
    assert params[f"{prefix}.self_attn.qkv_proj.weight"].shape == (64 + 2 * 32, 64)
    assert torch.equal(params["lm_head.weight"], ckpt["lm_head.weight"])
    assert "o_proj.bias" not in " ".join(params)  # Qwen2 has q/k/v biases only


def test_sharded_checkpoint_loads_the_same_tensors(qwen2_dir: Path, tmp_path: Path) -> None:
    sharded = make_tiny_checkpoint("qwen2", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2
    assert [p.name for p in safetensors_files(sharded)] == shard_files
    whole, _ = load_model(str(qwen2_dir))
    parts, _ = load_model(str(sharded))
    whole_params, part_params = dict(whole.named_parameters()), dict(parts.named_parameters())
    assert sorted(whole_params) == sorted(part_params)
    for name, tensor in whole_params.items():
        assert torch.equal(tensor, part_params[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_keeps_its_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    folder = make_tiny_checkpoint("llama", tmp_path / "half", dtype=dtype)
    ckpt = checkpoint_tensors(folder)
    assert ckpt["model.norm.weight"].dtype == dtype
    model, _ = load_model(str(folder))  # dtype="auto" reads config.dtype
    assert model.dtype == dtype
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.equal(
        dict(model.named_parameters())["model.norm.weight"], ckpt["model.norm.weight"]
    )
    # An explicit dtype casts on load: half -> float32 is exact.
    model32, _ = load_model(str(folder), dtype="float32")
    norm32 = dict(model32.named_parameters())["model.norm.weight"]
    assert norm32.dtype == torch.float32
    assert torch.equal(norm32, ckpt["model.norm.weight"].float())
    assert model32.model.rotary_emb.inv_freq.dtype == torch.float32


def test_missing_tensor_error_names_it_and_the_path(qwen2_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(qwen2_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_model(str(broken))
    message = str(info.value)
    assert "model.layers.1.self_attn.k_proj.weight" in message
    assert "model.layers.0.post_attention_layernorm.weight" in message
    assert "is missing 2 tensor(s)" in message
    assert str(broken) in message
    # The k shard's siblings were present, so they are not reported.
    assert "q_proj" not in message and "v_proj" not in message


def test_extra_tensors_are_ignored_and_wrong_shapes_rejected(
    qwen2_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "extra"
    shutil.copytree(qwen2_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["some.unrelated.tensor"] = torch.zeros(3)
    save_file(tensors, str(folder / "model.safetensors"))
    model, _ = load_model(str(folder))
    assert torch.equal(
        dict(model.named_parameters())["model.norm.weight"], tensors["model.norm.weight"]
    )

    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"model\.norm\.weight has shape \(65,\); the model expects \(64,\)"
    ):
        load_model(str(folder))


def test_folder_without_safetensors_is_a_clear_error(qwen2_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(qwen2_dir / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        ValueError, match=r"no \*\.safetensors files in .*pytorch_model\.bin.*pickle"
    ):
        load_model(str(folder))


def test_unknown_local_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=f"model path '{missing}' does not exist"):
        load_model(missing)


def test_unreachable_hub_id_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    # Offline and with an empty cache, exactly as on a machine with no hub access.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ValueError, match="'omni-tests/not-a-model' is not a local folder and could not"
    ):
        resolve_model_path("omni-tests/not-a-model")


def test_bad_arguments_are_rejected(qwen2_dir: Path) -> None:
    with pytest.raises(ValueError, match="load_format 'pt' is not one of"):
        load_model(str(qwen2_dir), load_format="pt")
    with pytest.raises(ValueError, match="dtype 'float8' is not one of"):
        load_model(str(qwen2_dir), dtype="float8")


def test_resolve_dtype_reads_the_config() -> None:
    from transformers import LlamaConfig

    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(dtype="float16")) == torch.float16
    assert resolve_dtype("auto", LlamaConfig()) == torch.float32
    assert resolve_dtype("bf16", LlamaConfig(dtype="float32")) == torch.bfloat16
    assert resolve_dtype(torch.float16, LlamaConfig()) == torch.float16
    with pytest.raises(ValueError, match="not supported"):
        resolve_dtype(torch.int8, LlamaConfig())


def test_dummy_weights_are_deterministic_and_need_only_the_config(
    qwen2_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(qwen2_dir / "config.json", folder / "config.json")
    first, _ = load_model(str(folder), dtype="bfloat16", load_format="dummy", seed=7)
    again, _ = load_model(str(folder), dtype="bfloat16", load_format="dummy", seed=7)
    other, _ = load_model(str(folder), dtype="bfloat16", load_format="dummy", seed=8)
    params = dict(first.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert params["model.layers.0.self_attn.qkv_proj.weight"].shape == (128, 64)
    assert params["model.layers.0.mlp.gate_up_proj.weight"].shape == (256, 64)
    assert params["lm_head.weight"].shape == (first.config.vocab_size, 64)
    assert torch.equal(params["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(
        params["model.layers.0.self_attn.qkv_proj.bias"], torch.zeros(128, dtype=torch.bfloat16)
    )
    weight = params["model.layers.1.mlp.down_proj.weight"]
    bound = float(torch.tensor(0.02, dtype=torch.bfloat16))  # the range, rounded to bf16
    assert float(weight.abs().max()) <= bound and float(weight.std()) > 0.005
    for name, tensor in again.named_parameters():
        assert torch.equal(tensor, params[name]), name
    assert not torch.equal(
        dict(other.named_parameters())["lm_head.weight"], params["lm_head.weight"]
    )


def test_dummy_load_builds_a_large_geometry_without_materialising_on_cpu(
    qwen2_dir: Path, tmp_path: Path
) -> None:
    """A 7B-sized config on the meta device: construction allocates nothing, which is what
    lets the real (GPU) path build the model straight on the card."""
    config = json.loads((qwen2_dir / "config.json").read_text())
    del config["layer_types"]
    config.update(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    )
    folder = tmp_path / "qwen2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    from omni.stages.llm.models import get_model_class
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = get_model_class(hf_config)(hf_config, torch.bfloat16)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == 7_615_616_512  # Qwen2.5-7B's published parameter count
    assert model.kv_cache_spec.num_kv_heads == 4 and model.kv_cache_spec.head_dim == 128
