"""omni's greedy Whisper decoder gives transformers' `generate` token ids, token for token: on
tiny random-weight checkpoints (English-only and multilingual, timestamps on and off, a prompt,
a language given or detected, windows cut off by max_new_tokens and resumed) and on the real
tiny.en weights with espeak-ng clips."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fixtures_audio import converted_whisper_dir, espeak_samples, require_espeak
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from omni.speech.whisper_greedy import DecodeOptions, WhisperGreedyDecoder
from omni.speech.whisper_rules import WhisperRules, kept_tokens

# The random checkpoints' special tokens: end of text, start of transcript, previous-text
# marker, three languages, the two tasks, no-timestamps; timestamps from 511 on.
EOS, START, PREV, EN, FR, DE, TRANSCRIBE, TRANSLATE, NO_TIMESTAMPS = (
    500, 501, 502, 503, 504, 505, 506, 507, 510)
PROMPT = (PREV, 40, 41, 42)


def random_whisper(multilingual: bool, init_std: float, seed: int = 0) -> Any:
    """A two-layer Whisper with random weights and a 700-token vocabulary (189 timestamps)."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=700, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=START, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
        init_std=init_std, begin_suppress_tokens=None, suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config).eval()
    generation = GenerationConfig(
        decoder_start_token_id=START, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
        no_timestamps_token_id=NO_TIMESTAMPS, suppress_tokens=[1, 2, 7, PREV, TRANSLATE],
        begin_suppress_tokens=[5, EOS], is_multilingual=multilingual, max_length=64,
    )
    if multilingual:
        generation.lang_to_id = {"<|en|>": EN, "<|fr|>": FR, "<|de|>": DE}
        generation.task_to_id = {"transcribe": TRANSCRIBE, "translate": TRANSLATE}
    model.generation_config = generation
    return model


def reference(model: Any, features: torch.Tensor, options: DecodeOptions) -> list[list[int]]:
    """transformers' greedy `generate`, each row without its right padding."""
    kwargs: dict[str, Any] = {}
    if options.prompt_ids:
        kwargs["prompt_ids"] = torch.tensor(options.prompt_ids)
    if options.language:
        kwargs["language"] = options.language
    with torch.inference_mode():
        out = model.generate(features, do_sample=False, num_beams=1,
                             return_timestamps=options.return_timestamps,
                             max_new_tokens=options.max_new_tokens, **kwargs)
    rows = []
    for row in out.tolist():
        while row and row[-1] == model.generation_config.pad_token_id:
            row.pop()
        rows.append(row)
    return rows


def windows(count: int, mel_bins: int) -> torch.Tensor:
    """Random log-mel windows, each with speech for a different stretch and zeros after it (as
    the feature extractor pads shorter clips)."""
    torch.manual_seed(1)
    features = torch.randn(count, mel_bins, 3000)
    for index in range(count):
        features[index, :, 600 * (index + 1):] = 0.0
    return features


@pytest.mark.parametrize("init_std", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("timestamps", [True, False])
@pytest.mark.parametrize("prompt", [(), PROMPT])
def test_english_only_random_checkpoint_matches_generate(
    init_std: float, timestamps: bool, prompt: tuple[int, ...]
) -> None:
    model = random_whisper(False, init_std)
    features = windows(3, 16)
    decoder = WhisperGreedyDecoder(model)
    for max_new_tokens in (1, 6, 20):
        options = DecodeOptions(max_new_tokens, timestamps, prompt)
        expected = reference(model, features, options)
        assert decoder.generate(features, options) == expected
        assert all(expected)


def test_random_checkpoints_resume_cut_windows_as_generate_does() -> None:
    """With near-uniform logits every window ends in a cut-off pair of timestamps and is resumed
    from it, pass after pass: the joined tokens are generate's."""
    model = random_whisper(False, 0.02)
    features = windows(2, 16)
    options = DecodeOptions(20, True)
    got = WhisperGreedyDecoder(model).generate(features, options)
    assert got == reference(model, features, options)
    assert [len(row) for row in got] == [117, 117]  # six passes a window, not one


@pytest.mark.parametrize("language", ["", "fr", "de"])
@pytest.mark.parametrize("timestamps", [True, False])
def test_multilingual_random_checkpoint_matches_generate(language: str, timestamps: bool) -> None:
    """A language given becomes <|lang|><|transcribe|>; none given is detected window by window."""
    model = random_whisper(True, 0.3, seed=3)
    features = windows(3, 16)
    decoder = WhisperGreedyDecoder(model)
    for prompt in ((), PROMPT):
        options = DecodeOptions(12, timestamps, prompt, language)
        assert decoder.generate(features, options) == reference(model, features, options)


def test_opening_tokens_follow_generate() -> None:
    rules = WhisperRules.from_model(random_whisper(True, 0.3))
    assert rules.start_ids(True, FR, given=True) == [START, FR, TRANSCRIBE]
    assert rules.start_ids(False, DE, given=True) == [START, DE, TRANSCRIBE, NO_TIMESTAMPS]
    # A detected language adds no task (transformers adds "transcribe" only to a given one).
    assert rules.start_ids(True, DE, given=False) == [START, DE]
    assert rules.needs_language_detection("") and not rules.needs_language_detection("fr")
    english = WhisperRules.from_model(random_whisper(False, 0.3))
    assert english.start_ids(True, None, given=False) == [START]
    assert english.start_ids(False, None, given=False) == [START, NO_TIMESTAMPS]
    with pytest.raises(ValueError, match="English-only; it takes no language"):
        english.language_id("fr")
    with pytest.raises(ValueError, match="language 'xx' is not one this Whisper model knows"):
        rules.language_id("xx")


def test_kept_tokens_cut_after_the_last_pair() -> None:
    begin = 511
    # "ts text ts" ends the window; so does a pass with no pair.
    assert kept_tokens([511, 7, 520], begin) == ([511, 7, 520], None)
    assert kept_tokens([511, 7, 8], begin) == ([511, 7, 8], None)
    # A pair, then text cut off: keep up to the pair, resume at its first timestamp (2 frames
    # a timestamp step).
    assert kept_tokens([511, 7, 520, 520, 8, 9], begin) == ([511, 7, 520, 520], 18)
    # Ending in a pair is a cut too.
    assert kept_tokens([511, 7, 515, 515, 8, 530, 530], begin) == (
        [511, 7, 515, 515, 8, 530, 530], 38)


def test_prompt_and_budget_beyond_the_positions_are_refused() -> None:
    model = random_whisper(False, 0.3)
    decoder = WhisperGreedyDecoder(model)
    with pytest.raises(ValueError, match="the prompt and start tokens are 5 tokens and "
                                         "max_new_tokens is 60; together they exceed Whisper's "
                                         "64 positions"):
        decoder.generate(windows(1, 16), DecodeOptions(60, True, PROMPT))
    with pytest.raises(ValueError, match=r"features have shape \(16, 3000\)"):
        decoder.generate(windows(1, 16)[0], DecodeOptions(6, True))


@pytest.fixture(scope="module")
def tiny_en() -> tuple[Any, Any]:
    require_espeak()
    folder = converted_whisper_dir()
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    return model, WhisperProcessor.from_pretrained(folder)


def test_real_tiny_en_matches_generate_on_spoken_clips(tiny_en: tuple[Any, Any]) -> None:
    """Three clips of different lengths in one batch; timestamps on and off, a prompt, and a
    cut-off after four tokens."""
    model, processor = tiny_en
    clips = [espeak_samples(text) for text in (
        "What is the capital of France?", "Open the door.",
        "The quick brown fox jumps over the lazy dog near the river bank.")]
    features = torch.cat([
        processor.feature_extractor(clip, sampling_rate=16_000, return_tensors="pt").input_features
        for clip in clips
    ])
    prompt = tuple(int(t) for t in processor.tokenizer.get_prompt_ids("Capital cities.",
                                                                      return_tensors="np"))
    decoder = WhisperGreedyDecoder(model)
    for options in (DecodeOptions(440, True), DecodeOptions(440, False),
                    DecodeOptions(440, True, prompt), DecodeOptions(4, True)):
        assert decoder.generate(features, options) == reference(model, features, options)
    texts = processor.tokenizer.batch_decode(decoder.generate(features, DecodeOptions(440, True)),
                                             skip_special_tokens=True)
    assert [text.strip() for text in texts] == [
        "What is the capital of France?", "Open the door.",
        # tiny.en's own hearing of espeak-ng's voice, the same through generate.
        "The quick round fox jump over the lazy dog near the river bank.",
    ]
