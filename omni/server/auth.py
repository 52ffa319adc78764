"""The bearer API key: one check, applied to every route but the health probe.

`APIKeyMiddleware` guards the whole app (the /v1 routes, and also /metrics, /version and
FastAPI's /docs, /redoc and /openapi.json, which describe the deployment), so a route added
later cannot forget the key. Only /health stays open: load balancers and Kubernetes probe it
without credentials, and it says nothing but "up" or which stage role is missing. /metrics
opens too when the operator asks (`public_metrics`: a Prometheus without the key).
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from omni.server.protocol import APIError

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Raise a 401 unless `authorization` is `Bearer <expected>` (no key configured: open).

    compare_digest keeps the comparison time independent of where the keys differ.
    """
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")


class APIKeyMiddleware:
    """Answers 401 (OpenAI's error JSON) to any HTTP request without the key, except the open
    paths. Plain ASGI, so streamed responses pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str, public_metrics: bool = False) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = {HEALTH_PATH, METRICS_PATH} if public_metrics else {HEALTH_PATH}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            check_api_key(self.api_key, authorization)
        except APIError as exc:
            body = json.dumps(exc.body()).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": exc.status_code,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b"Bearer"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
