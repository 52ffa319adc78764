"""Tool calling: what a request's `tools` and `tool_choice` ask of the model, and the calls read
back out of its answer.

- `tool_choice` "none": the tools are shown to the model (as vLLM does), nothing is parsed.
- "auto" (the default with tools): the model's own format is parsed out of its text by the
  model's parser (`PARSERS`: Hermes / Qwen2.5 `<tool_call>{...}</tool_call>`, or Llama 3's bare
  `{"name": ..., "parameters": ...}`); text that holds no call stays the answer's content.
- "required" and a named function: the output is constrained by a JSON schema (as vLLM does),
  so the call always parses and its arguments validate against the function's parameters. A
  named function's output *is* its arguments; "required" writes an array of
  `{"name", "parameters"}` objects (one at most unless `parallel_tool_calls`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omni.server.protocol import APIError, ChatCompletionRequest, ToolDefinition
from omni.stages.contracts.structured_outputs import StructuredOutputs

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str

    def message(self) -> dict[str, Any]:
        """The call as OpenAI's `message.tool_calls` item."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: Any, arguments: Any) -> ParsedCall | None:
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False), new_call_id())


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[ParsedCall]]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (the last may be
    cut off by EOS); the text before the first is the content."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for body in _HERMES_CALL.findall(text[start:]):
        try:
            obj = json.loads(body)
        except ValueError:
            return text, []
        call = _call(obj.get("name"), obj.get("arguments")) if isinstance(obj, dict) else None
        if call is None:
            return text, []
        calls.append(call)
    content = text[:start].strip()
    return content or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[ParsedCall]]:
    """Llama 3's JSON calls: `{"name": ..., "parameters": {...}}`, several joined by `;`,
    optionally after `<|python_tag|>`. Anything else is content."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    decoder = json.JSONDecoder()
    calls = []
    position = 0
    while position < len(body):
        try:
            obj, end = decoder.raw_decode(body, position)
        except ValueError:
            return text, []
        arguments = obj.get("parameters", obj.get("arguments")) if isinstance(obj, dict) else None
        call = _call(obj.get("name"), arguments) if isinstance(obj, dict) else None
        if call is None:
            return text, []
        calls.append(call)
        position = end
        while position < len(body) and body[position] in " \n\t;":
            position += 1
    return None, calls


# Where each format's calls start: text before it streams as content.
PARSERS: dict[str, tuple[Callable[[str], tuple[str | None, list[ParsedCall]]], str]] = {
    HERMES: (parse_hermes, "<tool_call>"),
    LLAMA3_JSON: (parse_llama3_json, "{"),
}


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders `tools` (and so knows its model's call format)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def default_parser(tokenizer: Any, model_type: str) -> str:
    """Llama-family templates that render tools use Llama 3's JSON format; the rest (Qwen2.5,
    Hermes-style models, and templates without tools, which omni's fallback prompt teaches
    the Hermes format) use `<tool_call>` blocks."""
    if model_type == "llama" and template_supports_tools(tokenizer):
        return LLAMA3_JSON
    return HERMES


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools, what it lets the model do with them, and how to read calls back."""

    tools: list[ToolDefinition]
    # "none", "auto", "required", or the name of the function that must be called.
    choice: str
    parallel: bool
    parser: str

    @classmethod
    def of(cls, request: ChatCompletionRequest, parser: str) -> ToolPlan | None:
        if request.tool_choice is not None and not request.tools:
            raise APIError(400, "tool_choice is only allowed when tools are given",
                           param="tool_choice")
        if not request.tools:
            return None
        names = [tool.function.name for tool in request.tools]
        if len(set(names)) != len(names):
            raise APIError(400, "tools: two functions share a name", param="tools")
        asked = request.tool_choice or "auto"
        choice = asked if isinstance(asked, str) else asked.function.name
        if not isinstance(asked, str) and choice not in names:
            raise APIError(
                400, f"tool_choice names function {choice!r}, which is not in tools "
                f"({', '.join(names)})", param="tool_choice",
            )
        if parser not in PARSERS:
            raise APIError(400, f"tool call parser {parser!r} is unknown; known: "
                           f"{', '.join(PARSERS)}")
        return cls(list(request.tools), choice, request.parallel_tool_calls, parser)

    @property
    def is_forced(self) -> bool:
        """Whether the grammar forces calls (required, or a named function)."""
        return self.choice not in ("none", "auto")

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them (OpenAI's shape)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def constraint(self) -> StructuredOutputs | None:
        if self.choice in ("none", "auto"):
            return None
        if self.choice != "required":
            return StructuredOutputs(json=json.dumps(self._parameters(self.choice)))
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": self._parameters(tool.function.name),
                },
                "required": ["name", "parameters"],
            }
            for tool in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputs(json=json.dumps(schema))

    def _parameters(self, name: str) -> dict[str, Any]:
        tool = next(t for t in self.tools if t.function.name == name)
        return tool.function.parameters or {"type": "object", "properties": {}}

    def extract(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The answer's content and its calls."""
        if self.choice == "none":
            return text, []
        if self.choice == "required":
            try:
                items = json.loads(text)
            except ValueError:  # cut off by max_tokens
                return text, []
            return None, [
                call for item in items
                if (call := _call(item.get("name"), item.get("parameters"))) is not None
            ]
        if self.choice != "auto":
            return None, [ParsedCall(self.choice, text, new_call_id())]
        parse, _ = PARSERS[self.parser]
        return parse(text)

    def finish_reason(self, calls: list[ParsedCall], engine_reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the model chose to call (auto, required), "stop" for a
        named function; an answer cut off by length stays "length"."""
        if not calls or engine_reason == "length":
            return engine_reason
        return "stop" if self.is_forced and self.choice != "required" else "tool_calls"


class ToolCallStream:
    """One streamed choice's text as OpenAI's chat deltas: content as it arrives, until a call
    may have begun; from there the text is held, and parsed into calls when the answer ends
    (a call is streamed as its name, then its arguments, as OpenAI's are)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._text = ""
        self._sent = 0  # characters of _text already sent as content
        self._holding = plan.is_forced
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> str:
        """The content to send now."""
        self._text += text
        if self._holding or self.plan.choice == "none":
            return self._send_upto(len(self._text) if not self._holding else self._sent)
        parse_marker = PARSERS[self.plan.parser][1]
        if self.plan.parser == LLAMA3_JSON:
            # A Llama 3 call is the whole answer: decided by its first non-blank character.
            stripped = self._text.removeprefix("<|python_tag|>").lstrip()
            if not stripped:
                return ""
            if stripped.startswith(parse_marker) and self._sent == 0:
                self._holding = True
                return ""
            return self._send_upto(len(self._text))
        found = self._text.find(parse_marker, self._sent)
        if found >= 0:
            self._holding = True
            return self._send_upto(found)
        # Hold back a tail that may be the start of the marker.
        keep = next((n for n in range(len(parse_marker) - 1, 0, -1)
                     if self._text.endswith(parse_marker[:n])), 0)
        return self._send_upto(len(self._text) - keep)

    def _send_upto(self, end: int) -> str:
        piece = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return piece

    def finish(self) -> list[dict[str, Any]]:
        """The deltas that close the choice: held content, or the calls."""
        if not self._holding:
            rest = self._send_upto(len(self._text))
            return [{"content": rest}] if rest else []
        content, self.calls = self.plan.extract(self._text[self._sent :])
        if not self.calls:
            return [{"content": content}] if content else []
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(self.calls):
            deltas.append({"tool_calls": [{
                "index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }]})
            deltas.append({"tool_calls": [{"index": index,
                                           "function": {"arguments": call.arguments}}]})
        return deltas
