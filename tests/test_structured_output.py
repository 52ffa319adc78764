"""Structured output and the other answer-changing fields, with the official `openai` client
against `omni serve` (in process) on the embedded default model (SmolLM2-135M-Instruct).

- `client.chat.completions.parse(response_format=Model)` for ten pydantic models (nested
  objects, enums, bounded arrays, optional fields, numbers with ranges, strings with
  patterns), twenty prompts each: every reply validates;
- vLLM's `structured_outputs` / `guided_*` fields (choice, regex, grammar) and
  `response_format` json_object constrain the answer;
- `logit_bias` changes it;
- each of these tests fails when the field is dropped: the same request without it answers
  something else (shown in each test).
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field
from server_fixtures import NO_PERCEPTION, live_server

from omni.server.app import build_app
from omni.server.config import ServeConfig
from omni.server.pipeline import Pipeline

MODEL = "smollm2"
TOPICS = [
    "a city", "the sea", "a friend", "music", "a shop", "winter", "a game", "coffee", "a robot",
    "a garden", "the moon", "a school", "a train", "a forest", "a market", "a river", "a bakery",
    "a library", "a storm", "a bridge",
]  # fmt: skip
# Every string and number is bounded, so every answer fits in max_tokens.
Word = Annotated[str, Field(max_length=12)]


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Paint(BaseModel):
    name: Word
    color: Color


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    nickname: Word | None = None


class Tags(BaseModel):
    tags: list[Word] = Field(min_length=1, max_length=3)


class Address(BaseModel):
    city: str = Field(max_length=16)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Order(BaseModel):
    id: int = Field(ge=1, le=9999)
    address: Address


class Temperature(BaseModel):
    value: float = Field(ge=-50, le=50)
    unit: Literal["C", "F"]


class Scores(BaseModel):
    scores: list[Annotated[int, Field(ge=0, le=10)]] = Field(min_length=2, max_length=4)


class Review(BaseModel):
    approved: bool
    stars: int = Field(ge=1, le=5)
    comment: Word | None = None


class Product(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
    price: float = Field(ge=0, le=1000)
    colors: list[Color] = Field(min_length=1, max_length=2)


MODELS: list[type[BaseModel]] = [
    Point, Paint, Person, Tags, Address, Order, Temperature, Scores, Review, Product,
]  # fmt: skip


@pytest.fixture(scope="module")
def base_url(smollm2_dir: Path) -> Iterator[str]:
    config = ServeConfig(
        **NO_PERCEPTION,
        model=str(smollm2_dir), served_model_name=MODEL, single_process=True, speech=False,
        devices={"llm": ("cpu",)}, max_num_seqs=64,
        engine_options={"num_kv_blocks": "512", "block_size": "16"},
    )  # fmt: skip
    with Pipeline(config) as pipeline, live_server(build_app(pipeline.orchestrator)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def ask(url: str, content: str, **fields: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 24, **fields}
    return client(url).chat.completions.create(**body).choices[0].message.content


def test_ten_pydantic_models_parse_over_twenty_prompts_each(base_url: str) -> None:
    aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0)

    # As many in flight as the LLM stage runs at once (the router queues the rest, 30 s at
    # most, which two CPU cores may not clear).
    room = asyncio.Semaphore(64)

    async def one(model: type[BaseModel], topic: str) -> Any:
        async with room:
            return await parse(model, topic)

    async def parse(model: type[BaseModel], topic: str) -> Any:
        return await aclient.chat.completions.parse(
            model=MODEL, response_format=model, temperature=0, max_tokens=80,
            messages=[{"role": "user", "content": f"Give me a {model.__name__} about {topic}."}],
        )

    async def everything() -> list[Any]:
        return await asyncio.gather(*(one(m, t) for m in MODELS for t in TOPICS))

    replies = asyncio.run(everything())
    assert len(replies) == 200
    for index, reply in enumerate(replies):
        model = MODELS[index // len(TOPICS)]
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        # parse() validated the text into the model: a reply that did not fit would raise.
        assert isinstance(choice.message.parsed, model)
        assert model.model_validate_json(choice.message.content) == choice.message.parsed


def test_choice_regex_grammar_and_json_object(base_url: str) -> None:
    question = "Is the sky blue? Answer in one word."
    free = ask(base_url, question)
    choice = ask(base_url, question, extra_body={"guided_choice": ["certainly", "nope"]})
    assert choice in ("certainly", "nope") and free not in ("certainly", "nope")
    so_choice = ask(base_url, question,
                    extra_body={"structured_outputs": {"choice": ["certainly", "nope"]}})
    assert so_choice == choice
    code = ask(base_url, "Give me a code.", extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{4}"})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", code), code
    assert not re.fullmatch(r"[A-Z]{2}-[0-9]{4}", ask(base_url, "Give me a code."))
    grammar = 'root ::= "ha" ("ha")* "!"'
    laugh = ask(base_url, "Laugh.", extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"ha(ha)*!", laugh), laugh
    question = "Give a JSON object with a name and an age."
    whole = ask(base_url, question, max_tokens=40, response_format={"type": "json_object"})
    assert sorted(json.loads(whole)) == ["age", "name"]
    with pytest.raises(ValueError):  # the same question, free: not JSON
        json.loads(ask(base_url, question, max_tokens=40))


def test_response_format_json_schema_fails_if_ignored(base_url: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes"]}},
              "required": ["answer"], "additionalProperties": False}
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "a", "schema": schema, "strict": True}}
    question = "Is Paris in France?"
    assert ask(base_url, question, response_format=response_format) == '{"answer": "yes"}'
    assert ask(base_url, question) != '{"answer": "yes"}'


def test_a_bad_schema_is_a_400_naming_it(base_url: str) -> None:
    compile_error = r"structured_outputs\.regex could not be compiled"
    with pytest.raises(openai.BadRequestError, match=compile_error):
        ask(base_url, "Hi", extra_body={"guided_regex": "[unclosed"})
    # The server is still up and serving.
    assert ask(base_url, "Hi", max_tokens=2)


def test_logit_bias_changes_the_answer(base_url: str, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    [bang] = tokenizer.encode("!")
    plain = ask(base_url, "Say hello.", max_tokens=3)
    forced = ask(base_url, "Say hello.", max_tokens=3, logit_bias={str(bang): 100})
    assert forced == "!!!" and plain != "!!!"
    first = tokenizer.encode(plain)[0]
    banned = ask(base_url, "Say hello.", max_tokens=3, logit_bias={str(first): -100})
    assert tokenizer.encode(banned)[0] != first
