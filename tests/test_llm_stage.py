"""The LLM core behind the stage runtime: requests over the transport give the offline tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_models import make_tiny_checkpoint
from omni.stages.contracts import llm
from omni.stages.llm.worker import LLMWorker, engine_config
from omni.stages.runtime import StageConfig, StageRuntime, WorkerOptions
from stage_helpers import SHM_PREFIX, running_router

from omni import LLM, SamplingParams
from omni.multimodal.requests import llm_request
from omni.supervision.streams import StageRequestError

ENDPOINT = "inproc://omni-llm-stage"
SAMPLING = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint("llama", path)
    return path


def test_options_parse_to_engine_fields(checkpoint: Path) -> None:
    options = WorkerOptions(
        model=str(checkpoint),
        device="cpu",
        extra={"max_num_seqs": "4", "enable_prefix_caching": "false", "max_model_len": "none"},
    )
    config = engine_config(options)
    assert (config.max_num_seqs, config.enable_prefix_caching, config.max_model_len) == (
        4,
        False,
        None,
    )
    with pytest.raises(ValueError, match="unknown LLM stage option 'max_seqs'"):
        engine_config(WorkerOptions(model="x", extra={"max_seqs": "4"}))
    with pytest.raises(ValueError, match="option max_num_seqs must be an integer, got 'many'"):
        engine_config(WorkerOptions(model="x", extra={"max_num_seqs": "many"}))


def test_requests_through_the_stage_match_offline(checkpoint: Path) -> None:
    prompts = [[5, 9, 13, 2, 7], [40, 41, 42], list(range(3, 40))]
    offline = LLM(str(checkpoint), device="cpu", num_kv_blocks=64)
    expected = [
        o.outputs[0].token_ids
        for o in offline.generate(prompts, SAMPLING, use_tqdm=False)
    ]

    options = WorkerOptions(model=str(checkpoint), device="cpu", extra={"num_kv_blocks": "64"})
    worker = LLMWorker(options)
    config = StageConfig(
        role="llm",
        connect=ENDPOINT,
        heartbeat_interval_s=0.05,
        server_timeout_s=1.0,
        shm_prefix=SHM_PREFIX,
        replica_id="llm-0",
    )
    with running_router(ENDPOINT, shared_memory=False) as router:
        runtime = StageRuntime(config, worker).start()
        try:
            assert router.wait_for_replicas("llm", 1, timeout=30)
            streams = [router.submit("llm", *llm_request(p, SAMPLING)) for p in prompts]
            bad = router.submit("llm", *llm_request([], SAMPLING))
            garbled = router.submit("llm", {}, b"\x93not a request")
            for stream, tokens in zip(streams, expected, strict=True):
                updates = [llm.CONTRACT.decode_reply(r.body) for r in stream.result(timeout=30)]
                assert [t for u in updates for t in u.token_ids_delta] == tokens
                assert (updates[-1].finish_reason, updates[-1].completion_tokens) == ("length", 6)
            with pytest.raises(StageRequestError, match="prompt is empty"):
                bad.result(timeout=30)
            with pytest.raises(StageRequestError, match="bad llm request"):
                garbled.result(timeout=30)
            # Everything is released in the stage: no request left, every block free.
            assert worker.engine is not None
            assert not worker.engine.has_unfinished_requests()
            assert worker.engine.kv_cache.num_free_blocks == 63
        finally:
            runtime.stop()
            runtime.join(10)
