"""The LLM stage fetches media items' embeddings itself, and only those it lacks.

The worker is driven directly (no sockets): its peer calls are read off and answered by the
test, standing in for the vision stage. Tokens are compared with the same request sent with
its embeddings inline, so every path (encoder call, prefix hit, encoder-output cache, blocks
evicted before the request ran, a lost encoder replica) must give exactly those tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_vl import make_tiny_qwen2_5_vl
from omni.stages.contracts import llm, vision
from omni.stages.contracts.encoder import EMBEDDINGS
from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.worker import LLMWorker
from omni.stages.runtime.worker import PeerCall, PeerReply, WorkerOptions, WorkerRequest

SAMPLING = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
BLOCK = 8
ITEM_LENGTH = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl"))


def make_worker(folder: Path, encoder_cache_mib: int = 64) -> LLMWorker:
    extra = {
        "num_kv_blocks": "64",
        "block_size": str(BLOCK),
        "encoder_cache_mib": str(encoder_cache_mib),
    }
    worker = LLMWorker(WorkerOptions(model=str(folder), device="cpu", extra=extra))
    worker.load()
    return worker


def hidden(worker: LLMWorker) -> int:
    assert worker.engine is not None
    return int(worker.engine.runner.hf_config.get_text_config().hidden_size)


def random_rows(worker: LLMWorker, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ITEM_LENGTH, hidden(worker), generator=generator)


def request(
    prefix: list[int], item_hash: str, embeddings: torch.Tensor | None = None
) -> WorkerRequest:
    """`prefix`, then one image item of ITEM_LENGTH placeholder tokens, then 3 tokens. The
    item's vision request carries a marker byte tensor that the test checks is passed on."""
    pad = 151  # any in-vocabulary id: the placeholder's embeddings replace it
    tokens = [*prefix, *[pad] * ITEM_LENGTH, 7, 8, 9]
    body = vision.CONTRACT.encode(vision.EncodeImage(item="messages[0].content[0]"))
    item = llm.MediaItem(item_hash, len(prefix), ITEM_LENGTH, vision.ROLE, body)
    tensors = {llm.item_tensor(0, vision.IMAGE): torch.tensor([1, 2, 3], dtype=torch.uint8)}
    if embeddings is not None:
        tensors[llm.item_tensor(0, EMBEDDINGS)] = embeddings
    generate = llm.GenerateRequest(tokens, SAMPLING, mm_items=[item])
    request_id = f"r-{item_hash[0]}-{len(prefix)}-{embeddings is None}"
    return WorkerRequest(request_id, tensors, llm.CONTRACT.encode(generate))


def run(worker: LLMWorker, reply: torch.Tensor | str | None = None) -> dict[str, Any]:
    """Step until idle, answering every peer call with `reply` (embeddings, "lost", or an
    error message). Returns {request id: tokens or error} and the calls made."""
    calls: list[PeerCall] = []
    results: dict[str, list[int] | str] = {}
    while worker.has_work() or worker.items.num_waiting:
        new_calls, _ = worker.take_peer_calls()
        calls += new_calls
        for call in new_calls:
            assert call.role == vision.ROLE
            assert call.tensors[vision.IMAGE].tolist() == [1, 2, 3]
            assert vision.CONTRACT.decode_request(call.body).item == "messages[0].content[0]"
            assert reply is not None, "no call was expected"
            if isinstance(reply, torch.Tensor):
                worker.on_peer_reply(PeerReply(call.request_id, {EMBEDDINGS: reply}, finished=True))
            elif reply == "lost":
                worker.on_peer_reply(PeerReply(call.request_id, error="replica gone", lost=True))
            else:
                worker.on_peer_reply(PeerReply(call.request_id, error=str(reply)))
        for output in worker.step():
            if output.error is not None:
                results[output.request_id] = output.error
                continue
            assert isinstance(output.reply, llm.TokenUpdate)
            tokens = results.setdefault(output.request_id, [])
            assert isinstance(tokens, list)
            tokens += output.reply.token_ids_delta
    return {"results": results, "calls": calls}


def test_items_come_from_the_encoder_only_when_no_cache_holds_them(folder: Path) -> None:
    worker = make_worker(folder)
    embeddings = random_rows(worker, 0)
    inline = request([3, 4, 5], "a" * 64, embeddings)
    worker.add_request(inline)
    expected = run(worker)["results"][inline.request_id]
    assert len(expected) == 4
    worker.engine.kv_cache.reset_prefix_cache()  # type: ignore[union-attr]
    worker.items.cache.clear()  # type: ignore[union-attr]

    # Asked of the vision stage once; the reply's rows are spliced in.
    first = request([3, 4, 5], "a" * 64)
    worker.add_request(first)
    out = run(worker, embeddings)
    assert out["results"] == {first.request_id: expected}
    assert len(out["calls"]) == 1 and worker.items.items_encoded == 1
    # Again: the prefix cache covers the item, nobody is asked.
    again = request([3, 4, 5], "a" * 64)
    worker.add_request(again)
    out = run(worker)
    assert out["results"] == {again.request_id: expected} and out["calls"] == []
    # After other text: no prefix hit, but the stage's encoder-output cache has it.
    moved = request([6, 6, 6, 6, 6, 6, 6, 6, 6], "a" * 64)
    worker.add_request(moved)
    out = run(worker)
    assert out["calls"] == [] and worker.items.items_from_cache == 1
    assert len(out["results"][moved.request_id]) == 4


def test_two_requests_for_one_new_item_make_one_encoder_call(folder: Path) -> None:
    worker = make_worker(folder)
    embeddings = random_rows(worker, 1)
    one, two = request([3], "b" * 64), request([4, 4], "b" * 64)
    worker.add_request(one)
    worker.add_request(two)
    out = run(worker, embeddings)
    assert len(out["calls"]) == 1
    assert sorted(out["results"]) == sorted([one.request_id, two.request_id])


def test_blocks_evicted_before_the_request_ran_are_fetched_again(folder: Path) -> None:
    worker = make_worker(folder, encoder_cache_mib=0)
    embeddings = random_rows(worker, 2)
    first = request([3, 4, 5], "c" * 64)
    worker.add_request(first)
    expected = run(worker, embeddings)["results"][first.request_id]
    # Admitted inside a prefix hit (no call), then the blocks go before it is scheduled.
    again = request([3, 4, 5], "c" * 64)
    worker.add_request(again)
    assert worker.take_peer_calls() == ([], [])
    worker.engine.kv_cache.reset_prefix_cache()  # type: ignore[union-attr]
    out = run(worker, embeddings)
    assert len(out["calls"]) == 1
    assert out["results"] == {again.request_id: expected}
    assert not worker.engine.has_unfinished_requests()  # type: ignore[union-attr]


def test_a_lost_encoder_is_asked_again_then_the_request_fails(folder: Path) -> None:
    worker = make_worker(folder)
    embeddings = random_rows(worker, 3)
    # Lost twice, then answered: the request completes on the third call.
    flaky = request([3], "d" * 64)
    worker.add_request(flaky)
    answers = iter(["lost", "lost", embeddings])
    calls = 0
    while worker.has_work() or worker.items.num_waiting:
        for call in worker.take_peer_calls()[0]:
            calls += 1
            reply = next(answers)
            if isinstance(reply, torch.Tensor):
                worker.on_peer_reply(PeerReply(call.request_id, {EMBEDDINGS: reply}, finished=True))
            else:
                worker.on_peer_reply(PeerReply(call.request_id, error="gone", lost=True))
        outputs = worker.step()
        assert all(o.error is None for o in outputs)
    assert calls == 3
    # Lost on every try: the request fails with the encoder's words.
    doomed = request([5], "e" * 64)
    worker.add_request(doomed)
    out = run(worker, "lost")
    assert len(out["calls"]) == 3
    assert out["results"] == {doomed.request_id: "replica gone"}
    # A refusal is not retried.
    refused = request([6], "f" * 64)
    worker.add_request(refused)
    out = run(worker, "messages[0].content[0] could not be decoded")
    assert len(out["calls"]) == 1
    assert out["results"] == {refused.request_id: "messages[0].content[0] could not be decoded"}
    assert worker.items.num_waiting == 0
    assert not worker.engine.has_unfinished_requests()  # type: ignore[union-attr]


def test_an_aborted_request_withdraws_its_encoder_call(folder: Path) -> None:
    worker = make_worker(folder)
    waiting = request([3], "g" * 64)
    worker.add_request(waiting)
    [call], _ = worker.take_peer_calls()
    worker.abort(waiting.request_id)
    assert worker.take_peer_calls() == ([], [call.request_id])
    assert worker.items.num_waiting == 0 and not worker.has_work()
