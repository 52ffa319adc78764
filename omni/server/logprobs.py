"""Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` entries and
completions' parallel lists. The LLM stage reports each sampled token's log-probability (of the
raw logits, as vLLM and OpenAI do) and its top alternatives; here they get their text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omni.stages.contracts.llm import TokenLogprob


class LogprobText:
    """Token text for log-probability entries, each id decoded once per response."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self._tokenizer.decode([token_id])
        return text


def chat_content(
    text_of: LogprobText, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]
) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` for these tokens."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = text_of(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for token_id, lp in zip(token_ids, logprobs, strict=False):
        item = entry(token_id, lp.logprob)
        item["top_logprobs"] = [
            entry(top_id, top_lp)
            for top_id, top_lp in zip(lp.top_token_ids, lp.top_logprobs, strict=True)
        ]
        content.append(item)
    return content


def completion_logprobs(
    text_of: LogprobText,
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob],
    num_top: int,
    start_offset: int,
) -> dict[str, Any]:
    """A completion choice's `logprobs`: tokens, their log-probabilities, the top `num_top`
    alternatives of each as {token: logprob} (None when 0), and text offsets."""
    tokens = [text_of(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(start_offset)
        start_offset += len(token)
    top = None
    if num_top:
        top = []
        for lp in logprobs:
            # Best first; two ids with the same text (partial UTF-8 bytes all read "\ufffd")
            # keep the better one's log-probability.
            alternatives: dict[str, float] = {}
            for token_id, value in zip(lp.top_token_ids, lp.top_logprobs, strict=True):
                alternatives.setdefault(text_of(token_id), value)
            top.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": top,
        "text_offset": offsets,
    }
