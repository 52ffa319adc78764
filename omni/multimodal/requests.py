"""Routing one multi-modal request through the stages: probe, encode what is missing, generate.

1. Ask the LLM stage how many prompt tokens its prefix cache holds for this prompt and these
   item hashes (a probe touches nothing).
2. Send only the items whose placeholders end past that hit to a replica of the prompt's
   encoder role (`vision` for Qwen2-VL images, `audio` for Qwen2-Audio clips).
3. Send the prompt, the embeddings (None for the skipped items) and, for M-RoPE models, the
   rotary positions to the LLM stage, and return its reply stream.

With several LLM replicas the probe and the request may land on different replicas; then a
skipped item whose prefix the second replica lacks fails with a clear error (the engine checks
at admission) rather than producing wrong output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from omni.multimodal.prompt import MultiModalPrompt
from omni.stages.llm.wire import encode_llm_request
from omni.supervision.router import StageRouter
from omni.supervision.streams import AsyncReplyStream, ReplyStream


def items_to_encode(prompt: MultiModalPrompt, cached_tokens: int) -> list[int]:
    """Indices of the items whose placeholders are not wholly inside the cached prefix."""
    return prompt.items_to_encode(cached_tokens)


def probe_request(
    prompt: MultiModalPrompt, sampling: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    no_embeddings: list[torch.Tensor | None] = [None] * len(prompt.placeholders)
    return encode_llm_request(
        prompt.prompt_token_ids, sampling, prompt.to_multimodal_inputs(no_embeddings), probe=True
    )


def generation_request(
    prompt: MultiModalPrompt,
    sampling: Mapping[str, Any],
    needed: list[int],
    encoded: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LLM request with the encoder reply's rows split over the encoded items (None for
    the items inside the cached prefix)."""
    embeddings: list[torch.Tensor | None] = [None] * len(prompt.placeholders)
    if needed:
        assert encoded is not None
        for index, rows in zip(needed, prompt.split_embeddings(encoded, needed), strict=True):
            # The reply may map shared memory that is released once its stream is done.
            embeddings[index] = rows.clone()
    return encode_llm_request(
        prompt.prompt_token_ids, sampling, prompt.to_multimodal_inputs(embeddings)
    )


def submit_mm_request(
    router: StageRouter,
    prompt: MultiModalPrompt,
    sampling: Mapping[str, Any],
    *,
    timeout: float = 60.0,
    request_id: str | None = None,
) -> ReplyStream:
    [probe] = router.submit("llm", *probe_request(prompt, sampling)).result(timeout=timeout)
    needed = items_to_encode(prompt, int(probe.data["cached_tokens"]))
    encoded = None
    if needed:
        role, inputs = prompt.ENCODER_ROLE, prompt.encoder_request(needed)
        [reply] = router.submit(role, inputs).result(timeout=timeout)
        encoded = reply.tensors["embeddings"]
    tensors, params = generation_request(prompt, sampling, needed, encoded)
    return router.submit("llm", tensors, params, request_id=request_id)


async def submit_mm_request_async(
    router: StageRouter,
    prompt: MultiModalPrompt,
    sampling: Mapping[str, Any],
    *,
    timeout: float = 60.0,
) -> AsyncReplyStream:
    """`submit_mm_request` for asyncio callers (the HTTP server)."""
    probe_stream = router.submit_async("llm", *probe_request(prompt, sampling))
    [probe] = await probe_stream.result(timeout=timeout)
    needed = items_to_encode(prompt, int(probe.data["cached_tokens"]))
    encoded = None
    if needed:
        role, inputs = prompt.ENCODER_ROLE, prompt.encoder_request(needed)
        [reply] = await router.submit_async(role, inputs).result(timeout=timeout)
        encoded = reply.tensors["embeddings"]
    tensors, params = generation_request(prompt, sampling, needed, encoded)
    return router.submit_async("llm", tensors, params)
