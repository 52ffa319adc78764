"""Routing one multi-modal request through the stages: probe, encode what is missing, generate.

1. Ask the LLM stage how many prompt tokens its prefix cache holds for this prompt and these
   item hashes (a probe touches nothing).
2. Send only the items whose placeholders end past that hit, and that the encoder-output
   cache (when one is given) does not hold, to a replica of the prompt's encoder role
   (`vision` for Qwen2-VL images, `audio` for Qwen2-Audio clips); see `encoding.py`.
3. Send the prompt, the embeddings (None for the skipped items) and, for M-RoPE models, the
   rotary positions to the LLM stage, and return its reply stream.

With several LLM replicas the probe and the request may land on different replicas; then a
skipped item whose prefix the second replica lacks fails with a clear error (the engine checks
at admission) rather than producing wrong output.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import torch

from omni.cache.encoder_cache import EncoderCache
from omni.multimodal.encoding import complete_encoding, plan_encoding
from omni.multimodal.prompt import MultiModalPrompt
from omni.stages.llm.wire import encode_llm_request
from omni.supervision.router import StageRouter
from omni.supervision.streams import AsyncReplyStream, ReplyStream


def probe_request(
    prompt: MultiModalPrompt, sampling: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    no_embeddings: list[torch.Tensor | None] = [None] * len(prompt.placeholders)
    return encode_llm_request(
        prompt.prompt_token_ids, sampling, prompt.to_multimodal_inputs(no_embeddings), probe=True
    )


def submit_mm_request(
    router: StageRouter,
    prompt: MultiModalPrompt,
    sampling: Mapping[str, Any],
    *,
    encoder_cache: EncoderCache | None = None,
    timeout: float = 60.0,
    request_id: str | None = None,
) -> ReplyStream:
    [probe] = router.submit("llm", *probe_request(prompt, sampling)).result(timeout=timeout)
    plan = plan_encoding(prompt, int(probe.data["cached_tokens"]), encoder_cache)
    encoded = None
    if plan.to_encode:
        inputs = prompt.encoder_request(plan.to_encode)
        [reply] = router.submit(prompt.ENCODER_ROLE, inputs).result(timeout=timeout)
        encoded = reply.tensors["embeddings"]
    embeddings = complete_encoding(prompt, plan, encoded, encoder_cache)
    tensors, params = generation_request(prompt, sampling, embeddings)
    return router.submit("llm", tensors, params, request_id=request_id)


async def submit_mm_request_async(
    router: StageRouter,
    prompt: MultiModalPrompt,
    sampling: Mapping[str, Any],
    *,
    encoder_cache: EncoderCache | None = None,
    timeout: float = 60.0,
) -> AsyncReplyStream:
    """`submit_mm_request` for asyncio callers (the HTTP server)."""
    probe_stream = router.submit_async("llm", *probe_request(prompt, sampling))
    [probe] = await probe_stream.result(timeout=timeout)
    plan = plan_encoding(prompt, int(probe.data["cached_tokens"]), encoder_cache)
    encoded = None
    if plan.to_encode:
        # Pixels and features are made here, for the items that need them (image resizing and
        # normalising is milliseconds of CPU each): off the event loop, which serves everyone.
        inputs = await asyncio.to_thread(prompt.encoder_request, plan.to_encode)
        [reply] = await router.submit_async(prompt.ENCODER_ROLE, inputs).result(timeout=timeout)
        encoded = reply.tensors["embeddings"]
    embeddings = complete_encoding(prompt, plan, encoded, encoder_cache)
    tensors, params = generation_request(prompt, sampling, embeddings)
    return router.submit_async("llm", tensors, params)


def generation_request(
    prompt: MultiModalPrompt,
    sampling: Mapping[str, Any],
    embeddings: list[torch.Tensor | None],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LLM request with each item's embeddings (None for prefix-cached items)."""
    return encode_llm_request(
        prompt.prompt_token_ids, sampling, prompt.to_multimodal_inputs(embeddings)
    )
