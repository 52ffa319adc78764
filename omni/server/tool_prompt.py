"""Chat messages as chat templates take them, tool calls included.

A template that renders `tools` (Qwen2.5, Llama 3.1, Hermes models) gets OpenAI's messages as
transformers documents them: an assistant turn's `tool_calls` with their arguments as a dict,
and `tool` turns with their `tool_call_id`. A template that does not (SmolLM2's, plain ChatML)
would drop the tools and fail on a turn without content, so for it the tools are written into
the system message in the Hermes format (the one `tool_calls.parse_hermes` reads back), calls
become `<tool_call>` text and tool answers `<tool_response>` user turns, as Qwen2.5's template
writes them.
"""

from __future__ import annotations

import json
from typing import Any

from omni.server.protocol import ChatMessage

_HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_message(message: ChatMessage, text: str) -> dict[str, Any]:
    """One message for `apply_chat_template`."""
    entry: dict[str, Any] = {"role": message.role, "content": text}
    if message.tool_calls:
        entry["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name,
                             "arguments": _arguments(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        entry["name"] = message.name
    return entry


def _arguments(text: str) -> Any:
    # Templates write arguments with `tojson`: a dict, as transformers documents; text that
    # is not JSON stays text.
    try:
        return json.loads(text)
    except ValueError:
        return text


def tools_as_text(
    conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation for a template that does not render tools (see the module doc)."""
    rendered = []
    for entry in conversation:
        if entry.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                ) + "\n</tool_call>"
                for c in entry["tool_calls"]
            )
            content = (entry["content"] + "\n" if entry["content"] else "") + calls
            rendered.append({"role": "assistant", "content": content})
        elif entry["role"] == "tool":
            rendered.append(
                {"role": "user",
                 "content": f"<tool_response>\n{entry['content']}\n</tool_response>"}
            )
        else:
            rendered.append({"role": entry["role"], "content": entry["content"]})
    if not tools:
        return rendered
    system = _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
    if rendered and rendered[0]["role"] == "system":
        first = rendered[0]
        return [{"role": "system", "content": first["content"] + "\n\n" + system}, *rendered[1:]]
    return [{"role": "system", "content": system}, *rendered]
