"""Shared pieces of the speech tests: running a speech worker in process, and word recall."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

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
    worker: StageWorker, params: Mapping[str, Any], request_id: str = "r0"
) -> list[StageOutput]:
    """Every output of one request, stepping the worker as the stage runtime would."""
    worker.add_request(WorkerRequest(request_id=request_id, inputs={}, params=dict(params)))
    outputs: list[StageOutput] = []
    while worker.has_work():
        outputs += worker.step()
    return outputs


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_recall(reference: str, heard: str) -> tuple[int, int]:
    """(reference words heard, reference words): the words of `reference` found in `heard`,
    each counted as often as it occurs in both."""
    expected = Counter(words(reference))
    found = Counter(words(heard))
    return sum((expected & found).values()), sum(expected.values())
