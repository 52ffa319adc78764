"""Steps with prompt tokens replayed as CUDA graphs (cuda_graphs.MixedGraphs).

On the CPU: the padded layout a mixed graph reads (graph_inputs.StepStaging) leaves the real
rows' hidden states and KV writes as they were, checked by running the padded step eagerly.
On a GPU: the engine's greedy tokens with mixed graphs equal those without any graph, for text
prompts with prefix hits and asynchronous scheduling, and for image prompts whose embeddings
are spliced before the replay; and the graphs were replayed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import make_tiny_checkpoint, step_hidden_states
from omni.stages.llm.cuda_graphs import mixed_capture_sizes
from omni.stages.llm.graph_inputs import GraphShape, StepStaging
from omni.stages.llm.step_inputs import build_host_inputs

from omni import LLM, SamplingParams

BLOCK = 4


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint("llama", path)
    # Synchronous steps: a decoding request's last token is on the host when a test builds a step.
    return LLM(
        str(path), device="cpu", dtype="float32", block_size=BLOCK, num_kv_blocks=64, seed=0,
        async_scheduling=False,
    )


def test_capture_sizes_are_the_eager_rounding() -> None:
    assert mixed_capture_sizes(256) == [64, 128, 192, 256]
    assert mixed_capture_sizes(1000) == list(range(64, 961, 64))
    assert mixed_capture_sizes(63) == []


def test_mixed_layout_gives_the_same_hidden_states_and_kv(llm: LLM) -> None:
    """A decoding request, a prefix-hit remainder and a fresh prompt in one step, padded to a
    64-token, 6-request graph: padded tokens belong to no request and write no KV, padded
    requests have no tokens; the real rows' results do not change."""
    gen = torch.Generator().manual_seed(11)
    engine = llm.engine
    sampling = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    shared = torch.randint(3, 300, (12,), generator=gen).tolist()
    llm.generate([[*shared, 5]], SamplingParams(max_tokens=1), use_tqdm=False)
    engine.add_request("decoding", torch.randint(3, 300, (6,), generator=gen).tolist(), sampling)
    engine.step()  # its prompt; it decodes in the next step
    engine.add_request("hit", [*shared, 7, 8, 9], sampling)
    engine.add_request("fresh", torch.randint(3, 300, (9,), generator=gen).tolist(), sampling)
    out = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [1, 3, 9]
    host = build_host_inputs(out.scheduled, BLOCK, engine.runner.table_width)

    shape = GraphShape(num_tokens=64, num_reqs=6, decode=False)
    staging = StepStaging(1, 64, 6, engine.runner.table_width, pin=False)
    staging.seq_lens.fill_(77)  # stale values from an earlier step must be overwritten
    staging.fill(host, shape)
    padded = staging.as_host_inputs(host, shape)
    assert padded.query_start_loc.tolist() == [0, 1, 4, 13, 13, 13, 13]
    assert padded.seq_lens.tolist() == [7, 15, 9, 0, 0, 0]
    assert padded.logits_indices.tolist() == [0, 3, 12, 0, 0, 0]
    assert padded.slot_mapping[13:].tolist() == [-1] * 51
    assert padded.token_ids[13:].tolist() == [0] * 51
    assert padded.positions[13:].tolist() == [0] * 51
    assert np.array_equal(padded.token_ids[:13], host.token_ids)
    assert np.array_equal(padded.block_tables[:3], host.block_tables)

    cache_before = [c.clone() for c in engine.runner.kv_caches]
    plain = step_hidden_states(llm, host)
    cache_plain = [c.clone() for c in engine.runner.kv_caches]
    for cache, saved in zip(engine.runner.kv_caches, cache_before, strict=True):
        cache.copy_(saved)
    graphed_layout = step_hidden_states(llm, padded)[:3]
    torch.testing.assert_close(graphed_layout, plain, rtol=1e-5, atol=1e-5)
    for cache, want in zip(engine.runner.kv_caches, cache_plain, strict=True):
        assert torch.equal(cache, want)
    engine.abort_request(["decoding", "hit", "fresh"])
    assert engine.kv_cache.num_free_blocks == 63


def test_a_step_larger_than_the_graph_is_refused(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("big", list(range(3, 40)), SamplingParams(max_tokens=1))
    out = engine.scheduler.schedule()
    host = build_host_inputs(out.scheduled, BLOCK, engine.runner.table_width)
    staging = StepStaging(1, 64, 6, engine.runner.table_width, pin=False)
    with pytest.raises(ValueError, match=r"a step of 37 tokens, 1 requests does not fit"):
        staging.fill(host, GraphShape(num_tokens=32, num_reqs=6, decode=False))
    engine.abort_request("big")


def test_decode_layout_pads_rows_that_read_the_null_block(llm: LLM) -> None:
    engine = llm.engine
    sampling = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"d{i}", [5 + i, 6, 7], sampling)
    engine.step()
    out = engine.scheduler.schedule()
    host = build_host_inputs(out.scheduled, BLOCK, engine.runner.table_width)
    assert host.is_decode_only
    staging = StepStaging(1, 8, 8, engine.runner.table_width, pin=False)
    staging.fill(host, GraphShape(num_tokens=4, num_reqs=4, decode=True))
    assert staging.seq_lens[:4].tolist() == [4, 4, 4, 1]
    assert staging.int64[1, :4].tolist()[3] == -1
    assert staging.query_start_loc.tolist() == [0] * 9  # fixed on the device; not staged
    engine.abort_request(["d0", "d1", "d2"])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_engine_tokens_with_mixed_graphs_equal_eager(tmp_path: Path) -> None:
    make_tiny_checkpoint("llama", tmp_path)
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 300, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 9, 70)]
    prompts += [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (3, 130, 200)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(enforce_eager: bool) -> tuple[list[list[int]], int]:
        llm = LLM(str(tmp_path), dtype="float32", block_size=BLOCK, enforce_eager=enforce_eager,
                  max_num_seqs=8, max_num_batched_tokens=200, max_graph_tokens=128)
        llm.generate([shared], params, use_tqdm=False)  # the shared prefix is cached now
        outputs = llm.generate(prompts, params, use_tqdm=False)
        graphs = llm.engine.runner.mixed_graphs
        return [o.outputs[0].token_ids for o in outputs], 0 if graphs is None else graphs.replays

    eager, no_replays = run(enforce_eager=True)
    graphed, replays = run(enforce_eager=False)
    assert no_replays == 0 and replays >= 2
    assert graphed == eager
