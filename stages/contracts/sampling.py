"""Per-request sampling settings, as an OpenAI / vLLM user writes them.

The object is validated once, at the edge, so the sampler and the detokenizer can trust every
field: a bad value raises ValueError naming the field, the value and the allowed range, which
the HTTP layer turns into a 400 for the client.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from omni.stages.contracts.structured_outputs import StructuredOutputs

# Below this temperature a request is greedy: dividing logits by ~0 would overflow, and the
# distribution is a point mass on the argmax anyway. Same threshold as vLLM.
GREEDY_TEMPERATURE_EPS = 1e-5
# Top-N alternatives cost a top-k over the vocabulary per row; OpenAI caps `top_logprobs` at 20.
MAX_LOGPROBS = 20
# OpenAI's bounds: at most 128 choices, and a logit bias in [-100, 100] (-100 bans a token,
# 100 all but forces it).
MAX_N = 128
MAX_LOGIT_BIAS = 100.0
# Each biased token is one scatter into the logits; OpenAI sends at most 300.
MAX_LOGIT_BIAS_TOKENS = 300
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


def _require_int(name: str, value: object) -> int:
    # bool is an int subclass; `n=True` is almost certainly a client bug, so reject it.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _require_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _normalise_stop(stop: list[str] | str | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"stop strings must be non-empty strings, got {item!r}")
    return list(items)


def _normalise_logit_bias(bias: dict[int, float] | None) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}")
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise ValueError(
            f"logit_bias has {len(bias)} tokens; the limit is {MAX_LOGIT_BIAS_TOKENS}"
        )
    normalised: dict[int, float] = {}
    for token_id, value in bias.items():
        # JSON object keys are strings ("50256"); OpenAI accepts those.
        if isinstance(token_id, str) and token_id.isdigit():
            token_id = int(token_id)
        if _require_int("logit_bias key", token_id) < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {token_id}")
        number = _require_float(f"logit_bias[{token_id}]", value)
        if not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias[{token_id}]={number} must be in [-{MAX_LOGIT_BIAS:g}, "
                f"{MAX_LOGIT_BIAS:g}]"
            )
        normalised[token_id] = number
    return normalised


def _normalise_stop_token_ids(ids: list[int] | None) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")
    for token_id in ids:
        if _require_int("stop_token_ids item", token_id) < 0:
            raise ValueError(f"stop_token_ids items must be >= 0, got {token_id}")
    return list(ids)


@dataclass(frozen=True)
class SamplingParams:
    # Completions per prompt: n samples of one prompt, which share its prefilled KV blocks
    # through the prefix cache (each with its own seed stream, seed + i).
    n: int = 1
    # 0 means greedy (argmax); larger flattens the distribution.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p.
    top_p: float = 1.0
    # Keep the k most likely tokens; 0 or -1 disables (normalised to 0).
    top_k: int = 0
    # Drop tokens whose probability is below min_p times the most likely token's.
    min_p: float = 0.0
    # Per-request generator seed: the same seed gives the same tokens whatever the batch holds.
    seed: int | None = None
    # None means "until the context limit", which the scheduler resolves.
    max_tokens: int | None = 16
    # EOS and stop_token_ids are masked out until this many tokens have been generated.
    min_tokens: int = 0
    # Normalised to a list of non-empty strings.
    stop: list[str] | str | None = None
    # Normalised to a list (empty when None).
    stop_token_ids: list[int] | None = None
    # Keep generating past EOS (benchmarks use it to fix the output length).
    ignore_eos: bool = False
    # None: no logprobs. 0: the chosen token's logprob only. N: also the top-N alternatives.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # > 1 discourages tokens seen in the prompt or output (divides positive logits,
    # multiplies negative ones, as in the CTRL paper and vLLM).
    repetition_penalty: float = 1.0
    # OpenAI penalties over the *output* tokens: presence subtracts a constant from every
    # token seen at least once, frequency subtracts per occurrence.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    # Constrains the output to a JSON schema, a regex, a choice or a grammar.
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        n = _require_int("n", self.n)
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n={n} must be in [1, {MAX_N}]")

        temperature = _require_float("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
        top_p = _require_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        top_k = _require_int("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(f"top_k={top_k} must be -1 or 0 (disabled) or >= 1")
        min_p = _require_float("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p={min_p} must be in [0, 1]")

        if self.seed is not None:
            seed = _require_int("seed", self.seed)
            if not _SEED_MIN <= seed <= _SEED_MAX:
                raise ValueError(f"seed={seed} must be in [{_SEED_MIN}, {_SEED_MAX}]")
        if self.max_tokens is not None:
            max_tokens = _require_int("max_tokens", self.max_tokens)
            if max_tokens < 1:
                raise ValueError(f"max_tokens={max_tokens} must be >= 1 (or None)")
        min_tokens = _require_int("min_tokens", self.min_tokens)
        if min_tokens < 0:
            raise ValueError(f"min_tokens={min_tokens} must be >= 0")
        if self.max_tokens is not None and min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={min_tokens} must be <= max_tokens={self.max_tokens}"
            )

        if self.logprobs is not None:
            logprobs = _require_int("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs={logprobs} must be in [0, {MAX_LOGPROBS}] (or None)")

        repetition_penalty = _require_float("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _require_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}={value} must be in [-2, 2]")

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        # Frozen dataclass: normalised values go in through object.__setattr__.
        stop = _normalise_stop(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))
        object.__setattr__(self, "top_k", 0 if top_k == -1 else top_k)
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias) or None)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputs
        ):
            raise ValueError("structured_outputs must be a StructuredOutputs")

    def for_sample(self, index: int) -> SamplingParams:
        """Sample `index` of n: one sequence with its own seed stream (seed + index, as vLLM
        seeds its n children), so each choice of a seeded request is reproducible."""
        seed = None if self.seed is None else (self.seed + index) % (_SEED_MAX + 1)
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def stop_strings(self) -> list[str]:
        """`stop` after normalisation, typed as the list it always is past __post_init__."""
        assert isinstance(self.stop, list)
        return self.stop

    @property
    def stop_token_id_list(self) -> list[int]:
        assert isinstance(self.stop_token_ids, list)
        return self.stop_token_ids

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
