"""Routing one Qwen2-VL request through the stages: probe, encode what is missing, generate.

1. Ask the LLM stage how many prompt tokens its prefix cache holds for this prompt and these
   item hashes (a probe touches nothing).
2. Send only the images whose placeholders end past that hit to a vision replica.
3. Send the prompt, the embeddings (None for the skipped items) and the M-RoPE positions to the
   LLM stage, and return its reply stream.

With several LLM replicas the probe and the request may land on different replicas; then a
skipped item whose prefix the second replica lacks fails with a clear error (the engine checks
at admission) rather than producing wrong output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from omni.multimodal.qwen2_vl import Qwen2VLPrompt
from omni.stages.llm.wire import encode_llm_request
from omni.supervision.router import StageRouter
from omni.supervision.streams import AsyncReplyStream, ReplyStream


def items_to_encode(prompt: Qwen2VLPrompt, cached_tokens: int) -> list[int]:
    """Indices of the images whose placeholders are not wholly inside the cached prefix."""
    return [
        index
        for index, item in enumerate(prompt.placeholders)
        if item.offset + item.length > cached_tokens
    ]


def probe_request(
    prompt: Qwen2VLPrompt, sampling: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    no_embeddings: list[torch.Tensor | None] = [None] * len(prompt.images)
    return encode_llm_request(
        prompt.prompt_token_ids, sampling, prompt.to_multimodal_inputs(no_embeddings), probe=True
    )


def vision_request(prompt: Qwen2VLPrompt, needed: list[int]) -> dict[str, torch.Tensor]:
    pixel_values, grid_thw = prompt.encoder_inputs(needed)
    return {"pixel_values": pixel_values, "image_grid_thw": grid_thw}


def generation_request(
    prompt: Qwen2VLPrompt,
    sampling: Mapping[str, Any],
    needed: list[int],
    encoded: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LLM request with the vision reply's rows split over the encoded images (None for
    the images inside the cached prefix)."""
    embeddings: list[torch.Tensor | None] = [None] * len(prompt.images)
    if needed:
        assert encoded is not None
        lengths = [prompt.placeholders[i].length for i in needed]
        for index, rows in zip(needed, torch.split(encoded, lengths), strict=True):
            # The reply may map shared memory that is released once its stream is done.
            embeddings[index] = rows.clone()
    return encode_llm_request(
        prompt.prompt_token_ids, sampling, prompt.to_multimodal_inputs(embeddings)
    )


def submit_vl_request(
    router: StageRouter,
    prompt: Qwen2VLPrompt,
    sampling: Mapping[str, Any],
    *,
    timeout: float = 60.0,
    request_id: str | None = None,
) -> ReplyStream:
    [probe] = router.submit("llm", *probe_request(prompt, sampling)).result(timeout=timeout)
    needed = items_to_encode(prompt, int(probe.data["cached_tokens"]))
    encoded = None
    if needed:
        [reply] = router.submit("vision", vision_request(prompt, needed)).result(timeout=timeout)
        encoded = reply.tensors["embeddings"]
    tensors, params = generation_request(prompt, sampling, needed, encoded)
    return router.submit("llm", tensors, params, request_id=request_id)


async def submit_vl_request_async(
    router: StageRouter,
    prompt: Qwen2VLPrompt,
    sampling: Mapping[str, Any],
    *,
    timeout: float = 60.0,
) -> AsyncReplyStream:
    """`submit_vl_request` for asyncio callers (the HTTP server)."""
    probe_stream = router.submit_async("llm", *probe_request(prompt, sampling))
    [probe] = await probe_stream.result(timeout=timeout)
    needed = items_to_encode(prompt, int(probe.data["cached_tokens"]))
    encoded = None
    if needed:
        vision_stream = router.submit_async("vision", vision_request(prompt, needed))
        [reply] = await vision_stream.result(timeout=timeout)
        encoded = reply.tensors["embeddings"]
    tensors, params = generation_request(prompt, sampling, needed, encoded)
    return router.submit_async("llm", tensors, params)
