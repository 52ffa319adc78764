"""A short prefill run as single-token decode rows (how the decode CUDA graphs take it on a
GPU) gives the hidden states of the ordinary step: here both run eagerly on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import make_tiny_checkpoint, step_hidden_states
from omni.stages.llm.step_inputs import (
    MAX_QUERY_LEN_AS_ROWS,
    as_decode_rows,
    build_host_inputs,
    pad_tokens,
)

from omni import LLM, SamplingParams

BLOCK = 4


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = tmp_path_factory.mktemp("llama")
    make_tiny_checkpoint("llama", path)
    return LLM(str(path), device="cpu", dtype="float32", block_size=BLOCK, num_kv_blocks=64, seed=0)


def test_prefix_hit_remainders_as_decode_rows(llm: LLM) -> None:
    gen = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 300, (13,), generator=gen).tolist()
    # Fill the prefix cache with the shared 12 tokens (3 full blocks).
    llm.generate([shared], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    tails = [[7], [8, 9, 10], [11, 12, 13, 14, 15, 16]]
    engine = llm.engine
    for i, tail in enumerate(tails):
        engine.add_request(f"r{i}", shared[:12] + tail, SamplingParams(max_tokens=1))
    fresh = torch.randint(3, 300, (5,), generator=gen).tolist()
    engine.add_request("fresh", fresh, SamplingParams(max_tokens=1))
    out = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [1, 3, 6, 5]

    host = build_host_inputs(out.scheduled, BLOCK, engine.runner.table_width)
    rows = as_decode_rows(host)
    assert rows is not None and rows.is_decode_only
    assert rows.num_reqs == host.num_tokens == 15
    assert rows.seq_lens.tolist() == [13, 13, 14, 15, 13, 14, 15, 16, 17, 18, 1, 2, 3, 4, 5]
    assert np.array_equal(rows.block_tables[4], host.block_tables[2])

    expected = step_hidden_states(llm, host)
    got = step_hidden_states(llm, rows)[torch.from_numpy(host.logits_indices)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for s in out.scheduled:
        engine.abort_request(s.request.request_id)
    assert engine.kv_cache.num_free_blocks == 63


def test_long_queries_stay_ordinary_steps(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("long", list(range(3, 3 + MAX_QUERY_LEN_AS_ROWS + 1)), SamplingParams())
    out = engine.scheduler.schedule()
    host = build_host_inputs(out.scheduled, BLOCK, engine.runner.table_width)
    assert as_decode_rows(host) is None
    engine.abort_request("long")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_serve_prefix_hit_remainders(tmp_path: Path) -> None:
    make_tiny_checkpoint("llama", tmp_path)
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 300, (24,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, 300, (n,), generator=gen).tolist() for n in (1, 3, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(enforce_eager: bool) -> list[list[int]]:
        llm = LLM(str(tmp_path), dtype="float32", block_size=BLOCK, enforce_eager=enforce_eager)
        llm.generate([shared], params, use_tqdm=False)  # the shared prefix is cached now
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run(enforce_eager=False) == run(enforce_eager=True)


def test_mrope_positions_of_a_mixed_step() -> None:
    """M-RoPE rows of one step: a prefill chunk inside its prompt, a chunk that crosses the
    prompt's end, a decode row, and a text-only request (index plus delta in all rows)."""
    from omni.stages.llm.request import Request
    from omni.stages.llm.scheduler import ScheduledRequest

    def request(name: str, prompt_len: int, table: np.ndarray | None, delta: int) -> Request:
        return Request(
            request_id=name,
            prompt_token_ids=list(range(3, 3 + prompt_len)),
            sampling_params=SamplingParams(max_tokens=4),
            mrope_positions=table,
            mrope_position_delta=delta,
        )

    # A 6-token prompt whose processor table differs per row (an image's t/h/w positions).
    table = np.array([[0, 1, 1, 1, 2, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]], np.int64)
    inside = request("inside", 6, table, -2)
    inside.num_computed_tokens = 1  # chunk of tokens 1..3
    crossing = request("crossing", 6, table, -2)
    crossing.append_output_token(9, None)
    crossing.append_output_token(9, None)
    crossing.num_computed_tokens = 4  # tokens 4..7: two in the prompt, two past it
    decoding = request("decoding", 6, table, -2)
    for _ in range(3):
        decoding.append_output_token(9, None)
    decoding.num_computed_tokens = 8  # token 8, past the prompt
    text = request("text", 3, None, 5)
    text.num_computed_tokens = 0  # its whole 3-token prompt
    scheduled = [
        ScheduledRequest(inside, 3, [1, 2]),
        ScheduledRequest(crossing, 4, [3, 4]),
        ScheduledRequest(decoding, 1, [5, 6, 7]),
        ScheduledRequest(text, 3, [8]),
    ]
    host = build_host_inputs(scheduled, BLOCK, mrope=True)
    assert host.rope_positions is not None
    assert host.rope_positions.tolist() == [
        [1, 1, 1, 2, 3, 4, 5, 6, 5, 6, 7],
        [1, 1, 2, 2, 3, 4, 5, 6, 5, 6, 7],
        [1, 2, 1, 2, 3, 4, 5, 6, 5, 6, 7],
    ]
    assert host.positions.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    padded = pad_tokens(host, 8)
    assert padded.rope_positions is not None
    assert padded.rope_positions[:, 11:].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert np.array_equal(padded.rope_positions[:, :11], host.rope_positions)


def test_padded_step_gives_the_same_hidden_states(llm: LLM) -> None:
    """A step rounded up to a multiple of 8 tokens: the padding is one more request that
    writes no KV and reads only the null block; the real rows' hidden states do not change."""
    gen = torch.Generator().manual_seed(5)
    engine = llm.engine
    for i, length in enumerate((5, 9)):
        prompt = torch.randint(3, 300, (length,), generator=gen).tolist()
        engine.add_request(f"pad{i}", prompt, SamplingParams(max_tokens=1))
    out = engine.scheduler.schedule()
    host = build_host_inputs(out.scheduled, BLOCK, engine.runner.table_width)
    padded = pad_tokens(host, 8)
    assert padded.num_tokens == 16 and padded.num_reqs == 3
    assert padded.query_start_loc.tolist() == [0, 5, 14, 16]
    assert padded.seq_lens.tolist() == [5, 9, 2]
    assert padded.slot_mapping[14:].tolist() == [-1, -1]
    assert padded.token_ids[14:].tolist() == [0, 0]
    assert padded.positions[14:].tolist() == [0, 1]
    assert not padded.block_tables[2].any()
    assert padded.logits_indices.tolist() == host.logits_indices.tolist() == [4, 13]
    assert padded.max_query_len == 9 and padded.max_seq_len == 9
    assert pad_tokens(padded, 8) is padded
    # The KV the real tokens write is the same either way: compare after each writes it.
    cache_before = [c.clone() for c in engine.runner.kv_caches]
    plain = step_hidden_states(llm, host)
    cache_plain = [c.clone() for c in engine.runner.kv_caches]
    for cache, saved in zip(engine.runner.kv_caches, cache_before, strict=True):
        cache.copy_(saved)
    with_padding = step_hidden_states(llm, padded)
    torch.testing.assert_close(with_padding, plain, rtol=1e-5, atol=1e-5)
    for cache, want in zip(engine.runner.kv_caches, cache_plain, strict=True):
        assert torch.equal(cache, want)
    engine.abort_request(["pad0", "pad1"])


def test_gemm_warm_up_runs_every_linear_shape_at_every_rounded_count(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each distinct (weight shape, bias) of the model's linear layers, with a contiguous
    input of its own width, at 8, 16, ..., 40 rows for a budget of 36 tokens."""
    from omni.stages.llm.eager_shapes import warm_up_gemms

    seen: list[tuple[int, int, int, bool, bool]] = []
    linear = torch.nn.functional.linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        seen.append((x.shape[0], *weight.shape, bias is not None, x.is_contiguous()))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    model = llm.engine.runner.model
    shapes = {
        (*m.weight.shape, getattr(m, "bias", None) is not None)
        for m in model.modules()
        if hasattr(m, "weight") and m.weight.dim() == 2 and type(m).__name__.endswith("Linear")
    }
    assert len(shapes) == 4  # the fused qkv, o, the fused gate-up, down projections
    warm_up_gemms(model, 36, 8)
    assert sorted(seen) == sorted(
        (rows, out, into, bias, True) for rows in (8, 16, 24, 32, 40) for out, into, bias in shapes
    )
    # Counts the mixed-step graphs cover (up to 16 here) are left to their capture.
    seen.clear()
    warm_up_gemms(model, 36, 8, above=16)
    assert sorted(seen) == sorted(
        (rows, out, into, bias, True) for rows in (24, 32, 40) for out, into, bias in shapes
    )
