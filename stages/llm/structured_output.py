"""Structured output in the LLM stage: constraints compiled into grammars, one matcher per
request, and the token bitmask the sampler applies.

Why xgrammar (README, "Structured output"): it is what vLLM and SGLang use by default; its
compiled grammars precompute which tokens each grammar state allows, so filling a request's
mask is one C++ call per step (tens of microseconds for a JSON schema on the CPU), and it
ships the batched mask kernels for the GPU and the CPU.

Compiling a JSON schema takes milliseconds to a second (it walks the whole vocabulary), so it
never runs on the step loop: `GrammarCompiler.submit` compiles on a worker thread and the
engine admits the request when its grammar is ready, while the other requests keep stepping.
Compiled grammars are cached by constraint (kind and text), so a schema sent again costs
nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from omni.stages.contracts.structured_outputs import StructuredOutputs

# Compiled grammars kept for reuse; a JSON-schema grammar is tens of KiB to a few MiB.
MAX_CACHED_GRAMMARS = 256


class GrammarCompiler:
    """Compiles `StructuredOutputs` into xgrammar grammars on one background thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Collection[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        # Built on the worker thread on first use: reading a 150k-entry vocabulary takes a
        # while, and engines that never see a constraint should not pay it.
        self._compiler: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compiler")
        self._cache: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, spec: StructuredOutputs) -> Future[Any]:
        """The compiled grammar of `spec`, now or later; a bad constraint fails the future
        with a ValueError naming it."""
        key = spec.cache_key
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and not (cached.done() and cached.exception() is not None):
                self._cache.move_to_end(key)
                return cached
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            return future

    def _compile(self, spec: StructuredOutputs) -> Any:
        import xgrammar

        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        compiler = self._compiler
        try:
            if spec.json is not None:
                return compiler.compile_json_schema(spec.json, any_whitespace=False)
            if spec.json_object:
                return compiler.compile_builtin_json_grammar()
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return compiler.compile_grammar(_choice_grammar(spec.choice))
            assert spec.grammar is not None
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"structured_outputs.{spec.kind} could not be compiled: "
                             f"{str(exc).strip()}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _choice_grammar(choices: Sequence[str]) -> str:
    # JSON string literals are valid EBNF string literals in xgrammar's dialect.
    import json

    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it (which the
        mask prevents, except for tokens forced past it such as an ignored EOS)."""
        if self._matcher.is_terminated():
            return False
        return bool(self._matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """Whether the grammar has accepted its end (a stop token): a request kept running
        past it (ignore_eos, min_tokens) samples unconstrained."""
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


class BitmaskBuffers:
    """Host bitmasks that one step's constrained rows are filled into, built while the device
    runs the step's forward.

    Reused step after step rather than allocated (at 256 rows and a 152k vocabulary a mask is
    5 MB), and pinned on a CUDA host so that its copy to the device does not wait. Two buffers
    alternate: with asynchronous scheduling one step may still be copying its mask while the
    next one is filled. Only the constrained rows are written; the sampler reads no other.
    """

    def __init__(self, vocab_size: int, pin: bool) -> None:
        self.vocab_size = vocab_size
        self.pin = pin
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._next = 0

    def fill(
        self, states: Sequence[GrammarState | None]
    ) -> tuple[torch.Tensor, list[int]] | None:
        """The step's bitmask and the rows it constrains, or None when none is."""
        rows = [
            row for row, s in enumerate(states) if s is not None and not s.is_terminated
        ]
        if not rows:
            return None
        bitmask = self._buffer(len(states))
        for row in rows:
            state = states[row]
            assert state is not None
            state.fill(bitmask, row)
        return bitmask, rows

    def _buffer(self, num_rows: int) -> torch.Tensor:
        import xgrammar

        index, self._next = self._next, 1 - self._next
        buffer = self._buffers[index]
        if buffer is None or buffer.shape[0] < num_rows:
            buffer = xgrammar.allocate_token_bitmask(max(num_rows, 64), self.vocab_size)
            if self.pin:
                buffer = buffer.pin_memory()
            self._buffers[index] = buffer
        return buffer[:num_rows]
