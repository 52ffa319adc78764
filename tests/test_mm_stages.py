"""Multi-modal requests through separate stage processes: an encoder stage (vision for
Qwen2.5-VL images, audio for Qwen2-Audio clips) and an LLM stage, each its own supervised
process over the transport, answer with transformers' greedy tokens; a repeated item is not
encoded again, whether the prefix cache or the encoder-output cache covers it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fixtures_qwen2_audio import load_reference_audio, make_tiny_qwen2_audio
from fixtures_vl import make_tiny_qwen2_5_vl
from omni.cache.encoder_cache import EncoderCache
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

SAMPLING = {"temperature": 0.0, "max_tokens": NEW_TOKENS, "ignore_eos": True}
BLOCK = 8
LLM_BLOCK_OPTION = ("--option", f"block_size={BLOCK}")


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"))


@contextmanager
def encoder_and_llm_stages(folder: Path, encoder_role: str) -> Iterator[tuple[StageRouter, list]]:
    """A router with one `encoder_role` stage process and one LLM stage process on `folder`;
    yields the router and the list of encoder submissions it has seen."""
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

            encoder_calls: list[str] = []
            submit = router.submit

            def counting_submit(role: str, *args: Any, **kwargs: Any) -> Any:
                if role == encoder_role:
                    encoder_calls.append(role)
                return submit(role, *args, **kwargs)

            router.submit = counting_submit  # type: ignore[method-assign]
            yield router, encoder_calls
        finally:
            supervisor.stop()
    assert our_segments() == []


def answer(
    router: StageRouter, prompt: MultiModalPrompt, cache: EncoderCache | None = None
) -> tuple[list[int], int]:
    replies = submit_mm_request(router, prompt, SAMPLING, encoder_cache=cache).result(timeout=120)
    tokens = [t for r in replies for t in r.data["token_ids_delta"]]
    return tokens, int(replies[-1].data["cached_tokens"])


def check_repeat_skips_the_encoder(
    router: StageRouter, calls: list, prompt: MultiModalPrompt, expected: list[int]
) -> None:
    """First time: encoded once, no prefix hit. Again: the prefix cache covers every item."""
    assert answer(router, prompt) == (expected, 0)
    assert len(calls) == 1
    cached = (len(prompt.prompt_token_ids) - 1) // BLOCK * BLOCK
    assert prompt.items_to_encode(cached) == []
    assert answer(router, prompt) == (expected, cached)
    assert len(calls) == 1


def test_image_request_through_vision_and_llm_stage_processes(vl_folder: Path) -> None:
    processor = Qwen2VLPromptProcessor.from_pretrained(str(vl_folder))
    prompt = prepare_qwen2_vl_prompt(processor, messages=CASES["two images of different sizes"])
    expected = reference(vl_folder, prompt)
    with encoder_and_llm_stages(vl_folder, "vision") as (router, calls):
        check_repeat_skips_the_encoder(router, calls, prompt, expected)


def test_audio_request_through_audio_and_llm_stage_processes(audio_folder: Path) -> None:
    model = load_reference_audio(audio_folder)
    model.generation_config.eos_token_id = None

    def expect(prompt: Qwen2AudioPrompt) -> list[int]:
        return reference_tokens(model, prompt)

    processor = Qwen2AudioPromptProcessor.from_pretrained(str(audio_folder))
    prompt = processor.prepare(messages=AUDIO_CASES["two clips of different lengths"])
    clip = AUDIO_CASES["one clip"][0]["content"][0]
    # The same clip after other text: no prefix hit, but the encoder-output cache has it.
    moved = processor.prepare(messages=user(text("First listen."), clip, text("What is it?")))
    fresh = processor.prepare(messages=user(audio(0.5, 880.0, 50), text("And this?")))
    with encoder_and_llm_stages(audio_folder, "audio") as (router, calls):
        check_repeat_skips_the_encoder(router, calls, prompt, expect(prompt))

        cache = EncoderCache(max_bytes=1 << 20)
        one_clip = processor.prepare(messages=AUDIO_CASES["one clip"])
        assert answer(router, one_clip, cache)[0] == expect(one_clip)
        assert len(calls) == 2 and len(cache) == 1
        assert answer(router, moved, cache) == (expect(moved), 0)
        assert len(calls) == 2 and cache.hits == 1
        assert answer(router, fresh, cache)[0] == expect(fresh)
        assert len(calls) == 3
