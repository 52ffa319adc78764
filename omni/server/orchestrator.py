"""Routes one request to the LLM stage and streams its tokens back.

The chat template and the tokenizer run here, in the API process, and the LLM stage gets
token ids. Media parts (`image_url` and `file` for Qwen2-VL models, `input_audio` for
Qwen2-Audio models) are made ready by `media_prompt.MediaPrompts` (headers checked and content
hashed; images are not decoded here) and travel inside that one LLM request: the LLM stage asks
an encoder stage for the items its caches lack. Requests with the same first item prefer the
same LLM replica (rendezvous hashing over the live replicas, the same choice in every API
process), so its prefix and encoder-output caches serve the repeats, while that replica is not
much busier than the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from omni.media import MediaLimits
from omni.media.fetch import MediaFetchPolicy
from omni.media.pdf import PdfRenderer
from omni.multimodal.chat import render_chat
from omni.multimodal.prompt import MultiModalPrompt
from omni.multimodal.requests import llm_request
from omni.server.documents import Documents
from omni.server.media_prompt import MediaPrompts, has_media_parts
from omni.server.metrics import ServerMetrics
from omni.server.perceived_parts import PartReader
from omni.server.perception import Perception
from omni.server.protocol import APIError, ChatMessage, usage
from omni.server.tool_calls import HERMES, template_supports_tools
from omni.server.tool_prompt import template_message, tools_as_text
from omni.stages.contracts import llm
from omni.stages.contracts.sampling import SamplingParams
from omni.supervision.replicas import rendezvous
from omni.supervision.router import StageRouter
from omni.supervision.streams import (
    NoReplicaError,
    ReplicaLostError,
    StageFailure,
    StageRequestError,
)

LLM_ROLE = llm.ROLE


@dataclass(frozen=True)
class TokenDelta:
    """What one LLM reply added, plus the totals once it is the last."""

    text: str
    token_ids: list[int]
    # One per token of `token_ids`, when the request asked for logprobs.
    logprobs: list[llm.TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens served by the prefix cache (OpenAI's prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object, from the last delta's totals."""
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


class Orchestrator:
    """Prompt building, context checks and the LLM hop for one served model."""

    def __init__(
        self,
        router: StageRouter,
        tokenizer: Any,
        model_name: str,
        max_model_len: int,
        metrics: ServerMetrics,
        mm_processor: Any = None,
        media_limits: MediaLimits | None = None,
        fetch_policy: MediaFetchPolicy | None = None,
        documents: Documents | None = None,
        tool_parser: str = HERMES,
        roles: Sequence[str] = (LLM_ROLE,),
        perception: Perception | None = None,
    ) -> None:
        self.router = router
        # OCR and speech recognition for media the model does not take (None: none).
        self.perception = perception
        # How tool calls are read out of answers to `tool_choice` "auto" (tool_calls.PARSERS).
        self.tool_parser = tool_parser
        # The stage roles a request may need (the LLM, its encoder, generators): the server is
        # healthy only while each has a live replica.
        self.roles = tuple(roles)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics
        documents = documents or Documents(PdfRenderer())
        read_as_text = frozenset(
            part for part in ("image_url", "input_audio", "file")
            if perception is not None and perception.modes.as_text(part)
        )
        self.media = MediaPrompts(
            model_name, documents, mm_processor, media_limits, fetch_policy, read_as_text
        )
        self._parts = None if perception is None else PartReader(perception, documents)

    async def read_media_as_text(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """`messages` with the media parts the modes send as text replaced (or followed) by
        their text; run after `media.fetch_media` and `media.render_documents`."""
        if self._parts is None:
            return list(messages)
        return await self._parts.rewrite(messages)

    def missing_roles(self) -> list[str]:
        """The needed stage roles that have no live replica now (empty: healthy)."""
        return [role for role in self.roles if not self.router.replica_ids(role)]

    # ---- prompts ----------------------------------------------------------------------------

    def prompt_for_chat(
        self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of the conversation after the model's chat template (which also renders
        `tools` and the turns that call them; see `tool_prompt` for templates that cannot)."""
        if not messages:
            raise APIError(400, "messages is empty: send at least one message", param="messages")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(
                400, f"model {self.model_name!r} has no chat template; use /v1/completions"
            )
        conversation = [
            template_message(m, _message_text(m, i)) for i, m in enumerate(messages)
        ]
        if not template_supports_tools(self.tokenizer):
            conversation = tools_as_text(conversation, tools)
            tools = None
        # Message texts that spell a special token (`<|im_end|>`, `<|image_pad|>`) are
        # tokenized as the plain text they are: a user's words must not end a turn or become
        # an image placeholder (which the LLM stage would refuse with no image to fill it).
        chat, _ = render_chat(self.tokenizer, conversation, None, tools=tools)
        # The template already wrote the special tokens (BOS, role markers).
        return chat.encode(self.tokenizer, add_special_tokens=False)

    def prompt_for_chat_with_media(
        self, messages: Sequence[ChatMessage]
    ) -> tuple[list[int], MultiModalPrompt | None]:
        """Token ids of the conversation, and its media items' processed inputs when it has
        any."""
        if not any(has_media_parts(m) for m in messages):
            return self.prompt_for_chat(messages), None
        prompt = self.media.prepare(messages)
        return prompt.prompt_token_ids, prompt

    async def prompt_for_chat_async(
        self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], MultiModalPrompt | None]:
        """`prompt_for_chat_with_media` off the event loop when there are media parts (hashing
        files, decoding audio, making features); a text chat stays on it (a thread hop would
        cost more than its tokenization)."""
        if not any(has_media_parts(m) for m in messages):
            return self.prompt_for_chat(messages, tools), None
        if tools:
            raise APIError(400, "tools with image, audio or file parts are not served yet",
                           param="tools")
        return await asyncio.to_thread(self.prompt_for_chat_with_media, messages)

    def prompt_for_completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            return list(self.tokenizer.encode(prompt))
        if not prompt:
            raise APIError(400, "prompt is an empty list of token ids", param="prompt")
        vocab = len(self.tokenizer)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside [0, {vocab})", param="prompt")
        return list(prompt)

    def sampling_params(self, prompt_len: int, **fields: Any) -> SamplingParams:
        """Validated sampling settings; the context limit is checked against `max_tokens`."""
        if prompt_len >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {prompt_len} tokens, leaving no room for a generated token",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = fields.get("max_tokens")
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; you "
                f"asked for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                f"{max_tokens} to generate)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        given = {k: v for k, v in fields.items() if v is not None}
        vocab = len(self.tokenizer)
        bad = next((t for t in given.get("logit_bias") or {} if not str(t).isdigit()
                    or int(t) >= vocab), None)
        if bad is not None:
            raise APIError(400, f"logit_bias key {bad!r} is not a token id in [0, {vocab})",
                           param="logit_bias")
        try:
            return SamplingParams(**{"max_tokens": None, **given})
        except ValueError as exc:
            # SamplingParams messages start with the field ("top_p=0.0 must be in (0, 1]",
            # "temperature must be a number, ..."), which OpenAI reports as `param`.
            param = str(exc).split("=", 1)[0].split(" ", 1)[0]
            raise APIError(400, str(exc), param=param) from None

    # ---- generation -------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        mm_prompt: MultiModalPrompt | None = None,
        affinity: str | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Stream the LLM stage's replies. Closing the iterator early (a client that left)
        aborts the request, which frees its KV blocks in the stage. Requests with the same
        `affinity` key (or first media item) prefer the same replica, whose caches hold
        their common prefix."""
        started = time.monotonic()
        tensors, body = llm_request(prompt_token_ids, params, mm_prompt)
        prefer = None
        if mm_prompt is not None and mm_prompt.placeholders:
            affinity = mm_prompt.placeholders[0].item_hash
        if affinity is not None:
            replicas = self.router.replica_ids(LLM_ROLE)
            prefer = rendezvous(affinity, replicas)
        try:
            stream = self.router.submit_async(LLM_ROLE, tensors, body, prefer=prefer)
        except StageFailure as exc:
            # No replica had room: the router's words, naming the cause.
            raise _api_error(exc) from None
        finish_reason = "abort"
        completion_tokens = 0
        last_reply_at = started
        self.metrics.requests_running.inc()
        try:
            async for reply in stream:
                update = llm.CONTRACT.decode_reply(reply.body)
                delta_ids = update.token_ids_delta
                now = time.monotonic()
                if completion_tokens == 0 and delta_ids:
                    self.metrics.time_to_first_token.observe(now - started)
                elif delta_ids:
                    for _ in delta_ids:
                        self.metrics.inter_token_latency.observe(
                            (now - last_reply_at) / len(delta_ids)
                        )
                if delta_ids:
                    last_reply_at = now
                if update.queue_time_s is not None:
                    self.metrics.queue_time.observe(update.queue_time_s)
                completion_tokens += len(delta_ids)
                self.metrics.generation_tokens.inc(len(delta_ids))
                delta = TokenDelta(
                    text=update.text_delta, token_ids=delta_ids, logprobs=update.logprobs
                )
                if reply.finished:
                    finish_reason = update.finish_reason or "stop"
                    prompt_tokens = update.prompt_tokens or len(prompt_token_ids)
                    self.metrics.prompt_tokens.inc(prompt_tokens)
                    self.metrics.e2e_latency.observe(time.monotonic() - started)
                    delta = dataclasses.replace(
                        delta,
                        finish_reason=finish_reason,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=update.completion_tokens or completion_tokens,
                        cached_tokens=update.cached_tokens,
                    )
                yield delta
        except StageFailure as exc:
            finish_reason = "error"
            raise _api_error(exc) from None
        finally:
            # Runs on normal end, error, and cancellation or aclose() from a client that left.
            if not stream.done:
                stream.abort()
            self.metrics.requests_running.dec()
            self.metrics.requests_finished.labels(finish_reason=finish_reason).inc()



def _api_error(exc: StageFailure) -> APIError:
    if isinstance(exc, StageRequestError):
        # The LLM stage refuses only what it cannot serve (bad prompt or sampling values).
        return APIError(400, str(exc))
    if isinstance(exc, (ReplicaLostError, NoReplicaError)):
        return APIError(503, str(exc), "service_unavailable")
    return APIError(500, str(exc), "internal_error")


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text":
            raise APIError(
                400,
                f"messages[{index}]: content part type {part.type!r} is not supported yet; "
                "only 'text' parts are",
                param=f"messages[{index}].content",
                code="unsupported_content",
            )
        if part.text is None:
            raise APIError(
                400, f"messages[{index}]: a text part needs 'text'", param=f"messages[{index}]"
            )
        texts.append(part.text)
    return "".join(texts)
