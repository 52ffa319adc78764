"""Qwen2-Audio end to end in omni's pieces (prompt processor, audio encoder, LLM engine with
spliced embeddings): the prompt equals transformers' processor, the embeddings equal what
transformers splices, and greedy token ids equal transformers' generate, whether the prefix
cache and the encoder-output cache hit or miss; an item inside a prefix hit is not encoded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures_qwen2_audio import (
    AUDIO_TOKEN_ID,
    load_reference_audio,
    make_tiny_qwen2_audio,
    tone,
)
from omni.cache.encoder_cache import EncoderCache
from omni.stages.encoders.audio import AudioEncoder
from test_vl_engine import NEW_TOKENS, run, text, user

from omni import LLM
from omni.multimodal.encoding import complete_encoding, plan_encoding
from omni.multimodal.hashing import audio_item_hash
from omni.multimodal.qwen2_audio import Qwen2AudioPrompt, Qwen2AudioPromptProcessor

BLOCK = 8


def audio(seconds: float, frequency: float, seed: int) -> dict:
    return {"type": "audio", "audio": tone(seconds, frequency, seed)}


CASES = {
    "one clip": user(audio(1.3, 440.0, 1), text("What is said?")),
    "two clips of different lengths": user(
        audio(0.7, 220.0, 2), audio(2.1, 660.0, 3), text("Compare the two clips")
    ),
    "clip between two texts": user(text("Describe"), audio(1.0, 330.0, 4), text("briefly")),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("qwen2_audio"))


@pytest.fixture(scope="module")
def processor(folder: Path) -> Qwen2AudioPromptProcessor:
    return Qwen2AudioPromptProcessor.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def encoder(folder: Path) -> AudioEncoder:
    return AudioEncoder.from_pretrained(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(folder: Path) -> Any:
    model = load_reference_audio(folder)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def llm(folder: Path) -> LLM:
    return LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=128, block_size=BLOCK)


def reference_inputs(prompt: Qwen2AudioPrompt) -> dict[str, torch.Tensor]:
    features, lengths = prompt.encoder_inputs()
    ids = torch.tensor([prompt.prompt_token_ids])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": features,
        "feature_attention_mask": (torch.arange(features.shape[-1]) < lengths[:, None]).long(),
    }


def reference_tokens(reference: Any, prompt: Qwen2AudioPrompt) -> list[int]:
    inputs = reference_inputs(prompt)
    with torch.no_grad():
        out = reference.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt.prompt_token_ids) :].tolist()


def reference_embeddings(reference: Any, prompt: Qwen2AudioPrompt) -> torch.Tensor:
    """The audio rows transformers writes into the language model's input embeddings."""
    captured: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeds"] = kwargs["inputs_embeds"]

    inputs = reference_inputs(prompt)
    hook = reference.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            reference(**inputs)
    finally:
        hook.remove()
    return captured["embeds"][0][inputs["input_ids"][0] == AUDIO_TOKEN_ID]


class CountingEncoder:
    """Encodes an encoder request dict and counts the clips it was asked for."""

    def __init__(self, encoder: AudioEncoder) -> None:
        self.encoder = encoder
        self.clips: list[int] = []

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.clips.append(int(inputs["input_features"].shape[0]))
        return self.encoder.encode(inputs["input_features"], inputs["feature_lengths"])


def embeddings_for(
    prompt: Qwen2AudioPrompt, cached_tokens: int, encode: CountingEncoder, cache: EncoderCache
) -> list:
    plan = plan_encoding(prompt, cached_tokens, cache)
    encoded = encode(prompt.encoder_request(plan.to_encode)) if plan.to_encode else None
    return complete_encoding(prompt, plan, encoded, cache)


# ---- prompt processing --------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_equals_the_transformers_processor(
    folder: Path, processor: Qwen2AudioPromptProcessor, case: str
) -> None:
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(str(folder))
    messages = CASES[case]
    clips = [item["audio"] for item in messages[0]["content"] if item["type"] == "audio"]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = hf(text=rendered, audio=clips, sampling_rate=16000, return_tensors="pt")

    prompt = processor.prepare(messages=messages)
    assert prompt.prompt_token_ids == expected["input_ids"][0].tolist()
    features, lengths = prompt.encoder_inputs()
    assert torch.equal(features, expected["input_features"])
    assert lengths.tolist() == expected["feature_attention_mask"].sum(-1).tolist()
    # Each clip's run is where the processor put its <|AUDIO|> tokens, in order.
    ids = expected["input_ids"][0]
    positions = (ids == AUDIO_TOKEN_ID).nonzero().flatten().tolist()
    runs = [list(range(p.offset, p.offset + p.length)) for p in prompt.placeholders]
    assert [i for run in runs for i in run] == positions
    # A text prompt with one marker per clip gives the same ids.
    again = processor.prepare(prompt=rendered, audios=clips)
    assert again.prompt_token_ids == prompt.prompt_token_ids
    assert again.placeholders == prompt.placeholders


def test_prompt_placeholders_and_hashes(processor: Qwen2AudioPromptProcessor) -> None:
    prompt = processor.prepare(messages=CASES["two clips of different lengths"])
    # 0.7 s and 2.1 s: 70 and 210 valid mel frames, halved twice: 17 and 52 audio tokens.
    assert prompt.encoder_inputs()[1].tolist() == [70, 210]
    assert [p.length for p in prompt.placeholders] == [17, 52]
    first, second = prompt.placeholders
    assert first.item_hash != second.item_hash
    # The same samples hash the same; at another rate or other mel settings they do not.
    clip = tone(1.0, 440.0, 9)
    one = processor.prepare(prompt="<|AUDIO|>", audios=[clip]).placeholders[0].item_hash
    assert (
        processor.prepare(prompt="<|AUDIO|>", audios=[clip.copy()]).placeholders[0].item_hash == one
    )

    settings = processor.processor_settings
    assert audio_item_hash(clip, 16000, settings) == one
    assert audio_item_hash(clip, 8000, settings) != one
    assert audio_item_hash(clip, 16000, {**settings, "feature_size": 80}) != one


def test_prompt_errors_name_the_item_and_the_limit(processor: Qwen2AudioPromptProcessor) -> None:
    with pytest.raises(
        ValueError, match=r"audio 0 is 31\.00 seconds long; the limit is 30 seconds"
    ):
        processor.prepare(prompt="<|AUDIO|>", audios=[np.zeros(31 * 16000, np.float32)])
    with pytest.raises(ValueError, match="audio 0 has no samples"):
        processor.prepare(prompt="<|AUDIO|>", audios=[np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="audio 0 must be 1-D float mono samples"):
        processor.prepare(prompt="<|AUDIO|>", audios=[np.zeros((2, 100), np.float32)])
    with pytest.raises(ValueError, match="audio 0 has samples that are NaN"):
        processor.prepare(prompt="<|AUDIO|>", audios=[np.full(100, np.nan, np.float32)])
    with pytest.raises(
        ValueError,
        match=r"audio 0 is 320 samples at 16000 Hz, too short to yield an audio token; the "
        r"shortest clip is 321 samples \(20\.0625 ms\)",
    ):
        processor.prepare(prompt="<|AUDIO|>", audios=[np.zeros(320, np.float32)])
    with pytest.raises(ValueError, match="the prompt has 0 <\\|AUDIO\\|> markers for 1 audio"):
        processor.prepare(prompt="hello", audios=[tone(1.0, 440.0, 1)])
    with pytest.raises(ValueError, match="message 0 item 0: an audio item needs float32 mono"):
        processor.prepare(messages=user({"type": "audio", "audio": [0.0, 0.1]}))
    limited = Qwen2AudioPromptProcessor(
        processor.tokenizer, processor.feature_extractor, max_audios=1
    )
    with pytest.raises(ValueError, match="request has 2 audio clips; the limit is 1"):
        limited.prepare(messages=CASES["two clips of different lengths"])


# ---- the encoder --------------------------------------------------------------------------


def test_encoder_equals_the_embeddings_transformers_splices(
    processor: Qwen2AudioPromptProcessor, encoder: AudioEncoder, reference: Any
) -> None:
    prompt = processor.prepare(messages=CASES["two clips of different lengths"])
    expected = reference_embeddings(reference, prompt)
    assert expected.shape == (17 + 52, 64)
    torch.testing.assert_close(encoder.encode(*prompt.encoder_inputs()), expected)
    # Batched with another request's clip, each request's rows are unchanged.
    other = processor.prepare(messages=CASES["one clip"])
    both = encoder.encode_batch([other.encoder_inputs(), prompt.encoder_inputs()])
    torch.testing.assert_close(both[1], expected, rtol=0, atol=1e-5)
    assert both[0].shape == (other.placeholders[0].length, 64)


def test_encoder_rejects_malformed_inputs(encoder: AudioEncoder) -> None:
    features = torch.zeros(2, 128, 3000)
    with pytest.raises(ValueError, match=r"expected \[clips, 128, 3000\]"):
        encoder.check_inputs(features[:, :, :100], torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="one entry per clip of input_features \\(2\\)"):
        encoder.check_inputs(features, torch.tensor([10]))
    with pytest.raises(ValueError, match=r"clip 1 has 0 feature frames; it needs 1..3000"):
        encoder.check_inputs(features, torch.tensor([10, 0]))
    with pytest.raises(ValueError, match="input_features must be floating point"):
        encoder.check_inputs(features.long(), torch.tensor([10, 10]))


# ---- the engine against transformers --------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(
    processor: Qwen2AudioPromptProcessor,
    encoder: AudioEncoder,
    reference: Any,
    llm: LLM,
    case: str,
) -> None:
    prompt = processor.prepare(messages=CASES[case])
    expected = reference_tokens(reference, prompt)
    encode = CountingEncoder(encoder)
    cache = EncoderCache(max_bytes=1 << 20)
    clips = len(prompt.placeholders)

    # Only text before the first clip may be cached (other cases share the chat preamble):
    # every clip is encoded once and put into the encoder-output cache.
    before = llm.engine.cached_prefix_tokens(prompt.prompt_token_ids, prompt.placeholders)
    assert before <= prompt.placeholders[0].offset
    embeddings = embeddings_for(prompt, before, encode, cache)
    assert run(llm, f"{case}-miss", prompt, embeddings) == (expected, before)
    assert encode.clips == [clips] and len(cache) == clips

    # The encoder-output cache answers for every clip (asked as a replica without this prefix
    # would ask): no encoder pass, the same tokens.
    embeddings = embeddings_for(prompt, 0, encode, cache)
    assert encode.clips == [clips] and cache.hits == clips
    cached = (len(prompt.prompt_token_ids) - 1) // BLOCK * BLOCK
    assert run(llm, f"{case}-encoder-hit", prompt, embeddings) == (expected, cached)

    # The prefix cache covers every clip: none is encoded or even looked up.
    hit = llm.engine.cached_prefix_tokens(prompt.prompt_token_ids, prompt.placeholders)
    assert hit == cached
    assert prompt.items_to_encode(hit) == []
    fresh = CountingEncoder(encoder)
    skipped = embeddings_for(prompt, hit, fresh, EncoderCache(max_bytes=1 << 20))
    assert skipped == [None] * clips and fresh.clips == []
    assert run(llm, f"{case}-skip", prompt, skipped) == (expected, cached)
    assert llm.engine.kv_cache.num_free_blocks == 127


def test_a_clip_covered_by_a_prefix_hit_is_not_encoded(
    processor: Qwen2AudioPromptProcessor, encoder: AudioEncoder, reference: Any, llm: LLM
) -> None:
    """Two clips; a second request shares the first clip and its text, then differs: only the
    second clip is encoded, and the tokens still equal transformers'."""
    shared = [audio(0.7, 220.0, 20), text("and then")]
    first = processor.prepare(messages=user(*shared, audio(1.1, 550.0, 21)))
    second = processor.prepare(messages=user(*shared, audio(1.5, 770.0, 22)))
    encode = CountingEncoder(encoder)
    run(llm, "covered-first", first, embeddings_for(first, 0, encode, EncoderCache(1 << 20)))
    assert encode.clips == [2]

    hit = llm.engine.cached_prefix_tokens(second.prompt_token_ids, second.placeholders)
    covered = second.placeholders[0]
    assert covered.offset + covered.length <= hit < second.placeholders[1].offset + 1
    embeddings = embeddings_for(second, hit, encode, EncoderCache(1 << 20))
    assert encode.clips == [2, 1]  # only the new clip
    assert embeddings[0] is None and embeddings[1] is not None
    assert run(llm, "covered-second", second, embeddings) == (
        reference_tokens(reference, second),
        hit,
    )


def test_a_clip_repeated_in_one_prompt_is_encoded_once(
    processor: Qwen2AudioPromptProcessor, encoder: AudioEncoder
) -> None:
    clip = audio(0.9, 300.0, 30)
    prompt = processor.prepare(messages=user(clip, text("again"), clip))
    assert prompt.placeholders[0].item_hash == prompt.placeholders[1].item_hash
    encode = CountingEncoder(encoder)
    first, second = embeddings_for(prompt, 0, encode, EncoderCache(1 << 20))
    assert encode.clips == [1]
    assert first is not None and second is not None and torch.equal(first, second)


def test_two_clips_with_the_same_layout_never_share_blocks(
    processor: Qwen2AudioPromptProcessor, encoder: AudioEncoder, llm: LLM
) -> None:
    first = processor.prepare(messages=user(audio(1.0, 440.0, 40), text("hi")))
    second = processor.prepare(messages=user(audio(1.0, 440.0, 41), text("hi")))
    assert first.prompt_token_ids == second.prompt_token_ids
    assert first.placeholders[0].item_hash != second.placeholders[0].item_hash
    run(llm, "same-layout", first, first.split_embeddings(encoder.encode(*first.encoder_inputs())))
    # Only the text before the clip can be shared: blocks from the clip's start on differ.
    shared = llm.engine.cached_prefix_tokens(second.prompt_token_ids, second.placeholders)
    assert shared == first.placeholders[0].offset // BLOCK * BLOCK
