"""Chat messages with media items rendered through a model's chat template.

Messages are OpenAI-like: `content` is a string or a list of items `{"type": "text", "text":
...}` / `{"type": KIND, KIND: <decoded item>}` for each media kind the model takes (`image`
with a PIL image, `audio` with float32 samples). The template sees each media item as
`{"type": KIND}` only and writes the model's marker for it; the decoded items come back in
prompt order, ready for the processor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MediaKind:
    """One kind of media item a model's messages may carry."""

    name: str  # the item's "type", and the key that holds the decoded item
    item_type: type  # what the decoded item must be
    description: str  # for errors: "a decoded PIL image"


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    kind: MediaKind,
    add_generation_prompt: bool = True,
) -> tuple[str, list[Any]]:
    """Chat-template text with one marker per media item, and the items in order."""
    items: list[Any] = []
    rendered: list[dict[str, Any]] = []
    for m_index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            rendered.append(dict(message))
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
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif part_type == kind.name:
                item = part.get(kind.name)
                if not isinstance(item, kind.item_type):
                    raise ValueError(
                        f"message {m_index} item {i_index}: an {kind.name} item needs "
                        f"{kind.description} under {kind.name!r}, got {type(item).__name__}"
                    )
                items.append(item)
                parts.append({"type": kind.name})
            else:
                raise ValueError(
                    f"message {m_index} item {i_index} has type {part_type!r}; supported: "
                    f"'text', {kind.name!r}"
                )
        rendered.append({**message, "content": parts})
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model has no chat template; pass a text prompt instead")
    text = tokenizer.apply_chat_template(
        rendered, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(text), items


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
