"""OpenAI request and response shapes for chat completions and completions, and the error JSON.

Request models reject unknown types loudly (pydantic validation becomes a 400 in OpenAI's error
format). The chat and completion requests also refuse every field they do not declare, with a
400 naming it, except `ANSWER_NEUTRAL_FIELDS`: fields OpenAI or vLLM clients send that cannot
change the answer, accepted and ignored. A field omni does not serve is never silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

# Accepted and ignored: none of these can change the tokens of the answer (who asked, what to
# store, billing tiers, cache routing hints, scheduling priority).
ANSWER_NEUTRAL_FIELDS = frozenset(
    {
        "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
        "priority", "request_id", "cache_salt",
    }
)  # fmt: skip


class APIError(Exception):
    """An error the client caused (or must hear about), rendered as OpenAI's error JSON."""

    def __init__(
        self,
        status_code: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def model_not_found(requested: str, served: str) -> APIError:
    """OpenAI's 404 for a `model` the server does not serve; `served` finishes the sentence
    "this server ..." (what it serves under which name)."""
    return APIError(
        404,
        f"The model {requested!r} does not exist; this server {served}",
        param="model",
        code="model_not_found",
    )


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ---- requests -------------------------------------------------------------------------------


class _OpenAIModel(BaseModel):
    # Unknown fields are ignored: OpenAI clients send extras (`user`, `metadata`) that cannot
    # change the answer. Declared fields are type-checked; a mismatch becomes a 400.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_OpenAIModel):
    include_usage: bool = False


class ImageURL(_OpenAIModel):
    url: str
    # The bytes behind an http(s) or file URL once the server fetched them (never set by a
    # client: private attributes are not parsed from JSON).
    _fetched: bytes | None = PrivateAttr(default=None)


class InputAudio(_OpenAIModel):
    data: str  # base64 of the file's bytes
    format: str  # "wav", "mp3", "flac" or "ogg"


class FileData(_OpenAIModel):
    # OpenAI's file part: a PDF inline as a data: URL (`file_id` names an uploaded file, which
    # omni does not keep, and is refused by name).
    file_data: str | None = None
    filename: str | None = None
    file_id: str | None = None
    # The rendered pages once the server rendered them, and each page's text as perception
    # read it (a `--pdf-mode both` document; never set by a client).
    _pages: list[Any] | None = PrivateAttr(default=None)
    _page_texts: list[str] | None = PrivateAttr(default=None)


class TextContentPart(_OpenAIModel):
    # Any part type parses; the orchestrator serves `text`, `image_url`, `input_audio` and
    # `file` (for models that take them) and names the rest.
    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None
    file: FileData | None = None


class FunctionCall(_OpenAIModel):
    name: str
    # JSON text of the arguments, as OpenAI sends it.
    arguments: str


class ToolCall(_OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_OpenAIModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    # A string, or content parts; only `text` parts are served for now (the orchestrator
    # refuses the rest with a 400 that names the part type).
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # An assistant turn's calls, and a tool turn's answer to one of them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_OpenAIModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    # A JSON schema of the arguments (an object with no properties when absent).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_OpenAIModel):
    name: str


class NamedToolChoice(_OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_OpenAIModel):
    name: str = "response"
    description: str | None = None
    # `schema` would shadow pydantic's own attribute.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_OpenAIModel):
    # vLLM's `structured_outputs` extension: exactly one kind.
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingFields(_OpenAIModel):
    # Undeclared fields are kept so that `unknown_fields` can refuse them by name.
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extensions to the OpenAI fields, which load clients such as `vllm bench serve`
    # and `omni bench serve` send.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    # Token id (as JSON keys are strings) -> bias in [-100, 100].
    logit_bias: dict[str, float] | None = None
    # Output constraints: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* spellings.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unknown_fields(self) -> list[str]:
        """Fields the client sent that this request does not declare and that could change
        the answer."""
        return sorted(set(self.model_extra or {}) - ANSWER_NEUTRAL_FIELDS)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # omni's extension: the DPI PDF pages render at (within the server's bounds).
    pdf_dpi: float | None = None
    # vLLM's extension: the answer also holds the prompt's token ids as the LLM stage got
    # them (`prompt_token_ids`) and each choice's generated ids (`token_ids`).
    return_token_ids: bool = False


class CompletionRequest(SamplingFields):
    # A string or a list of token ids; batches of prompts are not served (n=1, one prompt).
    prompt: str | list[int]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


# ---- responses ------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "omni"


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` counts the prompt tokens the prefix cache served."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
