"""A tiny random-weight Qwen2-Audio checkpoint with tokenizer and processor, built offline.

`make_tiny_qwen2_audio(path)` writes config.json, safetensors (audio tower, projector and
language model, as transformers' save_pretrained writes them), a byte-level BPE tokenizer
carrying Qwen2-Audio's special tokens, a chat template that renders audio content items the
way Qwen2-Audio's does, and the Whisper feature extractor's config, so that transformers'
`Qwen2AudioForConditionalGeneration`, `Qwen2AudioProcessor` and omni's loaders all read the
same folder. Everything is seeded: the same call gives the same bytes.

Sizes: text hidden 64 (4 query / 2 KV heads), audio tower d_model 32 with 2 layers over the
real 128 mel bins and 1500 positions (the 30-second window the feature extractor pads to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fixtures_models import build_tokenizer, load_reference, save_random_model

AUDIO_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|AUDIO|>",
]
AUDIO_TOKEN_ID = 5
# Qwen2-Audio's chat template, reduced to what the tests use: text and audio content items.
AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{{ 'Audio ' + audio_count.value|string + ': <|audio_bos|><|AUDIO|><|audio_eos|>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "Audio 1: What is said in the clip? Describe the sound. A dog barks twice.",
    "Transcribe the speech. Compare the two clips and name the instrument.",
    "user assistant system: answer briefly. 0123456789",
] * 4
AUDIO_VOCAB_SIZE = 320
SAMPLING_RATE = 16000


def build_audio_tokenizer() -> Any:
    fast = build_tokenizer(
        AUDIO_VOCAB_SIZE, AUDIO_SPECIAL_TOKENS, AUDIO_CHAT_TEMPLATE, corpus=_CORPUS
    )
    ids = fast.convert_tokens_to_ids(AUDIO_SPECIAL_TOKENS)
    assert ids == list(range(len(AUDIO_SPECIAL_TOKENS))), ids
    return fast


def tiny_audio_config(vocab_size: int) -> Any:
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(
        audio_config={
            "d_model": 32,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "encoder_layers": 2,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "tie_word_embeddings": False,
        },
        audio_token_index=AUDIO_TOKEN_ID,
        architectures=["Qwen2AudioForConditionalGeneration"],
    )


def build_audio_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    return Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=AUDIO_CHAT_TEMPLATE,
    )


def make_tiny_qwen2_audio(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint, tokenizer and processor into `path`; returns the folder.

    Every parameter is random (norms near 1, the rest scaled noise), so a mis-mapped norm,
    bias, tower or projector weight shows up in the comparisons."""
    from transformers import Qwen2AudioForConditionalGeneration

    tokenizer = build_audio_tokenizer()
    config = tiny_audio_config(len(tokenizer))
    return save_random_model(
        path,
        lambda: Qwen2AudioForConditionalGeneration(config),
        build_audio_processor(tokenizer),
        seed,
    )


def load_reference_audio(folder: str | Path) -> Any:
    """transformers' model on the same folder, fp32, eager attention, eval mode."""
    from transformers import Qwen2AudioForConditionalGeneration

    return load_reference(Qwen2AudioForConditionalGeneration, folder)


def tone(seconds: float, frequency: float, seed: int) -> np.ndarray:
    """A deterministic synthetic clip at 16 kHz: a sine with a little seeded noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    wave = 0.5 * np.sin(2 * np.pi * frequency * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)
