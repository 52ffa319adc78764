import dataclasses

import pytest
from omni.stages.contracts.sampling import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm_and_openai() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (
        1, 1.0, 1.0, 0, 0.0)
    assert params.max_tokens == 16
    assert params.min_tokens == 0
    assert params.stop == [] and params.stop_strings == []
    assert params.stop_token_ids == [] and params.stop_token_id_list == []
    assert params.seed is None and params.logprobs is None
    assert params.skip_special_tokens is True
    assert params.include_stop_str_in_output is False
    assert params.ignore_eos is False
    assert params.is_greedy is False
    assert params.has_penalties is False


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop_token_ids=(7, 9)).stop_token_ids == [7, 9]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_is_greedy_and_penalties_flags() -> None:
    assert SamplingParams(temperature=0.0).is_greedy is True
    assert SamplingParams(temperature=1e-6).is_greedy is True
    assert SamplingParams(temperature=0.01).is_greedy is False
    assert SamplingParams(repetition_penalty=1.2).has_penalties is True
    assert SamplingParams(presence_penalty=0.5).has_penalties is True
    assert SamplingParams(frequency_penalty=-0.5).has_penalties is True


def test_frozen_and_replace_revalidates() -> None:
    params = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.7
    assert dataclasses.replace(params, top_k=3).top_k == 3
    with pytest.raises(ValueError, match=r"top_k=-2 must be"):
        dataclasses.replace(params, top_k=-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n=0 must be in [1, 128]"),
        ({"n": 129}, "n=129 must be in [1, 128]"),
        ({"logit_bias": {5: 101}}, "logit_bias[5]=101.0 must be in [-100, 100]"),
        ({"logit_bias": {-1: 1}}, "logit_bias keys must be token ids >= 0, got -1"),
        ({"logit_bias": {"x": 1}}, "logit_bias key must be an integer, got 'x'"),
        ({"n": True}, "n must be an integer, got True"),
        ({"temperature": -0.1}, "temperature=-0.1 must be >= 0 (0 means greedy)"),
        ({"temperature": float("nan")}, "temperature must be finite, got nan"),
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"top_k": -2}, "top_k=-2 must be -1 or 0 (disabled) or >= 1"),
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({"min_p": -0.1}, "min_p=-0.1 must be in [0, 1]"),
        ({"min_p": 1.1}, "min_p=1.1 must be in [0, 1]"),
        ({"seed": 2**64}, f"seed={2**64} must be in [{-(2**63)}, {2**64 - 1}]"),
        ({"seed": "7"}, "seed must be an integer, got '7'"),
        ({"max_tokens": 0}, "max_tokens=0 must be >= 1 (or None)"),
        ({"min_tokens": -1}, "min_tokens=-1 must be >= 0"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens=20 must be <= max_tokens=10"),
        ({"stop": ["ok", ""]}, "stop strings must be non-empty strings, got ''"),
        ({"stop": [3]}, "stop strings must be non-empty strings, got 3"),
        ({"stop": 3}, "stop must be a string or a list of strings, got 3"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids items must be >= 0, got -1"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of integers, got 5"),
        ({"logprobs": -1}, f"logprobs=-1 must be in [0, {MAX_LOGPROBS}] (or None)"),
        ({"logprobs": 21}, f"logprobs=21 must be in [0, {MAX_LOGPROBS}] (or None)"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be > 0"),
        ({"presence_penalty": 2.5}, "presence_penalty=2.5 must be in [-2, 2]"),
        ({"frequency_penalty": -3.0}, "frequency_penalty=-3.0 must be in [-2, 2]"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens must be a bool, got 'no'"),
    ],
)
def test_bad_field_names_field_value_and_range(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert str(excinfo.value) == message


def test_edges_of_ranges_are_accepted() -> None:
    params = SamplingParams(
        temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, seed=2**64 - 1, max_tokens=1,
        min_tokens=1, logprobs=MAX_LOGPROBS, repetition_penalty=2.0, presence_penalty=-2.0,
        frequency_penalty=2.0,
    )
    assert (params.top_k, params.min_p, params.seed) == (1, 1.0, 2**64 - 1)
    assert SamplingParams(seed=-(2**63), logprobs=0).seed == -(2**63)
