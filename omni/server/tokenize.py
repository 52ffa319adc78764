"""vLLM's `/tokenize` and `/detokenize`: the server's own tokenizer and chat template, so a
client can count tokens or check a prompt exactly as the server will see it."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from omni.server.orchestrator import Orchestrator
from omni.server.protocol import APIError, ChatMessage, ToolDefinition, _OpenAIModel


class TokenizeRequest(_OpenAIModel):
    model: str | None = None
    # A completion prompt, or a chat (rendered with the template, as a chat request is).
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_OpenAIModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


def tokenize(orch: Orchestrator, request: TokenizeRequest) -> dict[str, Any]:
    if (request.prompt is None) == (request.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", param="prompt")
    if request.messages is not None:
        tools = None if not request.tools else [t.model_dump(exclude_none=True)
                                                for t in request.tools]
        tokens = orch.prompt_for_chat(request.messages, tools)
    else:
        assert request.prompt is not None
        tokens = list(orch.tokenizer.encode(request.prompt,
                                            add_special_tokens=request.add_special_tokens))
    return {"count": len(tokens), "max_model_len": orch.max_model_len, "tokens": tokens,
            "token_strs": None}


def detokenize(orch: Orchestrator, request: DetokenizeRequest) -> dict[str, Any]:
    vocab = len(orch.tokenizer)
    bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside [0, {vocab})", param="tokens")
    return {"prompt": orch.tokenizer.decode(request.tokens)}
