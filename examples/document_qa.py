"""Ask several questions of one PDF served by `omni serve` with a vision-language model.

    omni serve /path/to/Qwen2.5-VL-3B-Instruct
    python examples/document_qa.py report.pdf "What is the title?" "What is the total on page 2?"

Every question re-sends the same document first in the conversation, so from the second
question on its pages come from the server's prefix cache: no page is rendered into new
embeddings or prefilled again, and only the question's tokens are new work.
"""

from __future__ import annotations

import argparse
import base64
import time
from pathlib import Path

from openai import OpenAI

DEFAULT_QUESTIONS = [
    "What is this document about, in one sentence?",
    "List the headings or sections you can see.",
    "What numbers or dates does it mention?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pdf", type=Path)
    parser.add_argument("questions", nargs="*", default=DEFAULT_QUESTIONS)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    encoded = base64.b64encode(args.pdf.read_bytes()).decode()
    document = {
        "type": "file",
        "file": {"filename": args.pdf.name, "file_data": f"data:application/pdf;base64,{encoded}"},
    }
    system = {"role": "system", "content": "Answer from the document only, briefly."}
    for question in args.questions:
        started = time.perf_counter()
        answer = client.chat.completions.create(
            model=model,
            # The document comes before the question, so the cached prefix covers it.
            messages=[
                system,
                {"role": "user", "content": [document, {"type": "text", "text": question}]},
            ],
            max_completion_tokens=args.max_tokens,
            temperature=0,
        )
        seconds = time.perf_counter() - started
        print(f"Q: {question}\nA: {answer.choices[0].message.content}  ({seconds:.2f} s)\n")


if __name__ == "__main__":
    main()
