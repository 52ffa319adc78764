"""An image request through separate stage processes: a vision encoder stage and an LLM stage,
each its own supervised process over the transport, answer with transformers' greedy tokens;
a repeated image is not encoded again."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_vl import make_tiny_qwen2_5_vl
from stage_helpers import SHM_PREFIX, ipc_endpoint, our_segments, running_router
from test_vl_engine import CASES, NEW_TOKENS, reference

from omni.multimodal import Qwen2VLPromptProcessor, prepare_qwen2_vl_prompt
from omni.multimodal.requests import items_to_encode, submit_mm_request
from omni.supervision.supervisor import StageSpec, StageSupervisor, SupervisorConfig

SAMPLING = {"temperature": 0.0, "max_tokens": NEW_TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


def test_image_request_through_vision_and_llm_stage_processes(folder: Path) -> None:
    processor = Qwen2VLPromptProcessor.from_pretrained(str(folder))
    prompt = prepare_qwen2_vl_prompt(processor, messages=CASES["two images of different sizes"])
    expected = reference(folder, prompt)
    common = ("--shm-prefix", SHM_PREFIX, "--log-level", "WARNING")
    specs = [
        StageSpec(role="vision", model=str(folder), extra_args=common),
        StageSpec(
            role="llm",
            model=str(folder),
            extra_args=(*common, "--option", "num_kv_blocks=128", "--option", "block_size=8"),
        ),
    ]
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=2.0) as router:
        supervisor = StageSupervisor(router, specs, SupervisorConfig()).start()
        try:
            assert router.wait_for_replicas("vision", 1, timeout=120)
            assert router.wait_for_replicas("llm", 1, timeout=120)
            pids = supervisor.pids()
            assert len(set(pids.values())) == 2  # two processes, neither of them this one

            vision_calls = []
            submit = router.submit

            def counting_submit(role, *args, **kwargs):
                if role == "vision":
                    vision_calls.append(role)
                return submit(role, *args, **kwargs)

            router.submit = counting_submit  # type: ignore[method-assign]
            replies = submit_mm_request(router, prompt, SAMPLING).result(timeout=120)
            assert [t for r in replies for t in r.data["token_ids_delta"]] == expected
            assert replies[-1].data["cached_tokens"] == 0
            assert vision_calls == ["vision"]

            # The same image again: the prefix cache covers both images, so no encoder pass.
            cached = (len(prompt.prompt_token_ids) - 1) // 8 * 8
            assert items_to_encode(prompt, cached) == []
            replies = submit_mm_request(router, prompt, SAMPLING).result(timeout=120)
            assert [t for r in replies for t in r.data["token_ids_delta"]] == expected
            assert replies[-1].data["cached_tokens"] == cached
            assert vision_calls == ["vision"]
            del replies
        finally:
            supervisor.stop()
    assert our_segments() == []
