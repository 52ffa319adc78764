"""PDFs and multipart uploads through a running `omni serve` whose LLM and vision stages are
processes of their own: a PDF `file` part answers exactly as its pages sent as image parts
(plus their text layers) do, a re-posted PDF skips the encoder through the prefix cache, and
`curl -F` uploads of an image and a PDF answer as the equivalent chat completions, in JSON and
as server-sent events. Bad documents and bad uploads get OpenAI error JSON naming the part."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fixtures_pdf import Page, encrypted_pdf, minimal_pdf
from fixtures_vl import make_tiny_qwen2_5_vl
from server_fixtures import NO_PERCEPTION_FLAGS, free_port, metric, serve_process

from omni.media.pdf import PdfRenderer, PdfSettings

MODEL = "tiny-vl"
TOKENS = 6
# Page sizes in points = pixels at 72 DPI; small enough for the tiny model's image processor.
REPORT = [Page(112, 168, (0.8, 0.1, 0.1), "Total 42"), Page(140, 112, (0.1, 0.3, 0.9))]
UPLOAD_LIMIT = 1_000_000
CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`omni serve` as a user starts it; its stages are supervised child processes."""
    port = free_port()
    command = [
        sys.executable, "-m", "omni.cli", "serve", str(folder), "--port", str(port),
        "--served-model-name", MODEL, "--devices", "llm=cpu,vision=cpu", "--no-speech",
        *NO_PERCEPTION_FLAGS,
        "--option", "num_kv_blocks=128", "--option", "block_size=8",
        "--pdf-dpi", "72", "--max-upload-bytes", str(UPLOAD_LIMIT), "--max-upload-files", "3",
        "--log-level", "warning",
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(command, log_path, healthy_within_s=240, stop_within_s=30) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)


def pdf_part(data: bytes, filename: str = "report.pdf") -> dict[str, Any]:
    encoded = base64.b64encode(data).decode()
    return {
        "type": "file",
        "file": {"file_data": f"data:application/pdf;base64,{encoded}", "filename": filename},
    }


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_part(data: bytes) -> dict[str, Any]:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
    }


def greedy(client: openai.OpenAI, content: list[dict[str, Any]]) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],  # type: ignore[misc, list-item]
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )


def rendered_pages(data: bytes) -> list[Any]:
    with PdfRenderer(PdfSettings(dpi=72, workers=1)) as renderer:
        return renderer.render(data, name="reference")


def test_a_pdf_answers_as_its_pages_sent_as_images(client: openai.OpenAI) -> None:
    data = minimal_pdf(REPORT)
    question = {"type": "text", "text": "What is the total?"}
    from_pdf = greedy(client, [pdf_part(data), question])
    pages = rendered_pages(data)
    assert [(p.image.size, p.text) for p in pages] == [((112, 168), "Total 42"), ((140, 112), "")]
    # The same prompt by hand: each page's image, then its text layer where it has one.
    by_hand = [
        image_part(png(pages[0].image)),
        {"type": "text", "text": "Page 1 text: Total 42\n"},
        image_part(png(pages[1].image)),
        question,
    ]
    from_images = greedy(client, by_hand)
    assert from_pdf.choices[0].message.content == from_images.choices[0].message.content
    assert from_pdf.usage is not None and from_images.usage is not None
    assert from_pdf.usage.prompt_tokens == from_images.usage.prompt_tokens
    assert from_pdf.usage.completion_tokens == TOKENS
    # 112x168 px -> a 8x12 patch grid -> 24 tokens; 140x112 -> 10x8 -> 20 tokens; plus text.
    assert from_pdf.usage.prompt_tokens > 44


def test_a_reposted_pdf_skips_the_encoder_through_the_prefix_cache(
    client: openai.OpenAI, server: str
) -> None:
    data = minimal_pdf([Page(84, 84, (0.2, 0.7, 0.2), "Repeat me")])
    content = [pdf_part(data, "again.pdf"), {"type": "text", "text": "Summarise."}]
    first = greedy(client, content)
    encoded = metric(server, "omni:stage_requests_total", "")
    vision_before = _vision_requests(server)
    hits_before = _settled(
        server, "omni:prefix_cache_queries_total", "omni:prefix_cache_hits_total"
    )
    second = greedy(client, content)
    assert second.choices[0].message.content == first.choices[0].message.content
    assert _vision_requests(server) == vision_before  # no encoder pass the second time
    assert metric(server, "omni:stage_requests_total") > encoded  # the LLM stage was asked
    # The LLM stage reports its prefix-cache counters with its heartbeats.
    deadline = time.monotonic() + 15
    while metric(server, "omni:prefix_cache_hits_total") == hits_before:
        assert time.monotonic() < deadline, "no prefix-cache hit was reported"
        time.sleep(0.2)
    assert first.usage is not None
    # Every prompt token but the last (never served from cache), in whole 8-token blocks.
    hit = metric(server, "omni:prefix_cache_hits_total") - hits_before
    assert hit == (first.usage.prompt_tokens - 1) // 8 * 8


def _settled(server: str, *names: str) -> float:
    """The last of `names` once none of them changed over two heartbeats (the LLM stage
    reports its counters with its heartbeats, so earlier requests may still be arriving)."""
    values = [metric(server, name) for name in names]
    while True:
        time.sleep(2.2)
        again = [metric(server, name) for name in names]
        if again == values:
            return values[-1]
        values = again


def _vision_requests(server: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    found = re.findall(r'^omni:stage_requests_total\{[^}]*stage="vision"[^}]*\} (\S+)$', text, re.M)
    return sum(float(value) for value in found)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            encrypted_pdf([Page(50, 50)]),
            "messages[0].content[0] (report.pdf) is encrypted (password-protected); send a "
            "PDF that opens without one",
        ),
        (
            b"%PDF-1.4\n1 0 obj broken",
            "messages[0].content[0] (report.pdf) could not be read: the PDF is corrupt or "
            "truncated",
        ),
        (
            b"Just some text, not a PDF.",
            "messages[0].content[0] (report.pdf) is not a PDF file (it has no %PDF- header)",
        ),
        (
            minimal_pdf([Page(20, 20)] * 17),
            "messages[0].content[0] (report.pdf) has 17 pages; the limit is 16 pages a request",
        ),
    ],
)
def test_bad_pdfs_get_a_400_naming_the_part(
    client: openai.OpenAI, server: str, data: bytes, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        greedy(client, [pdf_part(data), {"type": "text", "text": "hi"}])
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["message"], error["param"], error["code"]) == (
        message,
        "messages[0].content[0]",
        "invalid_media",
    )
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("file_data", "message"),
    [
        (
            "data:Text/Plain;base64,JVBERi0=",
            "messages[0].content[0] (report.pdf) has media type 'Text/Plain'; file parts carry "
            "PDFs (application/pdf)",
        ),
        (
            "data:application/pdf,%PDF-1.4",
            "messages[0].content[0] (report.pdf) is a data: URL without ';base64,' data",
        ),
        (
            "data:application/pdf;base64",
            "messages[0].content[0] (report.pdf) is a data: URL without ';base64,' data",
        ),
    ],
    ids=["not a PDF type", "not base64", "no data"],
)
def test_file_data_urls_must_carry_base64_pdfs(
    client: openai.OpenAI, file_data: str, message: str
) -> None:
    part = {"type": "file", "file": {"file_data": file_data, "filename": "report.pdf"}}
    with pytest.raises(openai.BadRequestError) as info:
        greedy(client, [part, {"type": "text", "text": "hi"}])
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["message"], error["param"]) == (message, "messages[0].content[0]")


# ---- multipart uploads --------------------------------------------------------------------


def curl(server: str, *form: str, path: str = "/v1/uploads/chat") -> tuple[int, str]:
    """POST a multipart form with the real curl binary when there is one (else httpx)."""
    if CURL is not None:
        args = [argument for field in form for argument in ("-F", field)]
        done = subprocess.run(
            [CURL, "-sS", "-o", "-", "-w", "\n%{http_code}", *args, f"{server}{path}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        body, _, status = done.stdout.rpartition("\n")
        return int(status), body
    fields, files = [], []
    for item in form:
        key, _, value = item.partition("=")
        if value.startswith("@"):
            files.append((key, (Path(value[1:]).name, Path(value[1:]).read_bytes())))
        else:
            fields.append((key, value))
    reply = httpx.post(f"{server}{path}", data=dict(fields), files=files, timeout=120)
    return reply.status_code, reply.text


def test_curl_uploads_answer_as_chat_completions(
    client: openai.OpenAI, server: str, tmp_path: Path
) -> None:
    data = minimal_pdf(REPORT)
    (tmp_path / "report.pdf").write_bytes(data)
    photo = png(rendered_pages(minimal_pdf([Page(84, 112, (0.9, 0.8, 0.1))]))[0].image)
    # The name says text; the bytes say PNG, and the bytes decide.
    (tmp_path / "photo.txt").write_bytes(photo)
    fields = [f"max_tokens={TOKENS}", "temperature=0", "ignore_eos=true"]

    status, body = curl(server, "prompt=What is in this?", "file=@" + str(tmp_path / "photo.txt"),
                        f"file=@{tmp_path / 'report.pdf'}", *fields)  # fmt: skip
    assert status == 200, body
    uploaded = json.loads(body)
    expected = greedy(
        client,
        [image_part(photo), pdf_part(data), {"type": "text", "text": "What is in this?"}],
    )
    assert uploaded["object"] == "chat.completion" and uploaded["model"] == MODEL
    assert uploaded["choices"][0]["message"]["content"] == expected.choices[0].message.content
    # The same counts; the chat, sent second, finds the upload's prompt in the prefix cache.
    chat_usage = expected.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]
    cached = chat_usage.pop("prompt_tokens_details")["cached_tokens"]
    assert cached > 0
    counts = {k: v for k, v in uploaded["usage"].items() if k != "prompt_tokens_details"}
    assert counts == chat_usage

    # stream=true: the same server-sent events as a streamed chat completion.
    status, body = curl(server, "prompt=What is in this?", "file=@" + str(tmp_path / "photo.txt"),
                        f"file=@{tmp_path / 'report.pdf'}", *fields, "stream=true",
                        "include_usage=true")  # fmt: skip
    assert status == 200, body
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    assert body.rstrip().endswith("data: [DONE]")
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == expected.choices[0].message.content
    assert events[-1]["usage"]["prompt_tokens"] == expected.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("files", "fields", "status", "param", "message"),
    [
        ([], ["prompt=hi"], 400, "file", "the form has no file: attach one or more"),
        (
            ["a.pdf", "a.pdf", "a.pdf", "a.pdf"],
            [],
            400,
            "file",
            "the form has more than 3 files; the limit is 3 a request",
        ),
        (
            ["notes.txt"],
            [],
            400,
            "file",
            "file 1 (notes.txt) is not an image (PNG, JPEG, WebP, GIF, BMP), audio (WAV, "
            "FLAC, OGG, MP3) or a PDF (judged by its contents, not its name)",
        ),
        (
            ["note.wav"],
            [],
            400,
            "file",
            "file 1 (note.wav) is audio; model 'tiny-vl' does not take audio",
        ),
        (
            ["a.pdf", "secret.pdf"],
            [],
            400,
            "file",
            "file 2 (secret.pdf) is encrypted (password-protected); send a PDF that opens "
            "without one",
        ),
        (["big.png"], [], 413, None, "the limit is 1000000 bytes"),
        (["a.pdf"], ["tempreature=0"], 400, "tempreature", "unknown form field 'tempreature'"),
        (["a.pdf"], ["model=other"], 404, "model", "The model 'other' does not exist"),
        (["a.pdf"], ["max_tokens=many"], 400, "max_tokens", "max_tokens: Input should be"),
    ],
)
def test_bad_uploads_get_openai_errors(
    server: str,
    tmp_path: Path,
    files: list[str],
    fields: list[str],
    status: int,
    param: str | None,
    message: str,
) -> None:
    contents = {
        "a.pdf": minimal_pdf([Page(40, 40)]),
        "secret.pdf": encrypted_pdf([Page(40, 40)]),
        "notes.txt": b"plain text notes",
        "note.wav": b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28),
        "big.png": b"\x89PNG\r\n\x1a\n" + bytes(UPLOAD_LIMIT),
    }
    for name in set(files):
        (tmp_path / name).write_bytes(contents[name])
    got, body = curl(server, *fields, *(f"file=@{tmp_path / name}" for name in files))
    assert got == status, body
    error = json.loads(body)["error"]
    assert message in error["message"] and error["param"] == param
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_an_upload_route_refuses_json(server: str) -> None:
    reply = httpx.post(f"{server}/v1/uploads/chat", json={"prompt": "hi"}, timeout=10)
    assert reply.status_code == 415
    assert reply.json()["error"]["code"] == "unsupported_media_type"


def test_serve_flags_set_the_pdf_and_upload_limits() -> None:
    from omni.cli import build_parser
    from omni.commands.serve import serve_config

    args = build_parser().parse_args(
        ["serve", "--pdf-dpi", "150", "--max-pdf-pages", "4", "--max-pdf-bytes", "1000",
         "--no-pdf-text", "--pdf-workers", "3", "--pdf-worker-memory-mib", "512",
         "--max-upload-bytes", "5000", "--max-upload-files", "2"]
    )  # fmt: skip
    config = serve_config(args)
    assert config.pdf_settings() == PdfSettings(
        dpi=150, max_pages=4, max_bytes=1000, text=False, workers=3, worker_memory_mib=512
    )
    assert (config.max_upload_bytes, config.max_upload_files) == (5000, 2)
    bad = build_parser().parse_args(["serve", "--pdf-dpi", "1000"])
    with pytest.raises(ValueError, match=r"pdf dpi is 1000; it must be within \[36, 300\]"):
        serve_config(bad)
