"""The LLM stage's request for one prompt, media items included: one request, one hop.

Each media item travels as its placeholder run and content hash, plus its request to its
encoder stage (an image's file as the client sent it; a clip's features). The LLM stage looks
at its own prefix cache and encoder-output cache at admission and sends on to an encoder only
the items it lacks; the embeddings then go from the encoder to the LLM stage, never through
the API process.

    tensors, body = llm_request(prompt.prompt_token_ids, sampling, prompt)
    stream = router.submit(llm.ROLE, tensors, body)
"""

from __future__ import annotations

import torch

from omni.multimodal.prompt import MultiModalPrompt
from omni.stages.contracts import llm
from omni.stages.contracts.sampling import SamplingParams
from omni.supervision.router import StageRouter
from omni.supervision.streams import ReplyStream


def llm_request(
    prompt_token_ids: list[int],
    sampling: SamplingParams,
    mm_prompt: MultiModalPrompt | None = None,
    cache_salt: str | None = None,
) -> tuple[dict[str, torch.Tensor], bytes]:
    """(tensors, body) of the LLM stage's `GenerateRequest`."""
    tensors: dict[str, torch.Tensor] = {}
    items: list[llm.MediaItem] = []
    if mm_prompt is not None:
        for index, (placeholder, encoder) in enumerate(
            zip(mm_prompt.placeholders, mm_prompt.encoder_items(), strict=True)
        ):
            items.append(
                llm.MediaItem(
                    item_hash=placeholder.item_hash,
                    offset=placeholder.offset,
                    length=placeholder.length,
                    encoder_role=encoder.role,
                    encoder_body=encoder.body,
                )
            )
            for name, tensor in encoder.tensors.items():
                tensors[llm.item_tensor(index, name)] = tensor
        mrope = mm_prompt.mrope_tensor()
        if mrope is not None:
            tensors[llm.MROPE_POSITIONS] = mrope
    request = llm.GenerateRequest(
        prompt_token_ids=prompt_token_ids,
        sampling=sampling,
        cache_salt=cache_salt,
        mm_items=items,
        mrope_position_delta=0 if mm_prompt is None else mm_prompt.mrope_delta(),
    )
    return tensors, llm.CONTRACT.encode(request)


def submit_mm_request(
    router: StageRouter,
    prompt: MultiModalPrompt,
    sampling: SamplingParams,
    *,
    request_id: str | None = None,
) -> ReplyStream:
    """Send one multi-modal prompt to the LLM stage (threads' callers: tests, benchmarks)."""
    tensors, body = llm_request(prompt.prompt_token_ids, sampling, prompt)
    return router.submit(llm.ROLE, tensors, body, request_id=request_id)
