"""Bearer API key check for the /v1 routes."""

from __future__ import annotations

import hmac

from omni.server.protocol import APIError


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
