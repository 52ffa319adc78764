"""`POST /v1/uploads/chat`: a chat completion from a multipart form, for clients with files.

    curl -F prompt="What is in this?" -F file=@photo.jpg -F file=@note.wav \\
         -F file=@report.pdf http://localhost:8000/v1/uploads/chat

Each `file` is typed by its bytes (magic numbers), never by its name or declared type, and
becomes the content part a JSON client would have sent: `image_url` with a data: URL,
`input_audio`, or a `file` part with the PDF. The files come first, in form order, then the
`prompt` text, all in one user message (after a `system` message if the form has one). That
chat request then takes the very path of `/v1/chat/completions` (validation, limits, the
answer as JSON or, with `stream=true`, as server-sent events), so the two cannot drift apart.

The other form fields are the chat request's sampling fields (`model`, `max_tokens`,
`temperature`, `stop` (repeatable), `stream`, `include_usage`, ...), as strings that pydantic
converts; an unknown field is refused, so a typo is not silently ignored.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from omni.media.sniff import FileType, sniff
from omni.server.media_prompt import MEDIA_PARTS
from omni.server.protocol import APIError
from omni.server.speech_chat import AudioChatCompletionRequest

UPLOAD_ROUTE = "/v1/uploads/chat"
FILE_FIELD = "file"
# Form fields that go into the chat request under the same name, once each.
SCALAR_FIELDS = frozenset(
    {
        "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "min_p", "seed", "n", "stream", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "min_tokens", "ignore_eos", "logprobs", "pdf_dpi",
    }
)  # fmt: skip
# Form fields that are not chat request fields as they stand.
OWN_FIELDS = frozenset({"prompt", "system", "include_usage", "stop", FILE_FIELD})
# Text fields of a form may be long prompts; the body limit bounds them all together.
_MAX_FIELD_BYTES = 1 << 20
_MAX_FIELDS = 64
# The content part each sniffed kind becomes; MEDIA_PARTS says which models take it.
_PART_TYPES = {"image": "image_url", "pdf": "file", "audio": "input_audio"}
_KIND_NOUNS = {"image": "an image", "pdf": "a PDF", "audio": "audio"}
_KNOWN_TYPES = "an image (PNG, JPEG, WebP, GIF, BMP), audio (WAV, FLAC, OGG, MP3) or a PDF"


@dataclass(frozen=True)
class UploadSettings:
    # Files are bigger than JSON requests: this route gets its own body limit.
    max_body_bytes: int = 64 * 1024 * 1024
    max_files: int = 8

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"upload {name} is {value!r}; it must be an integer >= 1")


@dataclass(frozen=True)
class _Upload:
    index: int
    filename: str
    data: bytes
    file_type: FileType

    @property
    def label(self) -> str:
        return _file_label(self.index, self.filename)

    @property
    def label_short(self) -> str:
        return _file_label(self.index, "")


def add_upload_routes(
    app: FastAPI,
    settings: UploadSettings,
    read_body: Callable[[Request, int], Awaitable[bytes]],
) -> None:
    """Serve `UPLOAD_ROUTE` on `app` (built by `build_app`, whose chat path it reuses)."""

    @app.post(UPLOAD_ROUTE)
    async def upload_chat(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            shown = f"of type {content_type!r}" if content_type else "without a Content-Type"
            raise APIError(
                415,
                f"{UPLOAD_ROUTE} takes multipart/form-data (curl -F prompt=... -F file=@...); "
                f"the request is {shown}. JSON requests go to /v1/chat/completions",
                code="unsupported_media_type",
            )
        body = await read_body(request, settings.max_body_bytes)
        fields, uploads = await _read_form(request, body, settings)
        media = app.state.orchestrator.media
        model_name = app.state.orchestrator.model_name
        for upload in uploads:
            kind = upload.file_type.kind
            _, plural = MEDIA_PARTS[_PART_TYPES[kind]]
            if not media.takes(_PART_TYPES[kind]):
                raise APIError(
                    400,
                    f"{upload.label} is {_KIND_NOUNS[kind]}; model {model_name!r} does not "
                    f"take {plural}",
                    param=FILE_FIELD,
                    code="unsupported_content",
                )
        parsed = app.state.validate_request(
            chat_payload(fields, uploads, model_name), AudioChatCompletionRequest
        )
        first_part = 1 if "system" in fields else 0
        try:
            response: Response = await app.state.answer_chat(parsed, request)
        except APIError as exc:
            raise _renamed(exc, first_part, uploads) from None
        return response


async def _read_form(
    request: Request, body: bytes, settings: UploadSettings
) -> tuple[dict[str, Any], list[_Upload]]:
    """The form's fields (`stop` as a list) and its files, typed and checked."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(
            max_files=settings.max_files, max_fields=_MAX_FIELDS, max_part_size=_MAX_FIELD_BYTES
        )
    except (HTTPException, MultiPartException) as exc:
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", exc))
        if detail.startswith("Too many files"):
            raise APIError(
                400,
                f"the form has more than {settings.max_files} files; the limit is "
                f"{settings.max_files} a request",
                param=FILE_FIELD,
                code="too_many_files",
            ) from None
        raise APIError(400, f"the multipart form could not be read: {detail}") from None
    try:
        fields: dict[str, Any] = {}
        uploads: list[_Upload] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != FILE_FIELD:
                    raise APIError(
                        400, f"form field {key!r} is a file; files go in 'file'", param=key
                    )
                uploads.append(await _typed_upload(len(uploads), value))
                continue
            if key == FILE_FIELD:
                raise APIError(
                    400,
                    "form field 'file' holds text; attach a file with -F file=@PATH",
                    param=FILE_FIELD,
                )
            if key not in SCALAR_FIELDS and key not in OWN_FIELDS:
                known = ", ".join(sorted((SCALAR_FIELDS | OWN_FIELDS) - {FILE_FIELD}))
                raise APIError(
                    400, f"unknown form field {key!r}; the fields are: file, {known}", param=key
                )
            if key == "stop":
                fields.setdefault("stop", []).append(value)
            elif key in fields:
                raise APIError(400, f"form field {key!r} is given more than once", param=key)
            else:
                fields[key] = value
    finally:
        await form.close()
    if not uploads:
        raise APIError(
            400,
            f"the form has no file: attach one or more with -F file=@PATH "
            f"({_KNOWN_TYPES}); text-only requests go to /v1/chat/completions",
            param=FILE_FIELD,
            code="no_file",
        )
    return fields, uploads


async def _typed_upload(index: int, upload: UploadFile) -> _Upload:
    data = await upload.read()
    filename = upload.filename or ""
    named = _file_label(index, filename)
    if not data:
        raise APIError(400, f"{named} is empty (0 bytes)", param=FILE_FIELD, code="invalid_media")
    file_type = sniff(data)
    if file_type is None:
        raise APIError(
            400,
            f"{named} is not {_KNOWN_TYPES} (judged by its contents, not its name)",
            param=FILE_FIELD,
            code="unsupported_file_type",
        )
    return _Upload(index, filename, data, file_type)


def _file_label(index: int, filename: str) -> str:
    """How errors name the form's file number `index` (from 0): "file 2 (report.pdf)"."""
    return f"file {index + 1} ({filename})" if filename else f"file {index + 1}"


def chat_payload(
    fields: dict[str, Any], uploads: list[_Upload], default_model: str
) -> dict[str, Any]:
    """The JSON body of the equivalent `/v1/chat/completions` request."""
    content: list[dict[str, Any]] = [_content_part(upload) for upload in uploads]
    if fields.get("prompt"):
        content.append({"type": "text", "text": fields["prompt"]})
    messages: list[dict[str, Any]] = []
    if fields.get("system"):
        messages.append({"role": "system", "content": fields["system"]})
    messages.append({"role": "user", "content": content})
    payload: dict[str, Any] = {
        "model": default_model,
        **{key: value for key, value in fields.items() if key in SCALAR_FIELDS},
        "messages": messages,
    }
    if "stop" in fields:
        payload["stop"] = fields["stop"]
    if "include_usage" in fields:
        payload["stream_options"] = {"include_usage": fields["include_usage"]}
    return payload


def _content_part(upload: _Upload) -> dict[str, Any]:
    encoded = base64.b64encode(upload.data).decode("ascii")
    file_type = upload.file_type
    if file_type.kind == "image":
        return {
            "type": "image_url",
            "image_url": {"url": f"data:{file_type.media_type};base64,{encoded}"},
        }
    if file_type.kind == "audio":
        return {"type": "input_audio", "input_audio": {"data": encoded, "format": file_type.format}}
    file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{encoded}"}
    if upload.filename:
        file["filename"] = upload.filename
    return {"type": "file", "file": file}


def _renamed(exc: APIError, first_part: int, uploads: list[_Upload]) -> APIError:
    """`exc` with the chat request's part names (`messages[0].content[2]`) told as the form's
    files (`file 3 (report.pdf)`), which is what the client sent."""
    message_index = 1 if first_part else 0
    pattern = re.compile(rf"messages\[{message_index}\]\.content\[(\d+)\]")

    def label(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index >= len(uploads):
            return "the prompt"
        upload = uploads[index]
        # A PDF's errors already carry the file name after the part name.
        return upload.label_short if upload.file_type.kind == "pdf" else upload.label

    message = pattern.sub(label, exc.message)
    param = exc.param
    named = pattern.fullmatch(param) if param is not None else None
    if named is not None:
        param = FILE_FIELD if int(named.group(1)) < len(uploads) else "prompt"
    return APIError(exc.status_code, message, exc.error_type, param, exc.code)
