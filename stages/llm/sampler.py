"""Turn one step's logits into next tokens, for a batch of requests with mixed settings.

The runner builds a `SamplingBatch` once per step (`SamplingBatch.from_params`), then calls
`Sampler()(logits, batch)`. The order of operations on each row:

1. raw logprobs (log-softmax of the untouched logits), when any row asked for logprobs;
2. structured output: the grammar's token bitmask (one bit per vocabulary entry, built by
   `structured_output.GrammarMatchers` before the step) sets disallowed tokens to -inf, for the
   constrained rows only, in one batched kernel; then logit_bias adds each row's biases;
3. min_tokens: EOS and stop token ids are banned until the row has produced enough tokens;
4. repetition / presence / frequency penalties;
5. greedy rows take the argmax here;
6. random rows: temperature, then top-k, top-p, min-p masking, then one draw with the
   exponential race (`argmax(probs / q)`, `q ~ Exp(1)`), which samples exactly from `probs`
   without a cumulative sum and lets each seeded row draw its noise from its own generator.

Everything is vectorised over rows; host-side flags computed at batch build time skip the
work (and the vocabulary-wide sort) that no row needs, so a plain temperature-only batch costs
one softmax and one argmax. Measured on one H100 with N=256 rows, V=152064, bf16 logits
(median per call): greedy 0.23 ms, temperature only 0.93 ms, top_k 1.8 ms, top_p 5.7 ms (the
sort), 256 seeded rows 4.7 ms (one noise launch per seeded row).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from omni.stages.contracts.sampling import GREEDY_TEMPERATURE_EPS, SamplingParams
from omni.stages.llm.host_to_device import copy_to_device

# Padding value for ragged token-id lists; the sampler maps it to a spill column past the
# vocabulary, so no host-side knowledge of the vocabulary size is needed at build time.
_PAD_TOKEN_ID = -1


def _pad_token_lists(
    lists: Sequence[Sequence[int]], device: torch.device | str
) -> torch.Tensor:
    width = max((len(ids) for ids in lists), default=0)
    padded = torch.full((len(lists), width), _PAD_TOKEN_ID, dtype=torch.int64)
    for row, ids in enumerate(lists):
        if ids:
            padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return copy_to_device(padded, device)


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors plus host-side flags that pick code paths."""

    temperature: torch.Tensor  # float32 [N]; < GREEDY_TEMPERATURE_EPS means greedy
    top_k: torch.Tensor  # int32 [N]; 0 = off
    top_p: torch.Tensor  # float32 [N]; 1.0 = off
    min_p: torch.Tensor  # float32 [N]; 0.0 = off
    generators: dict[int, torch.Generator]  # row -> its request's generator (seeded requests)
    all_greedy: bool
    all_random: bool
    needs_logprobs: bool
    # Largest `logprobs` asked for (0 when only the chosen token's, or none).
    max_num_logprobs: int = 0
    # Largest top_k among rows that use it (0: no row does); sizes the partial top-k.
    max_top_k: int = 0
    # True when some random row has top_p < 1: only then is a full sort needed.
    needs_top_p: bool = False
    needs_min_p: bool = False
    # Penalties (None when every row has the defaults): per-row factors and the token ids
    # they count, int64 [N, L] padded with -1.
    repetition_penalty: torch.Tensor | None = None
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    output_token_ids: torch.Tensor | None = None
    prompt_token_ids: torch.Tensor | None = None
    # min_tokens: (rows, token ids) pairs to set to -inf this step, or None.
    banned_rows: torch.Tensor | None = None
    banned_token_ids: torch.Tensor | None = None
    # Structured output: int32 [N, ceil(V / 32)] allowed-token bits, and the rows it
    # constrains (the others' bits are not read). Set by the model runner.
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: list[int] | None = None
    # logit_bias: (rows, token ids, values) to add, or None when no row has a bias.
    bias_rows: torch.Tensor | None = None
    bias_token_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.temperature.shape[0])

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        device: torch.device | str,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        eos_token_ids: Sequence[Collection[int]] | None = None,
    ) -> SamplingBatch:
        """Build the batch for rows `params[i]`.

        `generators[i]` is row i's own generator (None: draw from the global RNG); it must live
        on `device`. `output_token_ids[i]` are row i's generated tokens so far and
        `prompt_token_ids[i]` its prompt: needed for penalties (repetition looks at both,
        presence/frequency at the output) and for min_tokens (which counts the output).
        `eos_token_ids[i]` (row i's EOS ids) are banned, with its stop_token_ids, while
        min_tokens is unmet, unless the row ignores EOS.
        """
        num_rows = len(params)
        if len(generators) != num_rows:
            raise ValueError(f"got {len(generators)} generators for {num_rows} rows")
        for name, lists in (("output_token_ids", output_token_ids),
                            ("prompt_token_ids", prompt_token_ids),
                            ("eos_token_ids", eos_token_ids)):
            if lists is not None and len(lists) != num_rows:
                raise ValueError(f"got {len(lists)} {name} lists for {num_rows} rows")

        greedy = [p.is_greedy for p in params]
        random_params = [p for p, g in zip(params, greedy, strict=True) if not g]
        all_greedy = all(greedy)
        all_random = not any(greedy)
        top_ks = [p.top_k for p in random_params if p.top_k > 0]
        needs_logprobs = any(p.logprobs is not None for p in params)

        batch = cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            # Greedy rows get neutral filters: they ride along through the random path (their
            # draw is discarded), and must not size the partial top-k or force a sort.
            top_k=torch.tensor([0 if g else p.top_k for p, g in zip(params, greedy, strict=True)],
                               dtype=torch.int32),
            top_p=torch.tensor([1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)],
                               dtype=torch.float32),
            min_p=torch.tensor([0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)],
                               dtype=torch.float32),
            generators={row: g for row, g in enumerate(generators)
                        if g is not None and not greedy[row]},
            all_greedy=all_greedy,
            all_random=all_random,
            needs_logprobs=needs_logprobs,
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            max_top_k=max(top_ks, default=0),
            needs_top_p=any(p.top_p < 1.0 for p in random_params),
            needs_min_p=any(p.min_p > 0.0 for p in random_params),
        )
        for name in ("temperature", "top_k", "top_p", "min_p"):
            setattr(batch, name, copy_to_device(getattr(batch, name), device))

        if any(p.has_penalties for p in params):
            batch._set_penalties(params, device, output_token_ids, prompt_token_ids)
        if any(p.min_tokens > 0 for p in params):
            batch._set_min_tokens_bans(params, device, output_token_ids, eos_token_ids)
        if any(p.logit_bias for p in params):
            batch._set_logit_bias(params, device)
        return batch

    def _set_logit_bias(self, params: Sequence[SamplingParams], device: torch.device | str) -> None:
        rows: list[int] = []
        token_ids: list[int] = []
        values: list[float] = []
        for row, p in enumerate(params):
            for token_id, value in (p.logit_bias or {}).items():
                rows.append(row)
                token_ids.append(token_id)
                values.append(value)
        self.bias_rows = torch.tensor(rows, dtype=torch.int64).to(device)
        self.bias_token_ids = torch.tensor(token_ids, dtype=torch.int64).to(device)
        self.bias_values = torch.tensor(values, dtype=torch.float32).to(device)

    def _set_penalties(
        self,
        params: Sequence[SamplingParams],
        device: torch.device | str,
        output_token_ids: Sequence[Sequence[int]] | None,
        prompt_token_ids: Sequence[Sequence[int]] | None,
    ) -> None:
        if output_token_ids is None:
            raise ValueError("output_token_ids are required when a row uses penalties")
        self.repetition_penalty = copy_to_device(torch.tensor(
            [p.repetition_penalty for p in params], dtype=torch.float32), device)
        self.presence_penalty = copy_to_device(torch.tensor(
            [p.presence_penalty for p in params], dtype=torch.float32), device)
        self.frequency_penalty = copy_to_device(torch.tensor(
            [p.frequency_penalty for p in params], dtype=torch.float32), device)
        self.output_token_ids = _pad_token_lists(output_token_ids, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            if prompt_token_ids is None:
                raise ValueError("prompt_token_ids are required when a row uses "
                                 "repetition_penalty")
            self.prompt_token_ids = _pad_token_lists(prompt_token_ids, device)

    def _set_min_tokens_bans(
        self,
        params: Sequence[SamplingParams],
        device: torch.device | str,
        output_token_ids: Sequence[Sequence[int]] | None,
        eos_token_ids: Sequence[Collection[int]] | None,
    ) -> None:
        if output_token_ids is None:
            raise ValueError("output_token_ids are required when a row uses min_tokens")
        rows: list[int] = []
        token_ids: list[int] = []
        for row, (p, out) in enumerate(zip(params, output_token_ids, strict=True)):
            if len(out) >= p.min_tokens:
                continue
            banned = set(p.stop_token_id_list)
            if not p.ignore_eos and eos_token_ids is not None:
                banned.update(eos_token_ids[row])
            for token_id in sorted(banned):
                rows.append(row)
                token_ids.append(token_id)
        if rows:
            self.banned_rows = copy_to_device(torch.tensor(rows, dtype=torch.int64), device)
            self.banned_token_ids = copy_to_device(
                torch.tensor(token_ids, dtype=torch.int64), device
            )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [N]
    # float32 [N]: log-softmax of the raw logits at the chosen token; None if no row asked.
    logprobs: torch.Tensor | None = None
    # [N, K] with K = the largest `logprobs` asked for: the raw top-K alternatives, best first.
    # Rows that asked for fewer read a prefix. None when K == 0.
    top_logprobs: torch.Tensor | None = None
    top_token_ids: torch.Tensor | None = None


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, L] ids padded with -1 -> [N, V] occurrence counts (float32)."""
    num_rows = token_ids.shape[0]
    # Padding goes to a spill column at index V, dropped afterwards.
    index = torch.where(token_ids < 0, vocab_size, token_ids)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties, in place."""
    assert batch.output_token_ids is not None
    assert batch.repetition_penalty is not None
    assert batch.presence_penalty is not None and batch.frequency_penalty is not None
    vocab_size = logits.shape[1]
    output_counts = _token_counts(batch.output_token_ids, vocab_size)
    output_seen = output_counts > 0
    if batch.prompt_token_ids is not None:
        seen = output_seen | (_token_counts(batch.prompt_token_ids, vocab_size) > 0)
        penalty = batch.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    logits -= batch.frequency_penalty[:, None] * output_counts
    logits -= batch.presence_penalty[:, None] * output_seen
    return logits


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Mask all but each row's top_k logits (0 = off) with a partial top-k, not a sort."""
    max_top_k = min(max_top_k, logits.shape[1])
    kth_column = (top_k.clamp(min=1, max=max_top_k) - 1).to(torch.int64)[:, None]
    kth_value = logits.topk(max_top_k, dim=-1).values.gather(1, kth_column)
    # Rows with top-k off get a -inf threshold, so they keep everything.
    kth_value.masked_fill_((top_k == 0)[:, None], float("-inf"))
    return logits.masked_fill_(logits < kth_value, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p masking over one ascending sort of each row."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        # Ascending order: the k-th largest sits at column V - k; k = 0 maps to column 0.
        k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size).to(torch.int64)
        kth_value = sorted_logits.gather(1, (vocab_size - k)[:, None])
        sorted_logits.masked_fill_(sorted_logits < kth_value, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop the low tail whose mass stays within 1 - top_p; the best token always survives.
    drop = cumulative <= (1.0 - top_p)[:, None]
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below min_p times each row's largest, in place."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return probs.masked_fill_(probs < threshold, 0.0)


def sample_exponential_race(
    probs: torch.Tensor,
    generators: dict[int, torch.Generator],
    unseeded: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from `probs` as argmax(probs / q), q ~ Exp(1).

    P(argmax = i) = probs[i] / sum(probs), so no normalisation or cumsum is needed, and each
    seeded row draws its own V noise values from its generator: its tokens do not depend on
    what else is in the batch. The other rows draw from `unseeded` (None: the global RNG).
    """
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_(generator=unseeded)
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    # An exact 0 draw would give 0/0 = NaN on masked tokens, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def apply_grammar_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None
) -> None:
    """Set the tokens whose bit is 0 to -inf in `rows` (all rows when None), in place: one
    xgrammar kernel over the batch (CUDA / Triton on the GPU, vectorised C++ on the CPU)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), indices=rows
    )


class Sampler:
    """All per-request state lives in the SamplingBatch (and its generators). The sampler
    owns one generator per device for the rows that have no seed.

    Why not the global RNG: a CUDA graph captured by another thread of the process (the
    co-located vision encoder captures its tower's graphs while the LLM serves) puts the
    device's default generator into capture mode, and a draw from it on this thread's stream
    then fails ("Offset increment outside graph capture"). A private generator is never
    registered with a capture.
    """

    def __init__(self) -> None:
        self._unseeded: dict[torch.device, torch.Generator] = {}

    def unseeded_generator(self, device: torch.device) -> torch.Generator:
        """This device's generator for unseeded rows, made on first use with a seed drawn
        from torch's global CPU RNG (so `torch.manual_seed` still makes a run repeatable)."""
        generator = self._unseeded.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            self._unseeded[device] = generator
        return generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match {batch.num_rows} rows"
            )
        # float32 copy: penalties and masks work in place, and bf16 loses tail mass in top-p.
        logits = logits.to(torch.float32, copy=True)
        raw_logprobs = logits.log_softmax(dim=-1) if batch.needs_logprobs else None

        if batch.grammar_bitmask is not None:
            apply_grammar_bitmask(logits, batch.grammar_bitmask, batch.grammar_rows)
        if batch.bias_rows is not None:
            assert batch.bias_token_ids is not None and batch.bias_values is not None
            logits.index_put_(
                (batch.bias_rows, batch.bias_token_ids), batch.bias_values, accumulate=True
            )
        if batch.banned_rows is not None:
            assert batch.banned_token_ids is not None
            logits[batch.banned_rows, batch.banned_token_ids] = float("-inf")
        if batch.output_token_ids is not None:
            logits = apply_penalties(logits, batch)

        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            greedy_ids = None if batch.all_random else logits.argmax(dim=-1)
            token_ids = self._sample_random(logits, batch)
            if greedy_ids is not None:
                is_greedy = batch.temperature < GREEDY_TEMPERATURE_EPS
                token_ids = torch.where(is_greedy, greedy_ids, token_ids)

        output = SamplerOutput(token_ids=token_ids)
        if raw_logprobs is not None:
            output.logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
            if batch.max_num_logprobs > 0:
                top = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
                output.top_logprobs, output.top_token_ids = top.values, top.indices
        return output

    def _sample_random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # Greedy rows ride along with temperature 1; their draw is discarded by the caller.
        temperature = torch.where(
            batch.temperature < GREEDY_TEMPERATURE_EPS, 1.0, batch.temperature
        )
        logits.div_(temperature[:, None])
        if batch.needs_top_p:
            top_k = batch.top_k if batch.max_top_k > 0 else None
            logits = apply_top_k_top_p(logits, top_k, batch.top_p)
        elif batch.max_top_k > 0:
            logits = apply_top_k_only(logits, batch.top_k, batch.max_top_k)
        probs = logits.softmax(dim=-1)
        if batch.needs_min_p:
            probs = apply_min_p(probs, batch.min_p)
        return sample_exponential_race(
            probs, batch.generators, self.unseeded_generator(probs.device)
        )
