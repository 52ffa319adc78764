"""Greedy Whisper decoding on a transformers checkpoint's own modules, without `generate`.

transformers' `generate` spends more time around the model than in it for a model as small as
tiny.en: per step it rebuilds masks and cache objects and runs its logits processors row by row
in Python. Here a pass is one prefill of the opening tokens, then one step per token for all
windows together:
- the encoder runs one window at a time (on two CPU cores a batch of 8 windows was measured
  slower per window than single windows: 0.154 s against 0.123 s);
- each window's cross-attention keys and values are computed once, and self-attention keys and
  values go into a preallocated cache (no concatenation per step);
- the timestamp rules run as a few tensor ops over the whole batch (`whisper_rules.LogitRules`).

The arithmetic is the modules' own, in transformers' order (the query scaled before the
attention, attention through `scaled_dot_product_attention` with scale 1), so the token ids are
the ones `generate(..., do_sample=False, num_beams=1)` gives for the same options; the tests
check that token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from omni.speech.whisper_rules import WINDOW_FRAMES, LogitRules, WhisperRules, kept_tokens


@dataclass(frozen=True)
class DecodeOptions:
    """What a decoding asks for, as `generate`'s arguments of the same names."""

    max_new_tokens: int
    return_timestamps: bool = True
    prompt_ids: tuple[int, ...] = ()  # from the tokenizer's `get_prompt_ids`: <|startofprev|>...
    language: str = ""  # multilingual checkpoints only; "" detects it


class _LayerWeights(NamedTuple):
    """A decoder layer's parameters, taken once: a step calls the functional ops on them
    directly (the modules' own arithmetic, without a module call's overhead ~150 times a step).
    Norms: (normalized shape, weight, bias, eps); linears: (weight, bias)."""

    self_norm: tuple[Any, ...]
    self_q: tuple[torch.Tensor, torch.Tensor]
    self_k: torch.Tensor
    self_v: tuple[torch.Tensor, torch.Tensor]
    self_out: tuple[torch.Tensor, torch.Tensor]
    cross_norm: tuple[Any, ...]
    cross_q: tuple[torch.Tensor, torch.Tensor]
    cross_out: tuple[torch.Tensor, torch.Tensor]
    final_norm: tuple[Any, ...]
    fc1: tuple[torch.Tensor, torch.Tensor]
    fc2: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, layer: Any) -> _LayerWeights:
        def norm(module: Any) -> tuple[Any, ...]:
            return (module.normalized_shape, module.weight, module.bias, module.eps)

        def linear(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return (module.weight, module.bias)

        own, cross = layer.self_attn, layer.encoder_attn
        if own.k_proj.bias is not None:
            raise ValueError("a Whisper decoder's key projections have no bias")
        return cls(norm(layer.self_attn_layer_norm), linear(own.q_proj), own.k_proj.weight,
                   linear(own.v_proj), linear(own.out_proj), norm(layer.encoder_attn_layer_norm),
                   linear(cross.q_proj), linear(cross.out_proj), norm(layer.final_layer_norm),
                   linear(layer.fc1), linear(layer.fc2))


class WhisperGreedyDecoder:
    """Greedy decoding with a `WhisperForConditionalGeneration`'s weights (inference only)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.rules = WhisperRules.from_model(model)
        decoder = model.model.decoder
        self.decoder = decoder
        self.layers = list(decoder.layers)
        first = self.layers[0].self_attn
        self.num_heads = int(first.num_heads)
        self.head_dim = int(first.head_dim)
        self.vocab_size = int(model.config.vocab_size)
        self.scaling = float(first.scaling)
        self.activation = self.layers[0].activation_fn
        self.weights = [_LayerWeights.of(layer) for layer in self.layers]

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, options: DecodeOptions,
                 encoded: Sequence[torch.Tensor] | None = None) -> list[list[int]]:
        """Each window's token ids as `generate` returns them (its row without the right
        padding), for `features` of shape (windows, mel bins, 3000); `encoded`: the windows'
        encoder outputs where the caller has them already."""
        if features.ndim != 3 or features.shape[-1] != WINDOW_FRAMES:
            raise ValueError(f"features have shape {tuple(features.shape)}; "
                             f"(windows, mel bins, {WINDOW_FRAMES}) expected")
        rows = features.shape[0]
        current = list(encoded) if encoded is not None else self.encode(features)
        if len(current) != rows:
            raise ValueError(f"{len(current)} encoder outputs for {rows} windows")
        language_ids = self._language_ids(current, options.language)
        # Passes resume after a cut-off pair of timestamps with timestamps off too, as
        # transformers does: nothing stops a model from choosing a timestamp token then.
        results: list[list[int]] = [[] for _ in range(rows)]
        seeks = [0] * rows
        pending = list(range(rows))
        while pending:
            passes = self._pass(current, options, [language_ids[i] for i in pending])
            still: list[int] = []
            for row, tokens in zip(pending, passes, strict=True):
                kept, resume = kept_tokens(tokens, self.rules.timestamp_begin)
                results[row] += kept
                # transformers would decode the same input forever when a pass resumes where it
                # began; that window ends here instead.
                if resume is not None and resume > 0 and seeks[row] + resume < WINDOW_FRAMES:
                    seeks[row] += resume
                    still.append(row)
            pending = still
            if pending:
                # transformers' next pass reads the window from the resume frame on, padded
                # with zeros (not with silence's features) back to 30 s.
                current = self.encode(torch.stack([
                    F.pad(features[row, :, seeks[row]:], (0, seeks[row])) for row in pending
                ]))
        return results

    def encode(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Each window's encoder output, (1, positions, d_model), one window at a time."""
        encoder = self.model.model.encoder
        return [encoder(features[i : i + 1]).last_hidden_state for i in range(features.shape[0])]

    def _language_ids(self, encoded: Sequence[torch.Tensor], language: str) -> list[int | None]:
        """Each window's language token: the given one, the detected one, or None."""
        rows = len(encoded)
        if language:
            return [self.rules.language_id(language)] * rows
        if not self.rules.needs_language_detection(language):
            return [None] * rows
        # As transformers' detect_language: the first step's logits over the language tokens.
        start = torch.full((rows, 1), self.rules.decoder_start_id, dtype=torch.long)
        logits = self.model(encoder_outputs=(torch.cat(list(encoded)),), decoder_input_ids=start,
                            use_cache=False).logits[:, -1]
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        allowed[[token for _, token in self.rules.lang_to_id]] = True
        logits[:, ~allowed] = float("-inf")
        return [int(token) for token in logits.argmax(-1)]

    def _pass(self, encoded: Sequence[torch.Tensor], options: DecodeOptions,
              language_ids: Sequence[int | None]) -> list[list[int]]:
        """One greedy pass over the windows: each row's generated ids, end-of-text dropped."""
        rows = len(encoded)
        openings = [list(options.prompt_ids)
                    + self.rules.start_ids(options.return_timestamps, language,
                                           given=bool(options.language))
                    for language in language_ids]
        if len({len(ids) for ids in openings}) != 1:
            raise ValueError("windows of one pass must open with the same number of tokens")
        opening = len(openings[0])
        limit = self.rules.max_target_positions
        if options.max_new_tokens + opening > limit:
            raise ValueError(
                f"the prompt and start tokens are {opening} tokens and max_new_tokens is "
                f"{options.max_new_tokens}; together they exceed Whisper's {limit} positions"
            )
        device = encoded[0].device
        cross = [self._cross_kv(layer, encoded) for layer in self.layers]
        shape = (rows, self.num_heads, opening + options.max_new_tokens, self.head_dim)
        dtype = encoded[0].dtype
        cache = [(torch.empty(shape, dtype=dtype, device=device),
                  torch.empty(shape, dtype=dtype, device=device)) for _ in self.layers]
        rules = LogitRules(self.rules, self.vocab_size, rows, options.return_timestamps, device)

        tokens = torch.tensor(openings, dtype=torch.long, device=device)
        generated = torch.empty((rows, options.max_new_tokens), dtype=torch.long, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.full((rows,), options.max_new_tokens, dtype=torch.long)
        position = 0
        running = [(0, rows)]  # runs of rows not finished yet: [start, stop)
        for step in range(options.max_new_tokens):
            logits = self._forward(tokens, position, cache, cross, running)
            position += tokens.shape[1]
            chosen = rules.apply(logits).argmax(dim=-1)
            # Rows already finished keep feeding end-of-text, as generate's padding does.
            chosen.masked_fill_(done, self.rules.eos_id)
            generated[:, step] = chosen
            chosen_ids = chosen.tolist()
            rules.advance(chosen_ids)
            ended = (chosen == self.rules.eos_id) & ~done
            if bool(ended.any()):
                lengths[ended.cpu()] = step
                done |= ended
                if bool(done.all()):
                    break
                running = _runs(done.tolist())
            tokens = chosen[:, None]
        kept = generated.tolist()
        return [row[: int(length)] for row, length in zip(kept, lengths, strict=True)]

    def _cross_kv(self, layer: Any, encoded: Sequence[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's cross-attention keys and values for every window, (rows, heads, pos, dim);
        computed window by window, as the encoder ran, straight into the batch's tensors."""
        attention = layer.encoder_attn
        first = encoded[0]
        shape = (len(encoded), self.num_heads, first.shape[1], self.head_dim)
        keys = torch.empty(shape, dtype=first.dtype, device=first.device)
        values = torch.empty_like(keys)
        for row, states in enumerate(encoded):
            keys[row : row + 1] = self._split_heads(attention.k_proj(states))
            values[row : row + 1] = self._split_heads(attention.v_proj(states))
        return keys, values

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """(rows, length, heads * dim) as a (rows, heads, length, dim) view."""
        rows, length, _ = states.shape
        return states.view(rows, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _forward(self, tokens: torch.Tensor, position: int,
                 cache: list[tuple[torch.Tensor, torch.Tensor]],
                 cross: list[tuple[torch.Tensor, torch.Tensor]],
                 running: list[tuple[int, int]]) -> torch.Tensor:
        """The next-token logits (rows, vocab) after `tokens` (rows, new) at `position`.

        Every layer runs on all rows, so each matrix product has the batch's shape (a row's
        result depends on how many rows a product has, and generate keeps finished rows in its
        batch); only the cross-attention, which reads each window's 1500 encoder positions and
        whose rows do not depend on each other, skips the finished ones (`running`)."""
        new = tokens.shape[1]
        end = position + new
        rows = tokens.shape[0]
        hidden = F.embedding(tokens, self.decoder.embed_tokens.weight)
        hidden += self.decoder.embed_positions.weight[position:end]
        for weights, (key_cache, value_cache), (cross_k, cross_v) in zip(
            self.weights, cache, cross, strict=True
        ):
            normed = F.layer_norm(hidden, *weights.self_norm)
            query = self._split_heads(F.linear(normed, *weights.self_q).mul_(self.scaling))
            key_cache[:, :, position:end] = self._split_heads(F.linear(normed, weights.self_k))
            value_cache[:, :, position:end] = self._split_heads(F.linear(normed, *weights.self_v))
            attended = F.scaled_dot_product_attention(
                query, key_cache[:, :, :end], value_cache[:, :, :end],
                is_causal=new > 1, scale=1.0,
            )
            hidden += F.linear(self._merge(attended), *weights.self_out)

            normed = F.layer_norm(hidden, *weights.cross_norm)
            query = self._split_heads(F.linear(normed, *weights.cross_q).mul_(self.scaling))
            if running == [(0, rows)]:
                attended = F.scaled_dot_product_attention(query, cross_k, cross_v, scale=1.0)
            else:
                attended = torch.zeros_like(query)
                for start, stop in running:
                    attended[start:stop] = F.scaled_dot_product_attention(
                        query[start:stop], cross_k[start:stop], cross_v[start:stop], scale=1.0
                    )
            hidden += F.linear(self._merge(attended), *weights.cross_out)

            normed = F.layer_norm(hidden, *weights.final_norm)
            hidden += F.linear(self.activation(F.linear(normed, *weights.fc1)), *weights.fc2)
        hidden = self.decoder.layer_norm(hidden[:, -1])
        return self.model.proj_out(hidden).float()

    @staticmethod
    def _merge(attended: torch.Tensor) -> torch.Tensor:
        rows, heads, length, dim = attended.shape
        return attended.transpose(1, 2).reshape(rows, length, heads * dim)


def _runs(done: list[bool]) -> list[tuple[int, int]]:
    """The [start, stop) runs of rows not done."""
    runs: list[tuple[int, int]] = []
    start = None
    for row, finished in enumerate([*done, True]):
        if not finished and start is None:
            start = row
        elif finished and start is not None:
            runs.append((start, row))
            start = None
    return runs
