"""One stage request from the HTTP layer, as an async iterator of its replies.

The perception services (OCR, speech recognition) and the speech service make their stage
calls the same way: a failure of the stage becomes the caller's `APIError` (each service maps
them in its own words), and a caller that stops early (a client that left, a `break`) aborts
the request in the stage so that it stops working for nobody.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping

import torch

from omni.server.protocol import APIError
from omni.supervision.router import StageRouter
from omni.supervision.streams import Reply, StageFailure


async def stage_replies(
    router: StageRouter,
    role: str,
    body: bytes,
    to_api_error: Callable[[StageFailure], APIError],
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> AsyncGenerator[Reply, None]:
    """The replies of one `role` request; closing the iterator early aborts it in the stage."""
    try:
        stream = router.submit_async(role, tensors, body)
    except StageFailure as exc:
        raise to_api_error(exc) from None
    try:
        async for reply in stream:
            yield reply
    except StageFailure as exc:
        raise to_api_error(exc) from None
    finally:
        if not stream.done:
            stream.abort()
