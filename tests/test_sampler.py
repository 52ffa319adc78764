import math
from typing import Any

import pytest
import torch
from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_only,
    apply_top_k_top_p,
)

NEG_INF = float("-inf")


def _batch(
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    **kwargs: Any,
) -> SamplingBatch:
    if generators is None:
        generators = [None] * len(params)
    return SamplingBatch.from_params(params, generators, "cpu", **kwargs)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=_seeded(seed)) * 3.0


def _log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def test_greedy_picks_argmax_and_lowest_index_on_ties() -> None:
    logits = torch.tensor([
        [0.1, 2.0, -1.0, 0.5],
        [3.0, 3.0, 1.0, 0.0],
        [-5.0, -4.0, -3.0, -3.5],
    ])
    out = Sampler()(logits, _batch([SamplingParams(temperature=0.0)] * 3))
    assert out.token_ids.tolist() == [1, 0, 2]
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None


def test_batch_flags_and_neutral_filters_for_greedy_rows() -> None:
    batch = _batch([
        SamplingParams(temperature=0.0, top_k=50, top_p=0.1, min_p=0.3),
        SamplingParams(temperature=0.7, top_k=5, logprobs=3),
        SamplingParams(temperature=1.0, top_k=9, seed=1),
    ], generators=[_seeded(1), None, _seeded(2)])
    assert (batch.all_greedy, batch.all_random, batch.needs_logprobs) == (False, False, True)
    assert batch.top_k.tolist() == [0, 5, 9]
    assert batch.top_p.tolist() == [1.0, 1.0, 1.0]
    assert batch.min_p.tolist() == [0.0, 0.0, 0.0]
    assert (batch.max_top_k, batch.needs_top_p, batch.needs_min_p) == (9, False, False)
    assert batch.max_num_logprobs == 3
    assert sorted(batch.generators) == [2]  # greedy row 0 needs no generator
    assert batch.temperature.dtype == torch.float32 and batch.top_k.dtype == torch.int32


def test_seeded_row_gives_same_tokens_alone_and_in_a_mixed_batch() -> None:
    vocab, steps = 64, 12
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=7),
        SamplingParams(temperature=0.8, min_p=0.05, seed=99),
    ]
    alone_gen, mixed_gen, other_gen = _seeded(1234), _seeded(1234), _seeded(99)
    alone, mixed, different_seed = [], [], []
    other_seed_gen = _seeded(4321)
    for step in range(steps):
        logits = _random_logits(4, vocab, seed=step)
        row = logits[2:3]
        alone.append(Sampler()(row, _batch([seeded], [alone_gen])).token_ids.item())
        torch.manual_seed(1000 + step)  # seeds the unseeded rows' generator
        batch = _batch([others[0], others[1], seeded, others[2]],
                       [None, None, mixed_gen, other_gen])
        mixed.append(Sampler()(logits, batch).token_ids[2].item())
        different_seed.append(
            Sampler()(row, _batch([seeded], [other_seed_gen])).token_ids.item())
    assert alone == mixed
    assert alone != different_seed  # the seed matters: the test could fail
    # Replaying the seed from scratch reproduces the stream.
    replay_gen = _seeded(1234)
    replay = [Sampler()(_random_logits(4, vocab, seed=s)[2:3],
                        _batch([seeded], [replay_gen])).token_ids.item() for s in range(steps)]
    assert replay == alone


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    logits = _random_logits(16, 500, seed=3)
    expected = logits.argmax(dim=-1).tolist()
    torch.manual_seed(0)
    top_k_1 = Sampler()(logits, _batch([SamplingParams(temperature=1.5, top_k=1)] * 16))
    tiny_p = Sampler()(logits, _batch([SamplingParams(temperature=1.5, top_p=1e-6)] * 16))
    both = Sampler()(logits, _batch([SamplingParams(temperature=2.0, top_k=3, top_p=1e-6)] * 16))
    assert top_k_1.token_ids.tolist() == expected
    assert tiny_p.token_ids.tolist() == expected
    assert both.token_ids.tolist() == expected


def test_top_k_masks_exactly_the_tail_with_and_without_sort() -> None:
    logits = torch.tensor([
        [0.5, 3.0, 1.0, 2.0, -1.0],
        [0.5, 3.0, 1.0, 2.0, -1.0],
        [0.5, 3.0, 1.0, 2.0, -1.0],
    ])
    top_k = torch.tensor([2, 0, 4], dtype=torch.int32)
    expected = [[1, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3]]
    partial = apply_top_k_only(logits.clone(), top_k, max_top_k=4)
    sorted_path = apply_top_k_top_p(logits.clone(), top_k, torch.ones(3))
    for masked in (partial, sorted_path):
        kept = [torch.isfinite(row).nonzero().flatten().tolist() for row in masked]
        assert kept == expected
        assert masked[0, 1].item() == 3.0 and masked[2, 0].item() == 0.5  # kept values intact


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = _log_probs(0.5, 0.3, 0.15, 0.05).repeat(3, 1)
    top_p = torch.tensor([0.75, 0.9, 0.4])
    masked = apply_top_k_top_p(logits.clone(), None, top_p)
    kept = [torch.isfinite(row).nonzero().flatten().tolist() for row in masked]
    assert kept == [[0, 1], [0, 1, 2], [0]]


def test_min_p_filters_exactly_the_expected_ids() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.6, 0.25, 0.05]])
    filtered = apply_min_p(probs.clone(), torch.tensor([0.2, 0.5]))
    # Row 0: threshold 0.1 drops id 3; row 1: threshold 0.3 keeps only id 1.
    assert torch.equal(filtered, torch.tensor([[0.5, 0.3, 0.15, 0.0], [0.0, 0.6, 0.0, 0.0]]))
    # Through the sampler: 400 draws only ever hit the kept ids, and hit all of them.
    logits = torch.log(probs[0]).repeat(400, 1)
    torch.manual_seed(0)
    out = Sampler()(logits, _batch([SamplingParams(min_p=0.2)] * 400))
    assert sorted(set(out.token_ids.tolist())) == [0, 1, 2]


def test_sampling_follows_the_distribution() -> None:
    # The exponential race must sample exactly from softmax(logits / T): check frequencies.
    rows = 20000
    logits = _log_probs(0.5, 0.3, 0.15, 0.05).repeat(rows, 1)
    torch.manual_seed(123)
    out = Sampler()(logits, _batch([SamplingParams(temperature=1.0)] * rows))
    freq = torch.bincount(out.token_ids, minlength=4).float() / rows
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.015)
    # Temperature 0.5 squares the odds: p ∝ [0.25, 0.09, 0.0225, 0.0025].
    torch.manual_seed(321)
    out = Sampler()(logits, _batch([SamplingParams(temperature=0.5)] * rows))
    freq = torch.bincount(out.token_ids, minlength=4).float() / rows
    expected = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    assert freq.tolist() == pytest.approx((expected / expected.sum()).tolist(), abs=0.015)


def test_top_k_sampling_only_returns_the_top_k_ids() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.9, -1.0, 1.8, 0.5]]).repeat(300, 1)
    torch.manual_seed(5)
    out = Sampler()(logits, _batch([SamplingParams(temperature=5.0, top_k=3)] * 300))
    assert sorted(set(out.token_ids.tolist())) == [1, 2, 4]


def test_logprobs_are_raw_log_softmax_at_chosen_ids() -> None:
    logits = _random_logits(5, 40, seed=11).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.7, logprobs=2, seed=5),
        SamplingParams(temperature=1.5, top_k=4, top_p=0.9, logprobs=0),
        SamplingParams(temperature=0.3, presence_penalty=1.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=1),
    ]
    batch = _batch(params, [None, _seeded(5), None, None, None],
                   output_token_ids=[[], [1, 2], [], [3, 3], [7]],
                   prompt_token_ids=[[1], [2], [3], [4], [5, 6]])
    torch.manual_seed(0)
    before = logits.clone()
    out = Sampler()(logits, batch)
    assert torch.equal(logits, before)  # the caller's logits are never modified
    raw = logits.float().log_softmax(dim=-1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    expected = raw.gather(1, out.token_ids[:, None]).squeeze(1)
    assert torch.equal(out.logprobs, expected)
    assert out.top_logprobs is not None and out.top_token_ids is not None
    assert out.top_logprobs.shape == (5, 2)
    top = raw.topk(2, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices)
    assert torch.equal(out.top_logprobs, top.values)


def test_penalties_change_logits_exactly() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    rep = _batch([SamplingParams(temperature=0.0, repetition_penalty=2.0)],
                 output_token_ids=[[0]], prompt_token_ids=[[1, 2]])
    # Seen ids 0, 1, 2 become 1.0, -2.0, 0.25: id 0 now ties with id 3 (1.0) and the argmax
    # takes the lowest index.
    assert Sampler()(logits, rep).token_ids.tolist() == [0]
    rep3 = _batch([SamplingParams(temperature=0.0, repetition_penalty=3.0)],
                  output_token_ids=[[0]], prompt_token_ids=[[]])
    assert Sampler()(logits, rep3).token_ids.tolist() == [3]  # 2/3 < 1.0

    batch = _batch([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                                   repetition_penalty=2.0)],
                   output_token_ids=[[3, 3, 0]], prompt_token_ids=[[1]])
    penalised = apply_penalties(logits.clone(), batch)
    # id 0: 2/2 - 0.25 - 0.5; id 1: -1*2 (prompt only: no presence/frequency);
    # id 3: 1/2 - 2*0.25 - 0.5.
    assert penalised.tolist() == [[0.25, -2.0, 0.5, -0.5, 0.0]]


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[1.0, 5.0, 4.0, 3.0, 2.0]]).repeat(4, 1)
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2]),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2]),  # reached
        SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.0),
    ]
    batch = _batch(params, output_token_ids=[[9], [9, 9], [], []],
                   eos_token_ids=[{1}, {1}, {1}, {1}])
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == [3, 1, 1, 1]
    assert batch.banned_rows is not None and batch.banned_token_ids is not None
    assert list(zip(batch.banned_rows.tolist(), batch.banned_token_ids.tolist(),
                    strict=True)) == [(0, 1), (0, 2)]


def test_mixed_greedy_and_random_rows() -> None:
    logits = _random_logits(6, 300, seed=21)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    torch.manual_seed(1)
    out = Sampler()(logits, _batch(params))
    greedy_rows = out.token_ids[0::2].tolist()
    assert greedy_rows == logits.argmax(dim=-1)[0::2].tolist()


def test_huge_top_k_is_clamped_to_the_vocabulary() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    torch.manual_seed(0)
    out = Sampler()(logits, _batch([SamplingParams(top_k=1000)]))
    assert 0 <= out.token_ids.item() < 3
    masked = apply_top_k_top_p(logits.clone(), torch.tensor([1000]), torch.ones(1))
    assert masked.tolist() == [[0.0, 1.0, 2.0]]


def test_bad_inputs_raise_clear_errors() -> None:
    params = [SamplingParams(), SamplingParams()]
    with pytest.raises(ValueError, match=r"^got 1 generators for 2 rows$"):
        SamplingBatch.from_params(params, [None], "cpu")
    with pytest.raises(ValueError, match=r"^got 1 output_token_ids lists for 2 rows$"):
        SamplingBatch.from_params(params, [None, None], "cpu", output_token_ids=[[1]])
    with pytest.raises(ValueError, match="output_token_ids are required when a row uses "
                                         "penalties"):
        _batch([SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="prompt_token_ids are required when a row uses "
                                         "repetition_penalty"):
        _batch([SamplingParams(repetition_penalty=1.1)], output_token_ids=[[]])
    with pytest.raises(ValueError, match="output_token_ids are required when a row uses "
                                         "min_tokens"):
        _batch([SamplingParams(min_tokens=1)])
    with pytest.raises(ValueError, match=r"logits shape \(3, 5\) does not match 2 rows"):
        Sampler()(torch.zeros(3, 5), _batch(params))


def test_logit_bias_adds_to_its_row_only() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.5], [0.0, 2.0, 1.0, 0.5]])
    biased = SamplingParams(temperature=0.0, logit_bias={3: 1.75, 1: -100})
    out = Sampler()(logits, _batch([biased, SamplingParams(temperature=0.0)]))
    # Row 0: token 1 banned, token 3 now 2.25 > token 2's 1.0; row 1 untouched.
    assert out.token_ids.tolist() == [3, 1]


def test_grammar_bitmask_masks_only_the_constrained_rows() -> None:
    import xgrammar

    vocab = 40
    logits = torch.arange(vocab, dtype=torch.float32).repeat(3, 1)  # argmax: the last token
    bitmask = xgrammar.allocate_token_bitmask(3, vocab)
    bitmask[0].zero_()
    bitmask[0, 0] = 1 << 5  # row 0 allows token 5 only
    bitmask[1].zero_()
    bitmask[1, 0] = (1 << 7) | (1 << 9)  # row 1 draws from tokens 7 and 9
    bitmask[2].zero_()  # row 2's bits say nothing may pass, but row 2 is not constrained
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.0)]
    batch = _batch(params, [None, _seeded(1), None])
    batch.grammar_bitmask, batch.grammar_rows = bitmask, [0, 1]
    out = Sampler()(logits, batch)
    assert out.token_ids[0].item() == 5
    assert out.token_ids[2].item() == vocab - 1
    assert out.token_ids[1].item() in (7, 9)


def test_unseeded_rows_draw_from_the_samplers_own_generator() -> None:
    """Unseeded rows never touch the global RNG while sampling (a vision encoder capturing a
    CUDA graph on another thread holds the device's default generator), yet a run stays
    repeatable under torch.manual_seed, and one sampler's draws go on from step to step."""
    logits = _random_logits(64, 50, seed=3)
    params = [SamplingParams(temperature=1.0)] * 64

    def two_steps() -> tuple[list[int], list[int]]:
        torch.manual_seed(11)
        sampler = Sampler()
        first = sampler(logits, _batch(params)).token_ids.tolist()
        state = torch.get_rng_state()
        second = sampler(logits, _batch(params)).token_ids.tolist()
        assert torch.equal(torch.get_rng_state(), state)  # the second step drew nothing global
        return first, second

    first, second = two_steps()
    assert two_steps() == (first, second)
    assert first != second
