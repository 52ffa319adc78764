"""Tiny random checkpoints whose chat templates render tools, in the two formats omni parses:
a Qwen2.5-style template (tools in the system turn, calls as `<tool_call>` blocks, answers as
`<tool_response>` user turns) and a Llama-3-style one (calls as bare
`{"name": ..., "parameters": ...}` JSON, answers in `ipython` turns). Both are written here,
after the shapes of those models' templates, over the tiny ChatML tokenizer's special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fixtures_models import make_tiny_checkpoint

QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\\n# Tools\\n\\nYou may call one or more functions.\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '\\n</tools>\\nReturn each call as <tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{ call.function.arguments | tojson }}{{ '}\\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA_STYLE_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\\nTo call a function, respond with JSON in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- for call in message.tool_calls %}"
    "{{ '<|im_start|>assistant\\n{\"name\": \"' + call.function.name + '\", \"parameters\": ' }}"
    "{{ call.function.arguments | tojson }}{{ '}<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- elif message.role in ('tool', 'ipython') %}"
    "{{ '<|im_start|>ipython\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

TEMPLATES = {"qwen2": QWEN_STYLE_TEMPLATE, "llama": LLAMA_STYLE_TEMPLATE}


def make_tool_checkpoint(arch: str, folder: Path, **config: Any) -> Path:
    """A tiny random `arch` ("qwen2" or "llama") checkpoint with its tool-aware template."""
    from transformers import AutoTokenizer

    path = make_tiny_checkpoint(arch, folder, **config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATES[arch]
    tokenizer.save_pretrained(path)
    return path
