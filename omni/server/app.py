"""The FastAPI app: OpenAI-compatible routes over an `Orchestrator`, plus health and metrics.

Bodies are read by hand rather than by FastAPI's parameter binding so that every failure
(too large, not JSON, wrong types) comes back as OpenAI's error JSON with its own status.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

import omni
from omni.server import completions, metrics
from omni.server import tokenize as tokenizing
from omni.server.auth import APIKeyMiddleware
from omni.server.config import DEFAULT_MAX_BODY_BYTES
from omni.server.json_body import parse_json_body
from omni.server.orchestrator import Orchestrator
from omni.server.protocol import (
    ANSWER_NEUTRAL_FIELDS,
    APIError,
    CompletionRequest,
    ModelCard,
    SamplingFields,
    error_body,
    model_not_found,
)
from omni.server.speech_chat import AudioChatCompletionRequest, chat_completion_with_audio
from omni.server.tokenize import DetokenizeRequest, TokenizeRequest
from omni.server.uploads import UploadSettings, add_upload_routes

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
# nginx's status for "the client closed the connection"; nobody reads it, but logs do.
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class AppSettings:
    # None leaves every route open (the server binds loopback by default); a key guards every
    # route but /health (see omni.server.auth).
    api_key: str | None = None
    # With a key: /metrics answers without it too (a Prometheus scraping without credentials).
    public_metrics: bool = False
    # Bounds what a client can make the server buffer. Chat bodies carry media as base64
    # (images, audio, a PDF up to --max-pdf-bytes' 20 MB is 27 MB encoded), so the default
    # leaves room for them; per-item limits bound the work done on what is inside.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # The multipart upload route's own limits (its body limit is larger).
    uploads: UploadSettings = field(default_factory=UploadSettings)

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes is {self.max_body_bytes}; it must be >= 1")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; leave it unset to serve without a key")


def build_app(orchestrator: Orchestrator, settings: AppSettings | None = None) -> FastAPI:
    """The app for one served model."""
    settings = settings or AppSettings()
    app = FastAPI(title="omni", version=omni.__version__)
    app.state.orchestrator = orchestrator
    if settings.api_key is not None:
        app.add_middleware(
            APIKeyMiddleware, api_key=settings.api_key, public_metrics=settings.public_metrics
        )

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request to %s failed", request.url.path)
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", "internal_error"), status_code=500
        )

    async def parse(request: Request, model: type[M]) -> M:
        payload = await _read_json(request, settings.max_body_bytes)
        return validate(payload, model)

    def validate(payload: Any, model: type[M]) -> M:
        """`payload` as a `model` request for the served model, or the APIError to answer."""
        parsed = validate_body(payload, model)
        # Optional where vLLM makes it so (/tokenize); required by the generation routes.
        requested = getattr(parsed, "model", None) or orchestrator.model_name
        if requested != orchestrator.model_name:
            raise model_not_found(requested, f"serves {orchestrator.model_name!r}")
        return parsed

    async def answer_chat(parsed: AudioChatCompletionRequest, request: Request) -> Response:
        # http(s) and file image URLs, where the server allows them, fetched without
        # blocking the event loop; prompt building then reads their bytes.
        await orchestrator.media.fetch_media(parsed.messages)
        # PDF pages rendered in the render workers, also off the event loop.
        await orchestrator.media.render_documents(parsed.messages, parsed.pdf_dpi)
        # Media the model does not take, read as text by the OCR and speech stages.
        parsed.messages = await orchestrator.read_media_as_text(parsed.messages)
        try:
            if parsed.wants_audio():
                speech = getattr(app.state, "speech", None)  # set by add_speech_routes
                return await chat_completion_with_audio(orchestrator, speech, parsed, request)
            return await completions.chat_completion(orchestrator, parsed, request)
        except completions.ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    # Other routes that answer as chat completions (multipart uploads) go through the same
    # validation and path.
    app.state.validate_request = validate
    app.state.answer_chat = answer_chat

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer_chat(await parse(request, AudioChatCompletionRequest), request)

    add_upload_routes(app, settings.uploads, read_body)

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        parsed = await parse(request, CompletionRequest)
        try:
            return await completions.completion(orchestrator, parsed, request)
        except completions.ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return tokenizing.tokenize(orchestrator, await parse(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return tokenizing.detokenize(orchestrator, await parse(request, DetokenizeRequest))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        # The LLM, then the generator stages' models (set on app.state by their routes).
        names = [orchestrator.model_name]
        for service in (getattr(app.state, "images", None), getattr(app.state, "speech", None)):
            if service is not None and service.model_name not in names:
                names.append(service.model_name)
        return {"object": "list", "data": [ModelCard(id=name).model_dump() for name in names]}

    @app.get("/health")
    async def health() -> Response:
        # Every stage role the pipeline needs must have a live replica: with the LLM up but no
        # vision replica, image requests would wait and fail, so the server is not ready.
        missing = orchestrator.missing_roles()
        if not missing:
            return Response(status_code=200)
        roles = ", ".join(repr(role) for role in missing)
        return JSONResponse(
            error_body(f"no live replica of stage {roles}", "service_unavailable"),
            status_code=503,
        )

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": omni.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(orchestrator.metrics.render(), media_type=metrics.CONTENT_TYPE)

    return app


def validate_body(payload: Any, model: type[M]) -> M:
    """`payload` as a `model`, or a 400 naming the first field that does not fit."""
    try:
        parsed = model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']}", param=where) from None
    unknown = parsed.unknown_fields() if isinstance(parsed, SamplingFields) else []
    if unknown:
        raise APIError(
            400,
            f"unknown field {unknown[0]!r}: omni does not serve it, and ignoring it could "
            f"change the answer (fields accepted and ignored: "
            f"{', '.join(sorted(ANSWER_NEUTRAL_FIELDS))})",
            param=unknown[0],
            code="unsupported_field",
        )
    return parsed


async def parse_body(request: Request, model: type[M], settings: AppSettings) -> M:
    """A JSON route's body: the size bounded, then `validate_body` (the API key is the
    middleware's)."""
    return validate_body(await _read_json(request, settings.max_body_bytes), model)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


async def _read_json(request: Request, limit: int) -> Any:
    return parse_json_body(await read_body(request, limit))


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"request body is {size} bytes (or more); the limit is {limit} bytes",
        code="request_too_large",
    )
