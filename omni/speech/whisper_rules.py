"""What transformers' Whisper `generate` decides around the model, for greedy short-form decoding:
the tokens a pass starts from, which logits each step may not choose, and how a pass that ended
mid-window is cut and resumed. `whisper_greedy.py` runs the model; this module only holds the
rules, read from a checkpoint's generation config, so the two give the same token ids.

The rules, as transformers 5 applies them (models/whisper/generation_whisper.py and the
`SuppressTokens*` and `WhisperTimeStampLogitsProcessor` logits processors):
- a pass starts from `[prompt_ids..., <|startoftranscript|>, language, task, <|notimestamps|>]`:
  the language only for multilingual checkpoints (given, or detected from the first step's
  logits over the language tokens), "transcribe" when a language is given, and
  `<|notimestamps|>` only when timestamps are off;
- every step suppresses `suppress_tokens`; the first generated step also suppresses
  `begin_suppress_tokens`;
- with timestamps: `<|notimestamps|>` is never chosen; the first step must be a timestamp (at most
  `max_initial_timestamp_index` when the config sets it); timestamps come in pairs (after a lone
  one, no text; after a pair, no timestamp), never decrease, and `<|0.00|>`-style repeats of the
  last pair's time are not allowed; and when the timestamps' total probability beats every single
  text token, a timestamp must be chosen;
- a pass whose last two tokens are not "text then timestamp" but which holds a pair of timestamps
  was cut mid-speech: its tokens after the last pair are dropped and a new pass starts at the
  first timestamp of that pair (the window's features shifted left, zero-padded); the window's
  tokens are its passes' kept tokens joined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Whisper's log-mel frames per 30 s window, and frames per decoder timestamp step (20 ms).
WINDOW_FRAMES = 3000
FRAMES_PER_TIMESTAMP = 2


@dataclass(frozen=True)
class WhisperRules:
    """The token ids and limits a checkpoint's generation config fixes."""

    decoder_start_id: int
    eos_id: int
    no_timestamps_id: int
    suppress_ids: tuple[int, ...]
    begin_suppress_ids: tuple[int, ...]
    max_target_positions: int
    multilingual: bool = False
    lang_to_id: tuple[tuple[str, int], ...] = ()
    transcribe_id: int | None = None
    # The legacy `forced_decoder_ids` after the start token (None: the language, to detect).
    forced_ids: tuple[int | None, ...] = ()
    max_initial_timestamp_index: int | None = None

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps_id + 1

    @classmethod
    def from_model(cls, model: Any) -> WhisperRules:
        """The rules of a `WhisperForConditionalGeneration` (its generation config and config)."""
        generation = model.generation_config
        config = model.config
        forced = getattr(generation, "forced_decoder_ids", None) or getattr(
            config, "forced_decoder_ids", None
        )
        forced_ids: list[int | None] = []
        if forced and forced[0][0] == 1:
            for position, (index, token) in enumerate(forced, start=1):
                if index != position:
                    raise ValueError(f"forced_decoder_ids {forced} do not follow Whisper's prompt")
                forced_ids.append(None if token is None else int(token))
        task_to_id = getattr(generation, "task_to_id", None) or {}
        lang_to_id = getattr(generation, "lang_to_id", None) or {}
        eos = generation.eos_token_id
        if isinstance(eos, list):
            raise ValueError(f"eos_token_id {eos}: one end-of-text id is expected")
        return cls(
            decoder_start_id=int(generation.decoder_start_token_id),
            eos_id=int(eos if eos is not None else generation.bos_token_id),
            no_timestamps_id=int(generation.no_timestamps_token_id),
            suppress_ids=tuple(int(t) for t in generation.suppress_tokens or ()),
            begin_suppress_ids=tuple(int(t) for t in generation.begin_suppress_tokens or ()),
            max_target_positions=int(config.max_target_positions),
            multilingual=bool(getattr(generation, "is_multilingual", False)),
            lang_to_id=tuple((str(k), int(v)) for k, v in lang_to_id.items()),
            transcribe_id=int(task_to_id["transcribe"]) if "transcribe" in task_to_id else None,
            forced_ids=tuple(forced_ids),
            max_initial_timestamp_index=getattr(generation, "max_initial_timestamp_index", None),
        )

    def language_id(self, language: str) -> int:
        """The token of `language` (an ISO code such as "fr" or a token such as "<|fr|>")."""
        if not self.multilingual:
            raise ValueError("this Whisper model is English-only; it takes no language")
        code = language.lower()
        token = code if code.startswith("<|") else f"<|{code}|>"
        known = dict(self.lang_to_id)
        if token not in known:
            raise ValueError(f"language {language!r} is not one this Whisper model knows")
        return known[token]

    def needs_language_detection(self, language: str) -> bool:
        """True when a pass must first find the language: no language given, the config knows
        languages and forces none."""
        return not language and bool(self.lang_to_id) and (
            not self.forced_ids or self.forced_ids[0] is None
        )

    def start_ids(self, timestamps: bool, language_id: int | None, given: bool) -> list[int]:
        """The tokens after the prompt that open a pass. `language_id`: the language's token,
        `given` by the caller (then the config's forced tokens are ignored and "transcribe"
        follows) or detected (it takes the forced language's place), or None."""
        ids: list[int | None] = [self.decoder_start_id]
        if not given:
            ids += self.forced_ids
        if language_id is not None:
            if len(ids) > 1:
                ids[1] = language_id
            else:
                ids.append(language_id)
        if given and self.transcribe_id is not None:
            ids.append(self.transcribe_id)
        if not timestamps and ids[-1] != self.no_timestamps_id:
            ids.append(self.no_timestamps_id)
        elif timestamps and ids[-1] == self.no_timestamps_id:
            ids.pop()
        return [token for token in ids if token is not None]


class LogitRules:
    """Applies `WhisperRules`' suppressions and timestamp rules to a batch of next-token logits.

    Each row's state (was the last token a timestamp, the one before, the last timestamp) is
    kept in Python lists, and a rule that applies to a row blanks one slice of it: a few
    slice writes a row where masks over the whole vocabulary cost ~0.3 ms a step for 8 rows."""

    def __init__(self, rules: WhisperRules, vocab_size: int, rows: int, timestamps: bool,
                 device: torch.device) -> None:
        self.rules = rules
        self.timestamps = timestamps
        self.always = torch.tensor(sorted(set(rules.suppress_ids)), dtype=torch.long,
                                   device=device)
        self.at_begin = torch.tensor(sorted(set(rules.suppress_ids + rules.begin_suppress_ids)),
                                     dtype=torch.long, device=device)
        # Per row: the last and the one-before-last generated tokens were timestamps ("before"
        # counts as one while fewer than two were generated), and the last timestamp's id.
        self.last_is_ts = [False] * rows
        self.before_is_ts = [True] * rows
        self.last_ts = [-1] * rows
        self.steps = 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every forbidden token at -inf (in place)."""
        minus_inf = float("-inf")
        suppressed = self.at_begin if self.steps == 0 else self.always
        if suppressed.numel():
            logits.index_fill_(1, suppressed, minus_inf)
        if not self.timestamps:
            return logits
        begin = self.rules.timestamp_begin
        logits[:, self.rules.no_timestamps_id] = minus_inf
        if self.steps == 0:
            logits[:, :begin] = minus_inf
            if self.rules.max_initial_timestamp_index is not None:
                logits[:, begin + self.rules.max_initial_timestamp_index + 1 :] = minus_inf
        else:
            for row, (last, before, stamp) in enumerate(
                zip(self.last_is_ts, self.before_is_ts, self.last_ts, strict=True)
            ):
                if last and before:  # after a pair: text next
                    logits[row, begin:] = minus_inf
                elif last:  # after a lone timestamp: its pair or the end, no text
                    logits[row, : self.rules.eos_id] = minus_inf
                if stamp >= 0:
                    # Timestamps never decrease; after a pair the same time is not allowed.
                    floor = stamp if last and not before else stamp + 1
                    logits[row, begin:floor] = minus_inf
        logprobs = torch.log_softmax(logits, dim=-1)
        timestamp_mass = logprobs[:, begin:].logsumexp(dim=-1)
        best_text = logprobs[:, :begin].max(dim=-1).values
        logits[:, :begin].masked_fill_((timestamp_mass > best_text)[:, None], minus_inf)
        return logits

    def advance(self, chosen: list[int]) -> None:
        """Record each row's chosen token."""
        begin = self.rules.timestamp_begin
        chosen_ts = [token >= begin for token in chosen]
        self.before_is_ts = self.last_is_ts if self.steps > 0 else [True] * len(chosen)
        self.last_is_ts = chosen_ts
        self.last_ts = [token if is_ts else stamp
                        for token, is_ts, stamp in zip(chosen, chosen_ts, self.last_ts,
                                                       strict=True)]
        self.steps += 1


def kept_tokens(tokens: Sequence[int], timestamp_begin: int) -> tuple[list[int], int | None]:
    """A pass's tokens (no end-of-text) as transformers keeps them, and the frame
    the next pass starts from, or None when the window is done.

    The window is done unless the pass holds a pair of adjacent timestamps and does not end in
    "text, timestamp"; then the tokens after the last pair are dropped, and the next pass starts
    at the pair's first timestamp."""
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    pair_ends = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    if not pair_ends or single_ending:
        return list(tokens), None
    cut = pair_ends[-1] + 1
    resume = (tokens[cut - 2] - timestamp_begin) * FRAMES_PER_TIMESTAMP
    return list(tokens[:cut]), resume
