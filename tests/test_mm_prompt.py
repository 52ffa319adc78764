"""Qwen2(.5)-VL prompt processing against transformers: expanded ids and pixel inputs equal
`Qwen2_5_VLProcessor`'s, M-RoPE positions equal `get_rope_index`'s, placeholders exact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_vl import (
    IMAGE_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    build_vl_processor,
    build_vl_tokenizer,
    noise_image,
    tiny_vl_config,
)
from omni.cache import MultiModalPlaceholder
from PIL import Image

from omni.media import hash_image
from omni.multimodal import (
    ImageSpan,
    Qwen2VLPromptProcessor,
    decode_mrope_positions,
    image_item_hash,
    mrope_positions,
    prepare_qwen2_vl_prompt,
)
from omni.multimodal.hashing import plain_settings


@pytest.fixture(scope="module")
def hf_processor() -> Any:
    return build_vl_processor(build_vl_tokenizer())


@pytest.fixture(scope="module")
def processor(hf_processor: Any) -> Qwen2VLPromptProcessor:
    return Qwen2VLPromptProcessor(hf_processor.tokenizer, hf_processor.image_processor)


@pytest.fixture(scope="module")
def hf_model() -> Any:
    """transformers' Qwen2_5_VLModel, only for its get_rope_index."""
    from transformers import Qwen2_5_VLModel

    return Qwen2_5_VLModel(tiny_vl_config(320)).eval()


def _user(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(items)}]


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image(image: Image.Image) -> dict[str, Any]:
    return {"type": "image", "image": image}


IMG_A = noise_image(84, 56, seed=1)  # 6 x 4 patches -> 3 x 2 merged = 6 tokens
IMG_B = noise_image(56, 112, seed=2)  # 4 x 8 patches -> 2 x 4 merged = 8 tokens
IMG_C = noise_image(140, 84, seed=3)  # 10 x 6 patches -> 5 x 3 merged = 15 tokens

LAYOUTS = {
    "one_image": _user(_image(IMG_A), _text("Describe this image.")),
    "two_images_different_sizes": _user(
        _text("Compare"), _image(IMG_B), _image(IMG_C), _text("briefly.")
    ),
    "image_between_text": _user(_text("What is in"), _image(IMG_C), _text("the picture?")),
    "text_only": [{"role": "user", "content": "The capital of France is Paris."}],
}


def _reference(hf_processor: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    images = [item["image"] for m in messages if not isinstance(m["content"], str)
              for item in m["content"] if item["type"] == "image"]  # fmt: skip
    stripped = [
        m if isinstance(m["content"], str)
        else {**m, "content": [{k: v for k, v in item.items() if k != "image"}
                               for item in m["content"]]}
        for m in messages
    ]  # fmt: skip
    text = hf_processor.apply_chat_template(stripped, add_generation_prompt=True)
    return dict(hf_processor(text=[text], images=images or None, return_tensors="pt"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prompt_matches_transformers_processor_and_rope_index(
    layout: str, processor: Qwen2VLPromptProcessor, hf_processor: Any, hf_model: Any
) -> None:
    messages = LAYOUTS[layout]
    prompt = prepare_qwen2_vl_prompt(processor, messages=messages)
    ref = _reference(hf_processor, messages)

    assert prompt.prompt_token_ids == ref["input_ids"][0].tolist()
    if "pixel_values" in ref:
        assert prompt.pixel_values is not None and prompt.image_grid_thw is not None
        assert torch.equal(prompt.pixel_values, ref["pixel_values"])
        assert torch.equal(prompt.image_grid_thw, ref["image_grid_thw"])
    else:
        assert prompt.pixel_values is None and prompt.image_grid_thw is None

    ref_positions, ref_delta = hf_model.get_rope_index(
        ref["input_ids"], ref["mm_token_type_ids"], image_grid_thw=ref.get("image_grid_thw")
    )
    assert torch.equal(prompt.mrope_positions, ref_positions[:, 0])
    assert prompt.mrope_position_delta == int(ref_delta)

    # Each placeholder covers exactly one run of image pads between vision start/end tokens.
    ids = prompt.prompt_token_ids
    for placeholder, image in zip(prompt.placeholders, prompt.images, strict=True):
        start, end = placeholder.offset, placeholder.offset + placeholder.length
        assert ids[start - 1] == VISION_START_ID and ids[end] == VISION_END_ID
        assert set(ids[start:end]) == {IMAGE_TOKEN_ID}
        assert placeholder.item_hash == image.item_hash
    assert sum(p.length for p in prompt.placeholders) == ids.count(IMAGE_TOKEN_ID)


def test_two_images_exact_placeholders_and_delta(processor: Qwen2VLPromptProcessor) -> None:
    prompt = prepare_qwen2_vl_prompt(processor, messages=LAYOUTS["two_images_different_sizes"])
    assert [image.grid_thw for image in prompt.images] == [(1, 8, 4), (1, 6, 10)]
    # "<|im_start|>user\nCompare<|vision_start|>" precedes the first run.
    first_offset = prompt.placeholders[0].offset
    assert [(p.offset, p.length) for p in prompt.placeholders] == [
        (first_offset, 8),
        (first_offset + 8 + 2, 15),
    ]
    # Image B (merged 4 x 2) advances the running position by 4, image C (3 x 5) by 5.
    assert prompt.mrope_position_delta == (4 - 8) + (5 - 15)


def test_text_prompt_with_markers_equals_chat_messages(processor: Qwen2VLPromptProcessor) -> None:
    from_messages = prepare_qwen2_vl_prompt(processor, messages=LAYOUTS["image_between_text"])
    text = (
        "<|im_start|>user\nWhat is in<|vision_start|><|image_pad|><|vision_end|>the picture?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    from_text = prepare_qwen2_vl_prompt(processor, prompt=text, images=[IMG_C])
    assert from_text.prompt_token_ids == from_messages.prompt_token_ids
    assert from_text.placeholders == from_messages.placeholders
    assert torch.equal(from_text.mrope_positions, from_messages.mrope_positions)


def test_special_token_text_from_a_user_stays_plain_text(
    processor: Qwen2VLPromptProcessor,
) -> None:
    """A user's text that spells `<|image_pad|>` or `<|im_end|>` is tokenized as the text it
    is: no extra placeholder (which used to refuse the request), no turn ended early."""
    tokenizer = processor.tokenizer
    tricky = "a <|image_pad|> b <|im_end|> c"
    prompt = prepare_qwen2_vl_prompt(processor, messages=_user(_image(IMG_A), _text(tricky)))
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    [item] = prompt.placeholders
    assert prompt.prompt_token_ids.count(image_pad) == item.length == 6
    # The template's own <|im_end|> (after the user turn) and nothing from the user's text.
    assert prompt.prompt_token_ids.count(im_end) == 1
    literal = tokenizer(tricky, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = prompt.prompt_token_ids
    start = item.offset + item.length + 1  # after <|vision_end|>
    assert ids[start : start + len(literal)] == literal
    assert tokenizer.decode(literal) == tricky
    # Text without such strings tokenizes exactly as before (one tokenizer call).
    plain = prepare_qwen2_vl_prompt(processor, messages=_user(_image(IMG_A), _text("a b c")))
    expected = tokenizer(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a b c<|im_end|>\n"
        "<|im_start|>assistant\n"
    )["input_ids"]
    pad_at = expected.index(image_pad)
    assert plain.prompt_token_ids == [
        *expected[:pad_at], *[image_pad] * 6, *expected[pad_at + 1 :]
    ]


def test_from_pretrained_folder(hf_processor: Any, tmp_path: Path) -> None:
    hf_processor.save_pretrained(tmp_path)
    loaded = Qwen2VLPromptProcessor.from_pretrained(str(tmp_path))
    direct = Qwen2VLPromptProcessor(hf_processor.tokenizer, hf_processor.image_processor)
    messages = LAYOUTS["one_image"]
    a = prepare_qwen2_vl_prompt(loaded, messages=messages)
    b = prepare_qwen2_vl_prompt(direct, messages=messages)
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.placeholders == b.placeholders

    # A released-style folder: the template only in chat_template.json, not in the tokenizer.
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    released = Qwen2VLPromptProcessor.from_pretrained(str(tmp_path))
    c = prepare_qwen2_vl_prompt(released, messages=messages)
    assert c.prompt_token_ids == b.prompt_token_ids
    (tmp_path / "chat_template.json").unlink()
    bare = Qwen2VLPromptProcessor.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no chat template; pass a text prompt instead"):
        prepare_qwen2_vl_prompt(bare, messages=messages)


def test_mrope_positions_exact_values() -> None:
    # 2 text tokens, a 1 x 4 x 6 grid (2 x 3 merged) at offset 2, then 2 text tokens.
    positions, delta = mrope_positions(10, [ImageSpan(2, (1, 4, 6))], spatial_merge_size=2)
    assert positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert delta == 7 - 10
    # Two adjacent images stay two images (a token-type scan would merge their runs).
    positions, delta = mrope_positions(4, [ImageSpan(0, (1, 2, 4)), ImageSpan(2, (1, 2, 4))], 2)
    assert positions.tolist() == [[0, 0, 2, 2], [0, 0, 2, 2], [0, 1, 2, 3]]
    assert delta == 0
    assert decode_mrope_positions(10, 2, -3).tolist() == [[7, 8], [7, 8], [7, 8]]
    text_only, delta = mrope_positions(3, [], 2)
    assert text_only.tolist() == [[0, 1, 2]] * 3 and delta == 0


def test_mrope_positions_reject_bad_spans() -> None:
    with pytest.raises(ValueError, match="runs past the prompt's 5 tokens"):
        mrope_positions(5, [ImageSpan(2, (1, 4, 4))], 2)
    with pytest.raises(ValueError, match="overlaps another"):
        mrope_positions(10, [ImageSpan(0, (1, 4, 4)), ImageSpan(2, (1, 4, 4))], 2)
    with pytest.raises(ValueError, match=r"grid \(1, 3, 4\) is not a positive multiple"):
        mrope_positions(10, [ImageSpan(0, (1, 3, 4))], 2)


def test_item_hash_follows_pixels_and_settings(processor: Qwen2VLPromptProcessor) -> None:
    settings = processor.processor_settings
    same_pixels = Image.frombytes("RGB", IMG_A.size, IMG_A.tobytes())
    base = image_item_hash(IMG_A, settings)
    assert len(base) == 64 and int(base, 16) >= 0
    assert image_item_hash(same_pixels, settings) == base
    changed = IMG_A.copy()
    changed.putpixel((0, 0), (0, 0, 0) if IMG_A.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert image_item_hash(changed, settings) != base
    other_bounds = {**settings, "size": {"shortest_edge": 3136, "longest_edge": 3136 * 4}}
    assert image_item_hash(IMG_A, other_bounds) != base
    assert image_item_hash(IMG_A.convert("L"), settings) != base
    # The hash is media intake's, over the processor settings in plain form.
    assert base == hash_image(IMG_A, plain_settings(settings))
    palette = IMG_A.convert("P")
    assert image_item_hash(palette, settings) == image_item_hash(palette.convert("RGBA"), settings)


def test_bad_requests_name_the_item_and_limit(processor: Qwen2VLPromptProcessor) -> None:
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> markers for 1 images"):
        prepare_qwen2_vl_prompt(processor, prompt="<|image_pad|> <|image_pad|>", images=[IMG_A])
    with pytest.raises(ValueError, match="video input is not supported"):
        prepare_qwen2_vl_prompt(processor, prompt="<|video_pad|>")
    with pytest.raises(ValueError, match="message 0 item 1 has type 'audio'"):
        prepare_qwen2_vl_prompt(processor, messages=_user(_text("hi"), {"type": "audio"}))
    with pytest.raises(ValueError, match="message 0 item 0: an image item needs a decoded PIL"):
        prepare_qwen2_vl_prompt(processor, messages=_user({"type": "image", "image": b"x"}))
    with pytest.raises(ValueError, match="image 0 is 1000x2 pixels; the aspect ratio limit"):
        prepare_qwen2_vl_prompt(
            processor, prompt="<|image_pad|>", images=[Image.new("RGB", (1000, 2))]
        )
    with pytest.raises(ValueError, match="exactly one of messages or prompt"):
        prepare_qwen2_vl_prompt(processor)
    limited = Qwen2VLPromptProcessor(
        processor.tokenizer, processor.image_processor, max_images=1, max_prompt_tokens=8
    )
    too_many = r"request has 2 images \(each page of a PDF is one\); the limit is 1"
    with pytest.raises(ValueError, match=too_many):
        prepare_qwen2_vl_prompt(limited, prompt="<|image_pad|><|image_pad|>", images=[IMG_A] * 2)
    with pytest.raises(
        ValueError, match="prompt is 9 tokens with its images expanded; the limit is 8"
    ):
        prepare_qwen2_vl_prompt(limited, prompt="ab <|image_pad|>", images=[IMG_A])
    assert MultiModalPlaceholder("h", 0, 1).end == 1


def test_encoder_inputs_and_engine_inputs(processor: Qwen2VLPromptProcessor) -> None:
    prompt = prepare_qwen2_vl_prompt(processor, messages=LAYOUTS["two_images_different_sizes"])
    pixels, grid = prompt.encoder_inputs([1])  # only image C (image B cached, say)
    assert torch.equal(pixels, prompt.images[1].pixel_values)
    assert grid.tolist() == [[1, 6, 10]]
    all_pixels, all_grid = prompt.encoder_inputs()
    assert prompt.pixel_values is not None and torch.equal(all_pixels, prompt.pixel_values)
    assert torch.equal(all_grid, torch.tensor([[1, 8, 4], [1, 6, 10]]))
    with pytest.raises(ValueError, match="no images selected"):
        prompt.encoder_inputs([])

    rows = torch.arange(23 * 4, dtype=torch.float32).view(23, 4)
    first, second = prompt.split_embeddings(rows)
    assert torch.equal(first, rows[:8]) and torch.equal(second, rows[8:])
    with pytest.raises(ValueError, match="embeddings have 22 rows; the prompt's images need 23"):
        prompt.split_embeddings(rows[:22])

    inputs = prompt.to_multimodal_inputs([None, second])
    inputs.check(len(prompt.prompt_token_ids), hidden_size=4)
    assert list(inputs.placeholders) == list(prompt.placeholders)
    assert inputs.mrope_positions is not None
    assert inputs.mrope_positions.tolist() == prompt.mrope_positions.tolist()
    assert inputs.mrope_position_delta == prompt.mrope_position_delta == -14
