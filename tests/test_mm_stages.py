"""Multi-modal requests through separate stage processes: an encoder stage (vision for
Qwen2.5-VL images, audio for Qwen2-Audio clips) and an LLM stage, each its own supervised
process over the transport, answer with transformers' greedy tokens. Each prompt is one LLM
stage request; the LLM stage asks the encoder stage for each item it lacks, and a repeated item
is not encoded again, whether the prefix cache or the LLM stage's encoder-output cache covers
it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fixtures_qwen2_audio import load_reference_audio, make_tiny_qwen2_audio
from fixtures_vl import make_tiny_qwen2_5_vl
from omni.stages.contracts import llm
from omni.stages.contracts.sampling import SamplingParams
from stage_helpers import SHM_PREFIX, ipc_endpoint, our_segments, running_router
from test_qwen2_audio import CASES as AUDIO_CASES
from test_qwen2_audio import audio, reference_tokens
from test_vl_engine import CASES, NEW_TOKENS, reference, text, user

from omni.multimodal import Qwen2VLPromptProcessor, prepare_qwen2_vl_prompt
from omni.multimodal.prompt import MultiModalPrompt
from omni.multimodal.qwen2_audio import Qwen2AudioPrompt, Qwen2AudioPromptProcessor
from omni.multimodal.requests import submit_mm_request
from omni.supervision.router import StageRouter
from omni.supervision.supervisor import StageSpec, StageSupervisor, SupervisorConfig

SAMPLING = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
BLOCK = 8
LLM_BLOCK_OPTION = ("--option", f"block_size={BLOCK}")


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"))


def dispatched(router: StageRouter, role: str) -> int:
    """Requests the router has sent to replicas of `role` (the LLM stage's encoder calls too)."""
    return sum(n for (r, _), n in router.load_snapshot()[1].items() if r == role)


@contextmanager
def encoder_and_llm_stages(folder: Path, encoder_role: str) -> Iterator[StageRouter]:
    """A router with one `encoder_role` stage process and one LLM stage process on `folder`."""
    common = ("--shm-prefix", SHM_PREFIX, "--log-level", "WARNING")
    specs = [
        StageSpec(role=encoder_role, model=str(folder), extra_args=common),
        StageSpec(
            role="llm",
            model=str(folder),
            extra_args=(
                *common,
                "--option",
                "num_kv_blocks=128",
                "--option",
                f"block_size={BLOCK}",
            ),
        ),
    ]
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=2.0) as router:
        supervisor = StageSupervisor(router, specs, SupervisorConfig()).start()
        try:
            assert router.wait_for_replicas(encoder_role, 1, timeout=120)
            assert router.wait_for_replicas("llm", 1, timeout=120)
            pids = supervisor.pids()
            assert len(set(pids.values())) == 2  # two processes, neither of them this one
            yield router
        finally:
            supervisor.stop()
    assert our_segments() == []


def answer(router: StageRouter, prompt: MultiModalPrompt) -> tuple[list[int], int]:
    replies = submit_mm_request(router, prompt, SAMPLING).result(timeout=120)
    updates = [llm.CONTRACT.decode_reply(r.body) for r in replies]
    tokens = [t for u in updates for t in u.token_ids_delta]
    return tokens, updates[-1].cached_tokens


def check_repeat_skips_the_encoder(
    router: StageRouter, role: str, prompt: MultiModalPrompt, expected: list[int]
) -> None:
    """First time: one LLM request, each item encoded once, no prefix hit. Again: the prefix
    cache covers every item, so the encoder is not asked."""
    items = len(prompt.placeholders)
    assert answer(router, prompt) == (expected, 0)
    assert (dispatched(router, "llm"), dispatched(router, role)) == (1, items)
    cached = (len(prompt.prompt_token_ids) - 1) // BLOCK * BLOCK
    assert prompt.items_to_encode(cached) == []
    assert answer(router, prompt) == (expected, cached)
    assert (dispatched(router, "llm"), dispatched(router, role)) == (2, items)


def test_image_request_through_vision_and_llm_stage_processes(vl_folder: Path) -> None:
    processor = Qwen2VLPromptProcessor.from_pretrained(str(vl_folder))
    prompt = prepare_qwen2_vl_prompt(processor, messages=CASES["two images of different sizes"])
    expected = reference(vl_folder, prompt)
    with encoder_and_llm_stages(vl_folder, "vision") as router:
        check_repeat_skips_the_encoder(router, "vision", prompt, expected)


def test_audio_request_through_audio_and_llm_stage_processes(audio_folder: Path) -> None:
    model = load_reference_audio(audio_folder)
    model.generation_config.eos_token_id = None

    def expect(prompt: Qwen2AudioPrompt) -> list[int]:
        return reference_tokens(model, prompt)

    processor = Qwen2AudioPromptProcessor.from_pretrained(str(audio_folder))
    prompt = processor.prepare(messages=AUDIO_CASES["two clips of different lengths"])
    clip = AUDIO_CASES["one clip"][0]["content"][0]
    moved = processor.prepare(messages=user(text("First listen."), clip, text("What is it?")))
    fresh = processor.prepare(messages=user(audio(0.5, 880.0, 50), text("And this?")))
    with encoder_and_llm_stages(audio_folder, "audio") as router:
        check_repeat_skips_the_encoder(router, "audio", prompt, expect(prompt))
        one_clip = processor.prepare(messages=AUDIO_CASES["one clip"])
        assert answer(router, one_clip)[0] == expect(one_clip)
        assert dispatched(router, "audio") == 3
        # The same clip after other text: no prefix hit, but the LLM stage's encoder-output
        # cache holds it.
        assert answer(router, moved) == (expect(moved), 0)
        assert dispatched(router, "audio") == 3
        assert answer(router, fresh)[0] == expect(fresh)
        assert dispatched(router, "audio") == 4
