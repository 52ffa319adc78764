"""The LLM stage then the speech stage, each its own supervised process over the transport:
the embedded SmolLM2 answers a question and the default voice speaks the answer. The answer
equals the engine's greedy answer in this process, and its audio equals the speech stage's
output for the same text in this process, sample for sample, streamed one sentence a reply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_audio import require_espeak
from omni.stages.contracts import llm as llm_contract
from omni.stages.contracts import speech
from omni.stages.contracts.speech import SpeechParams
from speech_helpers import reply, run_request, speech_worker
from stage_helpers import SHM_PREFIX, ipc_endpoint, our_segments, running_router
from transformers import AutoTokenizer

from omni import LLM, SamplingParams
from omni.supervision.supervisor import StageSpec, StageSupervisor, SupervisorConfig

QUESTION = "Tell me about Paris."
MAX_TOKENS = 40


@pytest.mark.slow
def test_llm_stage_answer_spoken_by_speech_stage_process(smollm2_dir: Path) -> None:
    require_espeak()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    prompt = list(tokenizer.encode(text, add_special_tokens=False))
    sampling = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    [direct] = llm.generate([prompt], SamplingParams(**sampling), use_tqdm=False)
    expected_answer = direct.outputs[0].text.strip()
    del llm
    assert "Paris" in expected_answer

    common = ("--shm-prefix", SHM_PREFIX, "--log-level", "WARNING")
    specs = [
        StageSpec(
            role="llm",
            model=str(smollm2_dir),
            extra_args=(*common, "--option", "num_kv_blocks=64", "--option", "dtype=float32"),
        ),
        StageSpec(role="speech", model="", extra_args=common),
    ]
    with ipc_endpoint() as endpoint, running_router(endpoint, heartbeat_timeout_s=2.0) as router:
        supervisor = StageSupervisor(router, specs, SupervisorConfig()).start()
        try:
            assert router.wait_for_replicas("llm", 1, timeout=120)
            assert router.wait_for_replicas("speech", 1, timeout=120)
            pids = supervisor.pids()
            assert len(set(pids.values())) == 2  # two processes, neither of them this one

            request = llm_contract.GenerateRequest(prompt, SamplingParams(**sampling))
            replies = router.submit("llm", body=llm_contract.CONTRACT.encode(request)).result(120)
            answer = "".join(llm_contract.CONTRACT.decode_reply(r.body).text_delta for r in replies)
            assert answer.strip() == expected_answer

            spoken = SpeechParams(input=answer.strip(), response_format="wav")
            stream = router.submit("speech", body=speech.CONTRACT.encode(spoken))
            chunks = stream.result(timeout=120)
            del replies
        finally:
            supervisor.stop()
    assert our_segments() == []

    local = run_request(speech_worker(), spoken)
    assert len(chunks) == len(local) >= 2  # one reply per sentence
    assert [speech.CONTRACT.decode_reply(c.body) for c in chunks] == [reply(o) for o in local]
    for chunk, output in zip(chunks, local, strict=True):
        assert torch.equal(chunk.tensors["audio"], output.tensors["audio"])
    assert torch.equal(chunks[-1].tensors["encoded"], local[-1].tensors["encoded"])
    samples = reply(local[-1]).num_samples
    print(f"answer {answer!r}: {len(chunks)} chunks, {samples} samples")
