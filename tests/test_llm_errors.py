"""Bad input gets a clear error naming the item and the limit, and the engine keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_models import make_tiny_checkpoint
from safetensors.torch import load_file, save_file

from omni import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen2")
    make_tiny_checkpoint("qwen2", path, max_position_embeddings=64)
    return path


@pytest.fixture(scope="module")
def llm(checkpoint: Path) -> LLM:
    return LLM(str(checkpoint), device="cpu", dtype="float32", num_kv_blocks=32)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ([5] * 64, "prompt has 64 tokens; the model's context is 64 tokens"),
        ([5, 10**6], r"prompt token id 1000000 is outside the vocabulary \[0, "),
    ],
)
def test_bad_prompt_is_rejected_and_engine_keeps_serving(llm: LLM, prompt, message) -> None:
    free_before = llm.engine.kv_cache.num_free_blocks
    with pytest.raises(ValueError, match=message):
        llm.generate([[1, 2, 3], prompt], GREEDY, use_tqdm=False)
    # The good request queued before the bad one was aborted, not leaked.
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_free_blocks == free_before
    [ok] = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert len(ok.outputs[0].token_ids) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        SamplingParams(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)


def test_generation_stops_at_the_context_limit(llm: LLM) -> None:
    [out] = llm.generate(
        [[7] * 60], SamplingParams(temperature=0.0, max_tokens=100), use_tqdm=False
    )
    assert len(out.outputs[0].token_ids) <= 4
    assert out.outputs[0].finish_reason in ("length", "stop")


def test_unknown_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises((ValueError, OSError), match="no-such-model"):
        LLM(str(missing), device="cpu")


def test_checkpoint_with_missing_tensor(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in checkpoint.iterdir():
        if file.suffix != ".safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        LLM(str(broken), device="cpu", num_kv_blocks=8)


def test_unknown_engine_option() -> None:
    with pytest.raises(TypeError, match="unknown engine options \\['max_seqs'\\]"):
        LLM("unused", max_seqs=4)


def test_stream_abandoned_midway_frees_blocks(llm: LLM) -> None:
    free_before = llm.engine.kv_cache.num_free_blocks
    stream = llm.stream([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    next(stream)
    stream.close()  # the client went away
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_free_blocks == free_before
