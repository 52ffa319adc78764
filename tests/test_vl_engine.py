"""Qwen2.5-VL end to end in omni's pieces (prompt processor, vision encoder, LLM engine with
M-RoPE and spliced embeddings): greedy token ids equal transformers' generate, whether the
prefix cache and the skipped-encoder path hit or miss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_vl import load_reference_vl, make_tiny_qwen2_5_vl, noise_image
from omni.stages.encoders.vision import VisionEncoder

from omni import LLM, SamplingParams
from omni.multimodal import Qwen2VLPrompt, Qwen2VLPromptProcessor, prepare_qwen2_vl_prompt

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def user(*items: dict) -> list[dict]:
    return [{"role": "user", "content": list(items)}]


def image(width: int, height: int, seed: int) -> dict:
    return {"type": "image", "image": noise_image(width, height, seed)}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


CASES = {
    "one image": user(image(56, 56, 1), text("what is this")),
    "two images of different sizes": user(image(56, 56, 2), image(84, 56, 3), text("compare")),
    "image between two texts": user(text("look at"), image(56, 84, 4), text("and describe it")),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def parts(folder: Path) -> tuple[Qwen2VLPromptProcessor, VisionEncoder, LLM]:
    processor = Qwen2VLPromptProcessor.from_pretrained(str(folder))
    encoder = VisionEncoder.from_pretrained(str(folder), device="cpu", dtype="float32")
    llm = LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=128, block_size=8)
    return processor, encoder, llm


def reference(folder: Path, prompt: Qwen2VLPrompt) -> list[int]:
    model = load_reference_vl(folder)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt.prompt_token_ids])
    # transformers 5 derives M-RoPE positions from the token types its processor returns;
    # without them it silently falls back to text positions.
    image_token = model.config.image_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == image_token).int(),
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def run(
    llm: LLM, request_id: str, prompt: Qwen2VLPrompt, embeddings: list
) -> tuple[list[int], int]:
    engine = llm.engine
    mm = prompt.to_multimodal_inputs(embeddings)
    engine.add_request(request_id, prompt.prompt_token_ids, GREEDY, mm=mm, stream=False)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    [output] = outputs
    assert output.error is None
    return output.outputs[0].token_ids, output.num_cached_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(folder: Path, parts, case: str) -> None:
    processor, encoder, llm = parts
    prompt = prepare_qwen2_vl_prompt(processor, messages=CASES[case])
    expected = reference(folder, prompt)

    embeddings = prompt.split_embeddings(encoder.encode(prompt.pixel_values, prompt.image_grid_thw))
    assert run(llm, f"{case}-miss", prompt, embeddings) == (expected, 0)

    # Again: the prefix cache serves every full block but the last prompt token's.
    cached = (len(prompt.prompt_token_ids) - 1) // 8 * 8
    assert run(llm, f"{case}-hit", prompt, embeddings) == (expected, cached)

    # The orchestrator's path: items inside the cached prefix are not encoded at all.
    hit = llm.engine.cached_prefix_tokens(prompt.prompt_token_ids, prompt.placeholders)
    assert hit == cached
    needed = [p.offset + p.length > hit for p in prompt.placeholders]
    skipped = [e if need else None for e, need in zip(embeddings, needed, strict=True)]
    assert run(llm, f"{case}-skip", prompt, skipped) == (expected, cached)
    assert llm.engine.kv_cache.num_free_blocks == 127


def test_two_images_with_the_same_layout_never_share_blocks(parts) -> None:
    processor, encoder, llm = parts
    first = prepare_qwen2_vl_prompt(processor, messages=user(image(56, 56, 10), text("hi")))
    second = prepare_qwen2_vl_prompt(processor, messages=user(image(56, 56, 11), text("hi")))
    assert first.prompt_token_ids == second.prompt_token_ids
    assert first.placeholders[0].item_hash != second.placeholders[0].item_hash
    emb = first.split_embeddings(encoder.encode(first.pixel_values, first.image_grid_thw))
    run(llm, "first-image", first, emb)
    # Only the text before the image can be shared: blocks from the image's start on differ.
    image_start = first.placeholders[0].offset
    shared = llm.engine.cached_prefix_tokens(second.prompt_token_ids, second.placeholders)
    assert shared == image_start // 8 * 8
