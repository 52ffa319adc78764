"""The output constraint a request asks for, from whichever field asks for it: OpenAI's
`response_format`, vLLM's `structured_outputs` and `guided_*` extensions, or a tool choice
that forces a call. Two at once is a 400 naming both: neither may silently win."""

from __future__ import annotations

import json
from typing import Any

from omni.server.protocol import APIError, SamplingFields
from omni.server.tool_calls import ToolPlan
from omni.stages.contracts.structured_outputs import StructuredOutputs


def output_constraint(
    request: SamplingFields, tools: ToolPlan | None = None
) -> StructuredOutputs | None:
    found: list[tuple[str, StructuredOutputs]] = []
    for param, make in _sources(request):
        try:
            spec = make()
        except ValueError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None
        if spec is not None:
            found.append((param, spec))
    if tools is not None:
        spec = tools.constraint()
        if spec is not None:
            found.append(("tool_choice", spec))
    if len(found) > 1:
        raise APIError(
            400,
            f"{found[0][0]} and {found[1][0]} both constrain the output; send only one",
            param=found[1][0],
        )
    return found[0][1] if found else None


def _sources(request: SamplingFields) -> list[tuple[str, Any]]:
    so = request.structured_outputs
    return [
        ("response_format", lambda: _response_format(request)),
        ("structured_outputs", lambda: None if so is None else StructuredOutputs(
            json=_schema_text(so.json_), json_object=bool(so.json_object), regex=so.regex,
            choice=so.choice, grammar=so.grammar,
        )),
        ("guided_json", lambda: None if request.guided_json is None
         else StructuredOutputs(json=_schema_text(request.guided_json))),
        ("guided_regex", lambda: None if request.guided_regex is None
         else StructuredOutputs(regex=request.guided_regex)),
        ("guided_choice", lambda: None if request.guided_choice is None
         else StructuredOutputs(choice=request.guided_choice)),
        ("guided_grammar", lambda: None if request.guided_grammar is None
         else StructuredOutputs(grammar=request.guided_grammar)),
    ]  # fmt: skip


def _response_format(request: SamplingFields) -> StructuredOutputs | None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputs(json_object=True)
    given = response_format.json_schema
    if given is None or given.json_schema is None:
        raise ValueError("type 'json_schema' needs json_schema.schema")
    return StructuredOutputs(json=json.dumps(given.json_schema))


def _schema_text(schema: dict[str, Any] | str | None) -> str | None:
    if schema is None or isinstance(schema, str):
        return schema
    return json.dumps(schema)
