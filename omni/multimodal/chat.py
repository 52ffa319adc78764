"""Chat messages with media items rendered through a model's chat template.

Messages are OpenAI-like: `content` is a string or a list of items `{"type": "text", "text":
...}` / `{"type": KIND, KIND: <decoded item>}` for each media kind the model takes (`image`
with a PIL image, `audio` with float32 samples). The template sees each media item as
`{"type": KIND}` only and writes the model's marker for it; the decoded items come back in
prompt order, ready for the processor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MediaKind:
    """One kind of media item a model's messages may carry."""

    name: str  # the item's "type", and the key that holds the decoded item
    item_type: type | tuple[type, ...]  # what the item must be
    description: str  # for errors: "a decoded PIL image"


# Stands in the template's text for a message text that must stay literal (see ChatText).
_LITERAL = re.compile("\ue000([0-9]+)\ue001")


@dataclass(frozen=True)
class ChatText:
    """A rendered chat prompt. Message texts that spell a special token (`<|image_pad|>`,
    `<|im_end|>`, ...) stand in `text` as numbered stand-ins, so that they are tokenized as
    the plain text they are, never as a marker or control token: a user's words must not
    become an image placeholder or end a turn."""

    text: str
    literals: tuple[str, ...] = ()

    def encode(self, tokenizer: Any, add_special_tokens: bool = True) -> list[int]:
        """Token ids of the prompt; without literals exactly `tokenizer(text)`.
        `add_special_tokens=False` for a template that writes its own (a BOS, say)."""
        if not self.literals:
            return list(tokenizer(self.text, add_special_tokens=add_special_tokens)["input_ids"])
        pieces = _LITERAL.split(self.text)
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            if index % 2:
                literal = self.literals[int(piece)]
                ids += tokenizer(literal, add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ]
            elif piece:
                first = index == 0 and add_special_tokens
                ids += tokenizer(piece, add_special_tokens=first)["input_ids"]
        return ids


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    kind: MediaKind | None,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[ChatText, list[Any]]:
    """The chat template's prompt with one marker per media item, and the items in order.
    `kind` None: a text-only conversation (string contents or text parts); `tools` go to the
    template as they are."""
    items: list[Any] = []
    rendered: list[dict[str, Any]] = []
    literals: list[str] = []
    specials = _special_strings(tokenizer)

    def plain(text: str) -> str:
        if not any(special in text for special in specials) and "\ue000" not in text:
            return text
        literals.append(text)
        return f"\ue000{len(literals) - 1}\ue001"

    for m_index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            rendered.append({**message, "content": plain(content)})
            continue
        if not isinstance(content, Sequence):
            raise ValueError(
                f"message {m_index} content must be a string or a list of items, "
                f"got {type(content).__name__}"
            )
        parts = []
        for i_index, part in enumerate(content):
            part_type = part.get("type")
            if part_type == "text":
                parts.append({"type": "text", "text": plain(str(part.get("text", "")))})
            elif kind is not None and part_type == kind.name:
                item = part.get(kind.name)
                if not isinstance(item, kind.item_type):
                    raise ValueError(
                        f"message {m_index} item {i_index}: an {kind.name} item needs "
                        f"{kind.description} under {kind.name!r}, got {type(item).__name__}"
                    )
                items.append(item)
                parts.append({"type": kind.name})
            else:
                supported = "'text'" if kind is None else f"'text', {kind.name!r}"
                raise ValueError(
                    f"message {m_index} item {i_index} has type {part_type!r}; supported: "
                    f"{supported}"
                )
        rendered.append({**message, "content": parts})
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model has no chat template; pass a text prompt instead")
    text = tokenizer.apply_chat_template(
        rendered, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return ChatText(str(text), tuple(literals)), items


def _special_strings(tokenizer: Any) -> list[str]:
    """Every added token's text: the tokenizer matches these before anything else."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [str(token) for token in decoder.values() if str(token)]


def processor_chat_template(folder: str) -> str | None:
    """The chat template a processor folder holds (`chat_template.jinja`, or the
    `chat_template` entry of `chat_template.json` / `processor_config.json`), if any."""
    path = Path(folder)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json"):
        file = path / name
        if file.is_file():
            template = json.loads(file.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def load_tokenizer_with_template(folder: str) -> Any:
    """The folder's tokenizer, with the processor's chat template when the tokenizer has none
    (released Qwen multi-modal folders keep it beside the processor config)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = processor_chat_template(folder)
    return tokenizer
