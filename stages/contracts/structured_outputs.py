"""A request's output constraint, as vLLM's `StructuredOutputsParams` spells it.

Exactly one kind is set: a JSON schema, any JSON object, a regular expression, a choice among
strings, or a grammar (xgrammar's EBNF). The LLM stage compiles it into a grammar whose token
mask the sampler applies; the HTTP layer builds it from `response_format`, vLLM's
`structured_outputs` / `guided_*` fields and forced tool calls.

A JSON schema travels as JSON text, not a dict: nothing in a contract is `Any`, and the text is
also what compiled grammars are cached by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Bounds the work one request can ask of the grammar compiler.
MAX_CONSTRAINT_CHARS = 65536
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputs:
    # A JSON schema as JSON text (a dict is accepted and written as text).
    json: str | None = None
    # Any JSON object (OpenAI's response_format {"type": "json_object"}).
    json_object: bool = False
    regex: str | None = None
    # The output is exactly one of these strings.
    choice: list[str] | None = None
    # An EBNF grammar in xgrammar's (GBNF) dialect, with a `root` rule.
    grammar: str | None = None

    def __post_init__(self) -> None:
        schema: object = self.json
        if schema is not None and not isinstance(schema, str):
            if not isinstance(schema, dict):
                raise ValueError(f"structured_outputs.json must be an object, got {schema!r}")
            object.__setattr__(self, "json", json.dumps(schema))
        if self.json is not None:
            try:
                parsed = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise ValueError("structured_outputs.json must be a JSON schema object")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got "
                             f"{self.json_object!r}")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice:
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice has {len(self.choice)} strings; "
                                 f"the limit is {MAX_CHOICES}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice items must be non-empty strings")
        kinds = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                         else [])
        if len(kinds) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar; got {kinds or 'none'}"
            )
        for name in ("json", "regex", "grammar"):
            text = getattr(self, name)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"structured_outputs.{name} must be a string")
            if text is not None and len(text) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"structured_outputs.{name} has {len(text)} characters; the "
                                 f"limit is {MAX_CONSTRAINT_CHARS}")

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json_object:
            return "json_object"
        return next(
            n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None
        )

    @property
    def cache_key(self) -> tuple[str, str]:
        """What a compiled grammar is cached by: the kind and its text."""
        kind = self.kind
        if kind == "choice":
            return kind, json.dumps(self.choice)
        return kind, str(getattr(self, kind))
