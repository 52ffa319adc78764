"""Incremental detokenization with stop strings, for streaming one request's output.

Decoding one token at a time is wrong in two ways, which is why this exists:

- A byte-level BPE token can hold part of a multi-byte UTF-8 character ("世" may be split over
  two tokens); decoding it alone gives "\ufffd". Text is only released once it no longer ends in
  a replacement character.
- Decoders strip or add spaces depending on the neighbouring tokens (SentencePiece drops the
  leading space of the first token). So, as vLLM's `detokenize_incrementally` does, each step
  decodes a small window `tokens[prefix_offset:]` and returns what it adds over
  `tokens[prefix_offset:read_offset]`; the window starts inside the prompt so the first output
  token is decoded in context.

Stop strings: once one appears, `stopped_by` names it and the text is cut before it (or just
after it, with include_stop_str_in_output). Deltas hold back any tail of the text that could
still grow into a stop string, so a streaming client never sees half of one; `flush()` releases
that tail when the request ends for another reason (EOS, length).

With a tokenizer whose `clean_up_tokenization_spaces` is off (Qwen2, Llama 3 and the like), the
concatenated deltas equal `tokenizer.decode(output_ids, skip_special_tokens=...)` whenever no
stop string fires and the output does not end inside a multi-byte character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# How many prompt tokens give the first output token its decoding context (vLLM uses 5; two
# more are converted in case some of them are special tokens that get skipped).
INITIAL_DETOKENIZATION_OFFSET = 5
_REPLACEMENT_CHAR = "\ufffd"


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop_str in stop:
        for length in range(min(len(stop_str) - 1, len(text)), longest, -1):
            if text.endswith(stop_str[:length]):
                longest = length
                break
    return longest


def find_stop_string(text: str, stop: Sequence[str], search_from: int) -> tuple[str, int] | None:
    """The stop string that completes first in `text`, ending after `search_from`.

    Returns (stop string, start index) or None. "First" means the smallest end index, so the
    result does not depend on how the text was split into deltas; ties go to the longer string.
    """
    best: tuple[int, int, str] | None = None  # (end, -length, stop string)
    for stop_str in stop:
        start = text.find(stop_str, max(0, search_from - len(stop_str) + 1))
        if start < 0:
            continue
        candidate = (start + len(stop_str), -len(stop_str), stop_str)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        return None
    end, _, stop_str = best
    return stop_str, end - len(stop_str)


class IncrementalDetokenizer:
    """Turns one request's output token ids into stable text deltas; see the module docstring."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        for stop_str in stop:
            if not isinstance(stop_str, str) or not stop_str:
                raise ValueError(f"stop strings must be non-empty strings, got {stop_str!r}")
        self._tokenizer = tokenizer
        self._vocab_size = len(tokenizer)
        # What decode(skip_special_tokens=True) drops: the named special tokens and every added
        # token flagged special (chat markers such as <|im_end|>, which transformers 5 leaves
        # out of all_special_ids and so out of convert_ids_to_tokens' own skipping).
        self._special_ids = set(tokenizer.all_special_ids) | {
            token_id
            for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
            if added.special
        }
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(stop)
        self._include_stop = include_stop_str_in_output
        # vLLM semantics: stop strings cannot fire on text produced by the first min_tokens.
        self._min_tokens = min_tokens

        context = list(prompt_token_ids[-(INITIAL_DETOKENIZATION_OFFSET + 2):])
        # A tokenizer backed by the `tokenizers` library decodes incrementally in Rust
        # (DecodeStream, as vLLM's fast detokenizer does): one call per token instead of three,
        # which is most of the LLM stage's per-token host work at large batches. Others take
        # the window path (`_decode_new_text`).
        self._backend: Tokenizer | None = getattr(tokenizer, "backend_tokenizer", None)
        self._stream: DecodeStream | None = None
        if self._backend is not None:
            self._stream = DecodeStream(
                ids=self._clean_context(context), skip_special_tokens=skip_special_tokens
            )
            context = []
        self._tokens: list[str] = self._convert_ids(context)
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(self._read_offset - INITIAL_DETOKENIZATION_OFFSET, 0)

        self.output_token_ids: list[int] = []
        self.stopped_by: str | None = None
        self._text = ""  # stable output text; cut at the stop string once one fires
        self._num_emitted = 0  # characters of _text already returned as deltas
        self._stop_checked_until = 0  # a new stop match must end after this index

    @property
    def output_text(self) -> str:
        """All stable text so far, including any tail still held back from the deltas."""
        return self._text

    @property
    def is_stopped(self) -> bool:
        return self.stopped_by is not None

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to stream.

        Once a stop string has fired the request is over: later tokens (one may already be in
        flight when the engine learns of the stop) are ignored and return "".
        """
        if self.stopped_by is not None:
            return ""
        self.output_token_ids.append(token_id)
        if self._stream is not None:
            self._text += self._step_stream(token_id)
        else:
            self._tokens.extend(self._convert_ids([token_id]))
            self._text += self._decode_new_text()
        self._check_stop_strings()
        return self._take_delta(final=self.stopped_by is not None)

    def extend(self, token_ids: Sequence[int]) -> str:
        """Add several tokens (e.g. accepted speculative tokens); stops at a stop string.

        Tokens after the one that completed a stop string are not consumed:
        `len(output_token_ids)` tells how many were.
        """
        deltas = []
        for token_id in token_ids:
            deltas.append(self.append(token_id))
            if self.stopped_by is not None:
                break
        return "".join(deltas)

    def flush(self) -> str:
        """Release the held-back tail, when the request finished for another reason.

        An unfinished multi-byte character at the very end is dropped rather than sent as
        "\ufffd".
        """
        return self._take_delta(final=True)

    def _convert_ids(self, token_ids: list[int]) -> list[str]:
        # Ids past the vocabulary (a model's padded embedding rows) decode to nothing rather
        # than crash the stream.
        kept = [
            t
            for t in token_ids
            if 0 <= t < self._vocab_size
            and not (self._skip_special_tokens and t in self._special_ids)
        ]
        tokens = self._tokenizer.convert_ids_to_tokens(kept)
        return [token or "" for token in tokens]

    def _clean_context(self, context: list[int]) -> list[int]:
        """The prompt tail a DecodeStream starts from, without the leading tokens that decode
        to broken characters: a stream whose starting text holds U+FFFD emits that whole text
        with the first output token (a prompt of raw token ids can end anywhere)."""
        assert self._backend is not None
        kept = [t for t in context if 0 <= t < self._vocab_size]
        while kept and _REPLACEMENT_CHAR in self._backend.decode(
            kept, skip_special_tokens=self._skip_special_tokens
        ):
            kept = kept[1:]
        return kept

    def _step_stream(self, token_id: int) -> str:
        assert self._stream is not None and self._backend is not None
        if not 0 <= token_id < self._vocab_size:
            return ""
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as exc:
            # tokenizers raises this when a decoder's output stops extending its earlier
            # output; as vLLM does, start a fresh stream at this token.
            if "Invalid prefix" not in str(exc):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            text = self._stream.step(self._backend, token_id)
        return text or ""  # None: the token ends inside a character still being completed

    def _decode_new_text(self) -> str:
        window = self._tokens[self._prefix_offset:]
        convert = self._tokenizer.convert_tokens_to_string
        prefix_text = convert(window[: self._read_offset - self._prefix_offset])
        new_text = convert(window)
        # Shorter-or-equal text: the token decoded to nothing (a skipped special token) or
        # merged into an unfinished character. A trailing U+FFFD: the last character's bytes
        # are not all here yet. Either way, wait for more tokens.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text):]

    def _check_stop_strings(self) -> None:
        if not self._stop:
            return
        if len(self.output_token_ids) <= self._min_tokens:
            self._stop_checked_until = len(self._text)
            return
        found = find_stop_string(self._text, self._stop, self._stop_checked_until)
        self._stop_checked_until = len(self._text)
        if found is None:
            return
        stop_str, start = found
        self.stopped_by = stop_str
        self._text = self._text[: start + len(stop_str) if self._include_stop else start]

    def _take_delta(self, final: bool) -> str:
        end = len(self._text)
        # With include_stop_str_in_output a stop string would be shown anyway, so nothing is
        # held back; otherwise hold back what could be the start of one.
        if not final and not self._include_stop:
            end -= _stop_prefix_len(self._text, self._stop)
        end = max(end, self._num_emitted)
        delta = self._text[self._num_emitted:end]
        self._num_emitted = end
        return delta
