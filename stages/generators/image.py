"""The image generator stage ("image"): prompts in, PNG or JPEG files out, requests batched.

What a request and its reply hold is the contract's (`omni.stages.contracts.image`): a request
is `ImageParams` (prompt, size, steps, guidance scale, negative prompt, seed, number of images,
output format) and no tensors; its one reply is finished, an `ImageReply`, with the tensors
`image_0` ... `image_{n-1}`, each the bytes of one encoded file (uint8, so they ride the
transport as raw frames or shared memory, never pickled). A refused request gets an error
naming the field and the limit.

Batching: each `step` takes the oldest queued request plus every queued request of the same
`BatchShape` (size, steps, guidance scale, negative prompt or not), up to `max_batch_pixels`,
and draws all their images in one pipeline call, so every denoising step is one UNet forward
for the whole batch (with classifier-free guidance, diffusers already runs both halves in that
one forward). Each image keeps its own seeded generator, so a batched request gives the same
image as the same request alone. A burst of requests reaches the stage over a few
milliseconds, so a batch that is not full waits while requests keep arriving (each gap at most
`arrival_gap_ms`, the whole wait at most `batch_wait_ms`); a request that comes alone waits one
gap, a rounding error next to one pipeline call. The finished pixels are encoded on a thread
pool (PIL releases the GIL) while the next batch denoises.

Options (`--option key=value`): `dtype` (auto, float32, bfloat16, float16); `cuda_graphs` and
`fuse_qkv` (auto, true, false: auto is on for CUDA); `channels_last` (true, false; off by
default, see `DiffusionImageGenerator.from_pretrained`); `max_batch_pixels`, `batch_wait_ms`,
`arrival_gap_ms`, `encode_threads`, `png_compress_level`; and the `ImageLimits` fields
(`max_pixels`, `max_steps`, `max_images`, `max_prompt_chars`, `max_guidance_scale`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omni.stages.contracts.image import (
    CONTRACT,
    GENERATION_FAILED,
    MAX_SEED,
    ROLE,
    ImageLimits,
    ImageParams,
    ImageReply,
    ImageStats,
    image_tensor,
)
from omni.stages.generators.image_encode import DEFAULT_PNG_COMPRESS_LEVEL, encode_image
from omni.stages.generators.image_pipeline import BatchShape, DiffusionImageGenerator, ImageJob
from omni.stages.runtime.options import field_types, parse_options
from omni.stages.runtime.worker import (
    StageOutput,
    StageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)

logger = logging.getLogger(__name__)

# How long `step` waits on pending encodes when there is nothing else to do: bounds how late
# the runtime notices new requests and aborts.
_ENCODE_POLL_S = 0.05


@dataclass(frozen=True)
class ImageStageSettings:
    """The image stage's `--option`s, parsed."""

    dtype: str = "auto"
    channels_last: bool = False
    cuda_graphs: bool | None = None
    fuse_qkv: bool | None = None
    # Pixels drawn in one pipeline call (images times width times height): bounds activation
    # and VAE-decode memory. 32 images of 512x512, or 8 of 1024x1024. A larger single request
    # still runs, alone.
    max_batch_pixels: int = 32 * 512 * 512
    batch_wait_ms: float = 20.0
    # Longer than Python's 5 ms thread switch interval: a client process (the API server's
    # event loop beside the router's I/O thread) can hold one request back that long.
    arrival_gap_ms: float = 6.0
    # PNG encoding of a burst's images runs this wide (encoders release the GIL).
    encode_threads: int = min(8, os.cpu_count() or 1)
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL
    limits: ImageLimits = dataclasses.field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        if self.max_batch_pixels < 1:
            raise ValueError(f"max_batch_pixels is {self.max_batch_pixels}; it must be >= 1")
        for name in ("batch_wait_ms", "arrival_gap_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be >= 0")
        if self.encode_threads < 1:
            raise ValueError(f"encode_threads is {self.encode_threads}; it must be >= 1")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level is {self.png_compress_level}; it must be 0-9")

    @classmethod
    def from_options(cls, extra: Mapping[str, str]) -> ImageStageSettings:
        own = {k: v for k, v in field_types(cls).items() if k != "limits"}
        limit_fields = field_types(ImageLimits)
        parsed = parse_options(extra, {**own, **limit_fields}, "image")
        limits = {k: parsed.pop(k) for k in list(parsed) if k in limit_fields}
        return cls(**parsed, limits=ImageLimits(**limits))


@dataclass(frozen=True)
class _Queued:
    request_id: str
    params: ImageParams  # defaults resolved, checked
    shape: BatchShape
    seeds: tuple[int, ...]
    arrived: float

    @property
    def pixels(self) -> int:
        return self.shape.width * self.shape.height * len(self.seeds)


@register_worker(ROLE)
class ImageWorker(StageWorker):
    """Diffusers text-to-image behind the stage runtime; see the module docstring."""

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        if not options.model:
            raise ValueError("the image stage needs --model (a diffusers folder or hub id)")
        self.settings = ImageStageSettings.from_options(options.extra)
        self.limits = self.settings.limits
        self.generator: DiffusionImageGenerator | None = None
        self._queue: OrderedDict[str, _Queued] = OrderedDict()
        self._refused: list[StageOutput] = []
        self._arrivals = 0  # requests queued since the last step
        # Requests whose pixels are being encoded, in the order their batches finished.
        self._encoding: OrderedDict[str, concurrent.futures.Future[StageOutput]] = OrderedDict()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Heartbeat counters (see `stats`).
        self.images_generated = 0
        self.pipeline_calls = 0

    def load(self) -> None:
        settings = self.settings
        self.generator = DiffusionImageGenerator.from_pretrained(
            self.options.model,
            self.options.device,
            settings.dtype,
            channels_last=settings.channels_last,
            fuse_qkv=settings.fuse_qkv,
            cuda_graphs=settings.cuda_graphs,
        )
        multiple = max(self.limits.size_multiple, self.generator.size_multiple)
        self.limits = dataclasses.replace(self.limits, size_multiple=multiple)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            settings.encode_threads, thread_name_prefix="image-encode"
        )

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, request: WorkerRequest) -> None:
        request_id = request.request_id
        if request_id in self._queue or request_id in self._encoding:
            raise ValueError(f"request {request_id!r} is already active")
        if request.inputs:
            names = sorted(request.inputs)
            raise ValueError(f"an image request takes no input tensors; got {names}")
        try:
            params = self._generator().resolve(CONTRACT.decode_request(request.body))
            params.check(self.limits)
        except ValueError as exc:  # an ImageParamError, or a body that is no ImageParams
            # Answered on the next step with exactly this message (the runtime would prefix
            # the exception type to a raised one).
            self._refused.append(StageOutput(request_id, finished=True, error=str(exc)))
            return
        first = secrets.randbelow(MAX_SEED + 1) if params.seed is None else params.seed
        self._queue[request_id] = _Queued(
            request_id,
            params,
            BatchShape.of(params),
            tuple(first + k for k in range(params.n)),
            time.monotonic(),
        )
        self._arrivals += 1

    def has_work(self) -> bool:
        return bool(self._queue or self._refused or self._encoding)

    def stats(self) -> ImageStats:
        """Queued requests, images generated and pipeline calls: images per call is the batch
        size the stage achieves."""
        return ImageStats(
            requests_queued=len(self._queue),
            images_generated=self.images_generated,
            pipeline_calls=self.pipeline_calls,
        )

    def abort(self, request_id: str) -> None:
        self._queue.pop(request_id, None)
        self._refused = [o for o in self._refused if o.request_id != request_id]
        future = self._encoding.pop(request_id, None)
        if future is not None:
            future.cancel()  # a running encode finishes, and its result is dropped

    # -- work ---------------------------------------------------------------------------------

    def step(self) -> list[StageOutput]:
        outputs, self._refused = self._refused, []
        arrivals, self._arrivals = self._arrivals, 0
        batch = self._next_batch(arrivals)
        if batch:
            self._draw(batch)
        outputs += self._encoded(wait=not batch and not self._queue and not outputs)
        return outputs

    def _next_batch(self, arrivals: int) -> list[_Queued]:
        """The oldest request and the queued ones that can share its call; empty while a
        batch that is not full waits for more (`arrivals`: requests added since the last
        step; none means the burst, if any, is over)."""
        if not self._queue:
            return []
        first = next(iter(self._queue.values()))
        batch, pixels = [first], first.pixels
        for queued in list(self._queue.values())[1:]:
            if queued.shape == first.shape:
                if pixels + queued.pixels > self.settings.max_batch_pixels:
                    break
                batch.append(queued)
                pixels += queued.pixels
        full = pixels + first.shape.width * first.shape.height > self.settings.max_batch_pixels
        remaining = self.settings.batch_wait_ms / 1000 - (time.monotonic() - first.arrived)
        if not full and arrivals and remaining > 0:
            # Returning empty-handed lets the runtime take what arrived meanwhile.
            time.sleep(min(remaining, self.settings.arrival_gap_ms / 1000))
            return []
        for queued in batch:
            del self._queue[queued.request_id]
        return batch

    def _draw(self, batch: list[_Queued]) -> None:
        jobs = [
            ImageJob(queued.params.prompt, queued.params.negative_prompt, seed)
            for queued in batch
            for seed in queued.seeds
        ]
        self.pipeline_calls += 1
        try:
            pixels = self._generator().generate(batch[0].shape, jobs)
        except Exception as exc:  # a failing batch (out of memory) fails its requests only
            logger.exception("image batch of %d requests failed", len(batch))
            error = f"{GENERATION_FAILED}: {type(exc).__name__}: {exc}"
            for queued in batch:
                self._encoding[queued.request_id] = _done(
                    StageOutput(queued.request_id, finished=True, error=error)
                )
            return
        self.images_generated += len(jobs)
        assert self._executor is not None
        start = 0
        for queued in batch:
            count = len(queued.seeds)
            images = pixels[start : start + count]
            start += count
            self._encoding[queued.request_id] = self._executor.submit(
                self._encode, queued, images, len(jobs)
            )

    def _encode(self, queued: _Queued, images: torch.Tensor, batch_images: int) -> StageOutput:
        params = queued.params
        files = {
            image_tensor(k): image
            if params.output_format == "raw"
            else torch.frombuffer(
                bytearray(
                    encode_image(
                        image.numpy(),
                        params.output_format,
                        params.output_compression,
                        self.settings.png_compress_level,
                    )
                ),
                dtype=torch.uint8,
            )
            for k, image in enumerate(images)
        }
        return StageOutput(
            queued.request_id,
            tensors=files,
            reply=ImageReply(
                format=params.output_format,
                width=queued.shape.width,
                height=queued.shape.height,
                steps=queued.shape.steps,
                guidance_scale=queued.shape.guidance_scale,
                seeds=list(queued.seeds),
                batch_images=batch_images,
            ),
            finished=True,
        )

    def _encoded(self, wait: bool) -> list[StageOutput]:
        """Outputs of finished encodes; waits briefly for one when `wait` (nothing else to do,
        so the runtime would otherwise spin on `step`)."""
        if wait and self._encoding:
            concurrent.futures.wait(
                list(self._encoding.values()),
                timeout=_ENCODE_POLL_S,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )
        outputs = []
        for request_id, future in list(self._encoding.items()):
            if not future.done():
                continue
            del self._encoding[request_id]
            try:
                outputs.append(future.result())
            except Exception as exc:
                logger.exception("encoding the images of %s failed", request_id)
                outputs.append(
                    StageOutput(request_id, finished=True, error=f"encoding failed: {exc}")
                )
        return outputs

    def _generator(self) -> DiffusionImageGenerator:
        if self.generator is None:
            raise RuntimeError("the image worker was used before load()")
        return self.generator

    def close(self) -> None:
        self._queue.clear()
        self._encoding.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self.generator = None


def _done(output: StageOutput) -> concurrent.futures.Future[StageOutput]:
    future: concurrent.futures.Future[StageOutput] = concurrent.futures.Future()
    future.set_result(output)
    return future
