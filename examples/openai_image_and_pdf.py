"""Send an image and a PDF to a vision-language model served by `omni serve`, through the
official OpenAI Python client.

    omni serve /path/to/Qwen2.5-VL-3B-Instruct
    python examples/openai_image_and_pdf.py photo.jpg report.pdf "Does the photo match page 1?"

The image goes as an `image_url` part with a data: URL, the PDF as a `file` part with
`file_data` (OpenAI's format); the server renders each page to an image and adds its text.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
from pathlib import Path

from openai import OpenAI


def data_url(path: Path, default_type: str) -> str:
    media_type = mimetypes.guess_type(path.name)[0] or default_type
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("pdf", type=Path)
    parser.add_argument("question", nargs="?", default="Describe the image and the document.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(args.image, "image/png")}},
                    {
                        "type": "file",
                        "file": {
                            "filename": args.pdf.name,
                            "file_data": data_url(args.pdf, "application/pdf"),
                        },
                    },
                    {"type": "text", "text": args.question},
                ],
            }
        ],
        max_completion_tokens=args.max_tokens,
        temperature=0,
    )
    print(answer.choices[0].message.content)
    if answer.usage is not None:
        print(f"[{answer.usage.prompt_tokens} prompt tokens, pages included]")


if __name__ == "__main__":
    main()
