"""`POST /v1/images/generations`: OpenAI's images API over the image generator stage.

Served when `omni serve` is given `--image-model`. The request takes OpenAI's fields: `prompt`,
`model`, `n`, `size` ("WIDTHxHEIGHT" or "auto": the model's native size), `response_format`
(only "b64_json": omni keeps no files to link to, so "url" is refused rather than ignored),
`output_format` ("png" or "jpeg") and `output_compression` (JPEG quality). `quality`, `style`,
`background`, `moderation` and `user` name features of OpenAI's hosted models and are accepted
and ignored. omni's extras: `steps`, `guidance_scale`, `negative_prompt` and `seed` (image k
of the request is drawn with `seed + k`; each returned image carries its seed).

Parameters are checked here with the contract's `ImageParams.check` (the stage runs it too),
so a bad field gets a 400 naming it before any stage work; what only the model knows (a
pipeline that takes no negative prompt, Flux's multiple of 16) comes back from the stage as a
400 as well.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

from fastapi import FastAPI, Request

from omni.server.app import AppSettings, parse_body
from omni.server.protocol import APIError, _OpenAIModel, model_not_found
from omni.stages.contracts.image import (
    CONTRACT,
    GENERATION_FAILED,
    ROLE,
    ImageLimits,
    ImageParamError,
    ImageParams,
    image_tensor,
)
from omni.supervision.router import StageRouter
from omni.supervision.streams import (
    NoReplicaError,
    ReplicaLostError,
    StageFailure,
    StageRequestError,
)

# The stage's formats that are files (not its raw pixels).
HTTP_OUTPUT_FORMATS = ("png", "jpeg")
# ImageParams fields that arrive under another name: width and height come in `size`.
_HTTP_PARAM = {"width": "size", "height": "size"}


class ImageGenerationRequest(_OpenAIModel):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: str | None = None
    output_compression: int | None = None
    # omni's extras.
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'1024x768' to (1024, 768); None or 'auto' to the model's default."""
    if size is None or size == "auto":
        return None, None
    width, sep, height = size.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise APIError(
            400,
            f"size {size!r} must be WIDTHxHEIGHT (for example 1024x1024) or auto",
            param="size",
        )
    return int(width), int(height)


class ImageService:
    """Turns one validated HTTP request into one image stage request and its response."""

    def __init__(
        self, router: StageRouter, model_name: str, limits: ImageLimits | None = None
    ) -> None:
        self.router = router
        self.model_name = model_name
        self.limits = limits or ImageLimits()

    def image_params(self, request: ImageGenerationRequest) -> ImageParams:
        """The stage parameters; APIError(400) naming the field for anything out of bounds."""
        if request.model is not None and request.model != self.model_name:
            raise model_not_found(request.model, f"generates images with {self.model_name!r}")
        if request.response_format == "url":
            raise APIError(
                400,
                "response_format 'url' is not served: omni keeps no image files; use 'b64_json'",
                param="response_format",
            )
        output_format = request.output_format or "png"
        if output_format not in HTTP_OUTPUT_FORMATS:
            raise APIError(
                400,
                f"output_format {output_format!r} is not served; use one of "
                f"{list(HTTP_OUTPUT_FORMATS)}",
                param="output_format",
            )
        width, height = parse_size(request.size)
        params = ImageParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=width,
            height=height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            n=request.n,
            seed=request.seed,
            output_format=output_format,
            output_compression=request.output_compression,
        )
        try:
            params.check(self.limits)
        except ImageParamError as exc:
            raise APIError(400, str(exc), param=_HTTP_PARAM.get(exc.param, exc.param)) from None
        return params

    async def generate(self, request: ImageGenerationRequest) -> dict[str, Any]:
        params = self.image_params(request)
        try:
            stream = self.router.submit_async(ROLE, body=CONTRACT.encode(params))
        except NoReplicaError as exc:
            raise APIError(503, str(exc), "service_unavailable") from None
        try:
            [*_, reply] = await stream.result()
        except StageFailure as exc:
            raise _api_error(exc) from None
        finally:
            if not stream.done:  # the client left mid-request: free the stage's slot
                stream.abort()
        drawn = CONTRACT.decode_reply(reply.body)
        images = [
            {
                "b64_json": base64.b64encode(
                    reply.tensors[image_tensor(k)].numpy().tobytes()
                ).decode(),
                "seed": seed,
            }
            for k, seed in enumerate(drawn.seeds)
        ]
        return {
            "created": int(time.time()),
            "data": images,
            "output_format": drawn.format,
            "size": f"{drawn.width}x{drawn.height}",
        }


def add_image_routes(app: FastAPI, service: ImageService, settings: AppSettings) -> None:
    """Serve `POST /v1/images/generations` on an app from `build_app` (whose APIError handler
    renders this route's errors as OpenAI error JSON)."""
    app.state.images = service  # /v1/models lists its model

    @app.post("/v1/images/generations")
    async def generate_images(request: Request) -> dict[str, Any]:
        parsed = await parse_body(request, ImageGenerationRequest, settings)
        return await service.generate(parsed)


def _api_error(exc: StageFailure) -> APIError:
    if isinstance(exc, ReplicaLostError | NoReplicaError):
        return APIError(503, str(exc), "service_unavailable")
    message = exc.stage_message if isinstance(exc, StageRequestError) else str(exc)
    if message.startswith(GENERATION_FAILED):
        return APIError(500, message, "internal_error")
    # Otherwise the stage refused the parameters (what only the model knows).
    return APIError(400, message)
