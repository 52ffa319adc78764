"""The audio encoder stage's worker (batching clips across requests within its budget, clear
errors) and the Qwen2-Audio checkpoint layouts that the encoder and the LLM both load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fixtures_qwen2_audio import make_tiny_qwen2_audio, tone
from omni.stages.contracts.encoder import EncodeReply
from omni.stages.encoders.audio import AudioEncoder, AudioWorker
from omni.stages.llm.models import load_model
from omni.stages.runtime.worker import WorkerOptions, WorkerRequest, worker_class
from safetensors.torch import load_file, save_file

from omni.multimodal.qwen2_audio import Qwen2AudioPromptProcessor

# How the same tensors are named elsewhere: the released Qwen2-Audio checkpoints, and
# transformers 5's module names. The fixture is what transformers 5.17's save_pretrained wrote.
RELEASED = (("language_model.model.model.", "language_model.model."),)
MODULE_NAMES = (
    ("language_model.model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("audio_tower.", "model.audio_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"))


@pytest.fixture(scope="module")
def requests(folder: Path) -> list[dict[str, torch.Tensor]]:
    """Four requests of 2, 1, 2 and 1 clips."""
    processor = Qwen2AudioPromptProcessor.from_pretrained(str(folder))
    clips = [tone(0.4 + 0.3 * i, 200.0 + 100 * i, i) for i in range(6)]
    groups = [clips[0:2], clips[2:3], clips[3:5], clips[5:6]]
    prompts = [processor.prepare(prompt="<|AUDIO|>" * len(group), audios=group) for group in groups]
    return [prompt.encoder_request() for prompt in prompts]


def test_worker_batches_queued_requests_within_the_clip_budget(
    folder: Path, requests: list[dict[str, torch.Tensor]]
) -> None:
    worker = AudioWorker(
        WorkerOptions(model=str(folder), extra={"dtype": "float32", "max_batch_clips": "3"})
    )
    assert worker_class("audio") is AudioWorker
    worker.load()
    for index, inputs in enumerate(requests):
        worker.add_request(WorkerRequest(f"r{index}", inputs, {}))
    worker.add_request(WorkerRequest("gone", requests[1], {}))
    worker.abort("gone")
    with pytest.raises(ValueError, match="lacks input tensors \\['feature_lengths'\\]"):
        worker.add_request(
            WorkerRequest("bad", {"input_features": requests[0]["input_features"]}, {})
        )
    with pytest.raises(ValueError, match="'r1' is already active"):
        worker.add_request(WorkerRequest("r1", requests[1], {}))

    # Budget 3 clips: 2 + 1 run together, then 2 + 1.
    first = worker.step()
    assert [o.request_id for o in first] == ["r0", "r1"]
    second = worker.step()
    assert [o.request_id for o in second] == ["r2", "r3"]
    assert not worker.has_work() and worker.step() == []
    encoder = worker.encoder
    for output in first + second:
        inputs = requests[int(output.request_id[1:])]
        alone = encoder.encode(inputs["input_features"], inputs["feature_lengths"])
        assert output.finished and output.error is None
        assert output.reply == EncodeReply(num_tokens=alone.shape[0])
        assert alone.shape[0] == int(encoder.num_audio_tokens(inputs["feature_lengths"]).sum())
        torch.testing.assert_close(output.tensors["embeddings"], alone, rtol=0, atol=1e-5)


def test_worker_options_are_checked(folder: Path) -> None:
    with pytest.raises(ValueError, match="unknown audio stage options \\['batch'\\]"):
        AudioWorker(WorkerOptions(model=str(folder), extra={"batch": "2"}))
    with pytest.raises(
        ValueError, match="the audio stage needs --model \\(a Qwen2-Audio folder\\)"
    ):
        AudioWorker(WorkerOptions())
    with pytest.raises(ValueError, match="max_batch_clips is 0; it must be >= 1"):
        AudioWorker(WorkerOptions(model=str(folder), extra={"max_batch_clips": "0"}))


def renamed_copy(folder: Path, target: Path, renames: tuple[tuple[str, str], ...]) -> Path:
    target.mkdir()
    for item in folder.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    renamed = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        for source, goal in renames:
            if name.startswith(source):
                name = goal + name.removeprefix(source)
                break
        renamed[name] = tensor
    save_file(renamed, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("layout", ["released", "module names"])
def test_every_checkpoint_layout_loads_the_same_weights(
    folder: Path, tmp_path: Path, layout: str
) -> None:
    renames = RELEASED if layout == "released" else MODULE_NAMES
    variant = renamed_copy(folder, tmp_path / "variant", renames)
    assert set(load_file(variant / "model.safetensors")) != set(
        load_file(folder / "model.safetensors")
    )

    expected_lm, _ = load_model(str(folder), dtype="float32")
    lm, _ = load_model(str(variant), dtype="float32")
    expected_state, state = expected_lm.state_dict(), lm.state_dict()
    assert sorted(state) == sorted(expected_state)
    assert all(torch.equal(state[name], expected_state[name]) for name in state)

    expected_encoder = AudioEncoder.from_pretrained(str(folder), dtype="float32")
    encoder = AudioEncoder.from_pretrained(str(variant), dtype="float32")
    for mine, theirs in (
        (encoder.tower, expected_encoder.tower),
        (encoder.projector, expected_encoder.projector),
    ):
        ours, reference = mine.state_dict(), theirs.state_dict()
        assert sorted(ours) == sorted(reference)
        assert all(torch.equal(ours[name], reference[name]) for name in ours)


def test_a_non_audio_checkpoint_is_refused(tmp_path: Path) -> None:
    from fixtures_vl import make_tiny_qwen2_5_vl

    vl = make_tiny_qwen2_5_vl(tmp_path / "vl")
    with pytest.raises(ValueError, match="is a 'qwen2_5_vl' model; the audio stage serves"):
        AudioEncoder.from_pretrained(str(vl))
