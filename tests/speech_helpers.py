"""Shared pieces of the speech tests: running a speech worker in process, and word recall."""

from __future__ import annotations

import re
from collections import Counter

from omni.stages.contracts.speech import CONTRACT, SpeechParams, SpeechReply
from omni.stages.runtime import (
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    create_worker,
)


def speech_worker(model: str = "", **extra: str) -> StageWorker:
    worker = create_worker("speech", WorkerOptions(model=model, device="cpu", extra=extra))
    worker.load()
    return worker


def run_request(
    worker: StageWorker, request: SpeechParams | bytes, request_id: str = "r0"
) -> list[StageOutput]:
    """Every output of one request (`SpeechParams`, or a body as any client of the transport
    may send one), stepping the worker as the stage runtime would."""
    body = request if isinstance(request, bytes) else CONTRACT.encode(request)
    worker.add_request(WorkerRequest(request_id=request_id, inputs={}, body=body))
    outputs: list[StageOutput] = []
    while worker.has_work():
        outputs += worker.step()
    return outputs


def reply(output: StageOutput) -> SpeechReply:
    """The output's reply struct (an output with an error has none)."""
    assert isinstance(output.reply, SpeechReply), output.error
    return output.reply


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_recall(reference: str, heard: str) -> tuple[int, int]:
    """(reference words heard, reference words): the words of `reference` found in `heard`,
    each counted as often as it occurs in both."""
    expected = Counter(words(reference))
    found = Counter(words(heard))
    return sum((expected & found).values()), sum(expected.values())
