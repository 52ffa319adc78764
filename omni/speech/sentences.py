"""Text cut into the pieces a speech generator speaks one at a time.

Speech streams by sentence: each sentence is synthesized and sent as soon as it is ready, so a
listener hears the first one while the rest are still being made. A sentence ends at `.`, `!`,
`?` or `…` followed by white space, or at a line break; one longer than `max_chars` is cut
again at clause marks (`,;:`) and then between words, because TTS models have a bounded input
(SpeechT5's text positions, VITS's memory grows with length) and a long chunk delays the stream.
"""

from __future__ import annotations

import re

# The terminator stays with its sentence; the white space after it is the boundary. Requiring
# that white space keeps "3.14" and "e.g.x" whole.
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\s*\n\s*")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")
DEFAULT_MAX_CHARS = 400


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """The non-empty sentences of `text`, in order, none longer than `max_chars`."""
    if max_chars < 1:
        raise ValueError(f"max_chars is {max_chars}; it must be >= 1")
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if sentence:
            pieces += _fit(sentence, max_chars)
    return pieces


def _fit(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    parts: list[str] = []
    for clause in _CLAUSE_END.split(sentence):
        parts += _pack(clause.split(), max_chars) if len(clause) > max_chars else [clause]
    # Rejoin neighbouring short clauses so a cut sentence is not read as many tiny ones.
    return _pack(parts, max_chars)


def _pack(words: list[str], max_chars: int) -> list[str]:
    """Greedily join `words` with spaces into pieces of at most `max_chars` (a single word
    longer than that is cut, the one case with no better place to split)."""
    pieces: list[str] = []
    current = ""
    for word in words:
        while len(word) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(word[:max_chars])
            word = word[max_chars:]
        if not word:
            continue
        if current and len(current) + 1 + len(word) <= max_chars:
            current += " " + word
        else:
            if current:
                pieces.append(current)
            current = word
    if current:
        pieces.append(current)
    return pieces


class SentenceBuffer:
    """Collects streamed text (an LLM's deltas) and hands out each sentence once it is complete,
    so speech can start before the text is finished."""

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self.max_chars = max_chars
        self._pending = ""

    def feed(self, delta: str) -> list[str]:
        """Sentences completed by `delta` (possibly none)."""
        self._pending += delta
        boundaries = list(_SENTENCE_END.finditer(self._pending))
        if not boundaries:
            if len(self._pending) <= self.max_chars:
                return []
            # A run-on sentence: speak what fits rather than wait for its end.
            return self._take(self._pending.rfind(" ", 0, self.max_chars + 1))
        return self._take(boundaries[-1].end())

    def flush(self) -> list[str]:
        """Whatever is left once the text has ended."""
        rest, self._pending = self._pending, ""
        return split_sentences(rest, self.max_chars)

    def _take(self, end: int) -> list[str]:
        if end <= 0:
            return []
        done, self._pending = self._pending[:end], self._pending[end:]
        return split_sentences(done, self.max_chars)
