"""Tool calling with the official `openai` client against `omni serve` (in process), on the
embedded default (SmolLM2, whose template knows no tools: omni writes them in the Hermes
format), a tiny random Qwen2.5-style checkpoint (Hermes `<tool_call>` blocks) and a tiny random
Llama-3-style one (bare JSON calls). The random models write nonsense, so what is shown is what
the grammar and the parsers guarantee: a forced call always parses and its arguments validate,
the history of a tool loop reaches the template, and a streamed call reassembles to the
non-streamed one. The parsers' handling of free ("auto") answers is shown on fixed texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from fixtures_tools import make_tool_checkpoint
from pydantic import BaseModel, ConfigDict, Field
from server_fixtures import CONTEXT, NO_PERCEPTION, live_server

from omni.server.app import build_app
from omni.server.config import ServeConfig
from omni.server.pipeline import Pipeline
from omni.server.protocol import ChatCompletionRequest
from omni.server.tool_calls import (
    HERMES,
    LLAMA3_JSON,
    ToolCallStream,
    ToolPlan,
    parse_hermes,
    parse_llama3_json,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object",
                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
                       "required": ["zone"], "additionalProperties": False},
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module", params=["default", "qwen2", "llama"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path
) -> Iterator[tuple[str, Pipeline]]:
    if request.param == "default":
        model = str(smollm2_dir)
    else:
        folder = tmp_path_factory.mktemp(f"tools-{request.param}")
        model = str(make_tool_checkpoint(request.param, folder, max_position_embeddings=CONTEXT))
    config = ServeConfig(
        **NO_PERCEPTION,
        model=model, served_model_name="m", single_process=True, speech=False,
        devices={"llm": ("cpu",)}, engine_options={"num_kv_blocks": "256", "block_size": "16"},
    )  # fmt: skip
    with Pipeline(config) as pipeline, live_server(build_app(pipeline.orchestrator)) as url:
        yield url, pipeline


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def ask(url: str, **fields: Any) -> Any:
    body: dict[str, Any] = {"model": "m", "messages": QUESTION, "temperature": 0,
                            "max_tokens": 160, "tools": [WEATHER, CLOCK], **fields}
    return client(url).chat.completions.create(**body)


def test_required_call_parses_and_its_arguments_validate(server: tuple[str, Pipeline]) -> None:
    reply = ask(server[0], tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if call.function.name == "get_weather":
        WeatherArgs.model_validate_json(call.function.arguments)
    else:
        assert call.function.name == "get_time"
        assert isinstance(json.loads(call.function.arguments)["zone"], int)


def test_named_function_is_called_with_valid_arguments(server: tuple[str, Pipeline]) -> None:
    for name in ("get_weather", "get_time"):
        reply = ask(server[0], tool_choice={"type": "function", "function": {"name": name}})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"  # as OpenAI answers a named tool_choice
        [call] = choice.message.tool_calls
        assert call.function.name == name
        if name == "get_weather":
            WeatherArgs.model_validate_json(call.function.arguments)
        else:
            assert list(json.loads(call.function.arguments)) == ["zone"]


def test_two_turn_tool_loop_completes(server: tuple[str, Pipeline]) -> None:
    url, pipeline = server
    first = ask(url, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = first.choices[0].message.tool_calls
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
    ]
    second = ask(url, messages=history, tool_choice="none")
    assert second.choices[0].finish_reason in ("stop", "length")
    assert isinstance(second.choices[0].message.content, str)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # The template saw the call and the tool's answer.
    orch = pipeline.orchestrator
    parsed = ChatCompletionRequest.model_validate({"model": "m", "messages": history})
    prompt = orch.tokenizer.decode(orch.prompt_for_chat(parsed.messages, [WEATHER]))
    assert "22 degrees and sunny" in prompt
    assert json.loads(call.function.arguments)["city"] in prompt
    assert "get_weather" in prompt


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "get_weather"}}])
def test_streamed_call_reassembles_to_the_whole_one(
    server: tuple[str, Pipeline], tool_choice: Any
) -> None:
    whole = ask(server[0], tool_choice=tool_choice, parallel_tool_calls=False)
    [expected] = whole.choices[0].message.tool_calls
    stream = ask(server[0], tool_choice=tool_choice, parallel_tool_calls=False, stream=True)
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"name": "", "arguments": ""})
                if piece.id:
                    call["id"] = piece.id
                if piece.function.name:
                    call["name"] += piece.function.name
                call["arguments"] += piece.function.arguments or ""
    assert finish == whole.choices[0].finish_reason
    [call] = calls.values()
    assert call["id"].startswith("call_")
    assert (call["name"], call["arguments"]) == (expected.function.name,
                                                 expected.function.arguments)


# ---- parsers, on fixed texts ----------------------------------------------------------------


def test_hermes_parser_reads_calls_and_keeps_text_before_them() -> None:
    text = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": '
            '{"zone": 2}}')  # the last block cut off by EOS
    content, calls = parse_hermes(text)
    assert content == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Rome", "unit": "celsius"}'), ("get_time", '{"zone": 2}'),
    ]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>{not json}</tool_call>") == (
        "<tool_call>{not json}</tool_call>", [])


def test_llama3_json_parser_reads_bare_calls() -> None:
    content, calls = parse_llama3_json(
        '<|python_tag|>{"name": "get_time", "parameters": {"zone": 1}}; '
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}'
    )
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_time", '{"zone": 1}'), ("get_weather", '{"city": "Oslo", "unit": "celsius"}'),
    ]
    assert parse_llama3_json("It is sunny.") == ("It is sunny.", [])


@pytest.mark.parametrize("parser", [HERMES, LLAMA3_JSON])
def test_auto_stream_sends_content_then_the_calls(parser: str) -> None:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": QUESTION, "tools": [WEATHER]})
    plan = ToolPlan.of(request, parser)
    assert plan is not None
    if parser == HERMES:
        pieces = ["Sure", ". <tool", '_call>{"name": "get_weather", ',
                  '"arguments": {"city": "Rome", "unit": "celsius"}}</tool_call>']
    else:
        pieces = [' {"name": "get_weather", ', '"parameters": {"city": "Rome", ',
                  '"unit": "celsius"}}']
    stream = ToolCallStream(plan)
    sent = [stream.feed(piece) for piece in pieces]
    closing = stream.finish()
    assert "".join(sent) == ("Sure. " if parser == HERMES else "")
    assert [d["tool_calls"][0]["index"] for d in closing] == [0, 0]
    assert closing[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert closing[1]["tool_calls"][0]["function"] == {
        "arguments": '{"city": "Rome", "unit": "celsius"}'}
    assert plan.finish_reason(stream.calls, "stop") == "tool_calls"

