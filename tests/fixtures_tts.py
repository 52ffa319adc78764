"""Tiny random text-to-speech checkpoints built on the spot: a VITS (MMS-TTS family) model with
a character tokenizer, and a SpeechT5 model with a sentencepiece tokenizer, a HiFi-GAN vocoder
and named speaker embeddings. No weights for either exist offline; the architecture paths are
what the tests check, against transformers on the same weights."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# Characters both tokenizers know: enough for the English test sentences.
ALPHABET = string.ascii_lowercase + " .,!?'-"


def make_tiny_vits(folder: Path, *, num_speakers: int = 1) -> Path:
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, **{ch: i + 2 for i, ch in enumerate(ALPHABET)}}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = VitsTokenizer(
        str(folder / "vocab.json"), language="eng", add_blank=True, phonemize=False
    )
    tokenizer.save_pretrained(folder)
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        flow_size=16,
        spectrogram_bins=17,
        upsample_initial_channel=16,
        upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        duration_predictor_filter_channels=16,
        duration_predictor_num_flows=1,
        prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        depth_separable_num_layers=1,
        num_speakers=num_speakers,
        speaker_embedding_size=8 if num_speakers > 1 else 0,
        sampling_rate=16_000,
    )
    torch.manual_seed(0)
    VitsModel(config).eval().save_pretrained(folder)
    return folder


def make_tiny_speecht5(folder: Path) -> Path:
    import sentencepiece
    from safetensors.torch import save_file
    from transformers import (
        SpeechT5Config,
        SpeechT5ForTextToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        SpeechT5Tokenizer,
    )

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([ALPHABET] * 4), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spm_char"),
        model_type="char",
        vocab_size=len(set(ALPHABET)) + 3,
        character_coverage=1.0,
        bos_id=-1,
        pad_id=1,
        unk_id=3,
        eos_id=2,
    )
    corpus.unlink()
    tokenizer = SpeechT5Tokenizer(str(folder / "spm_char.model"))
    tokenizer.save_pretrained(folder)
    config = SpeechT5Config(
        vocab_size=len(tokenizer) + 4,
        hidden_size=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        speech_decoder_prenet_units=16,
        speech_decoder_postnet_units=16,
        speech_decoder_postnet_layers=2,
        speaker_embedding_dim=8,
        num_mel_bins=8,
        reduction_factor=2,
        max_speech_positions=256,
        max_text_positions=256,
    )
    torch.manual_seed(0)
    SpeechT5ForTextToSpeech(config).eval().save_pretrained(folder)
    vocoder_config = SpeechT5HifiGanConfig(
        model_in_dim=8,
        upsample_initial_channel=16,
        upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        sampling_rate=16_000,
    )
    SpeechT5HifiGan(vocoder_config).eval().save_pretrained(folder / "vocoder")
    generator = torch.Generator().manual_seed(1)
    save_file(
        {
            "default": torch.randn(8, generator=generator),
            "bright": torch.randn(8, generator=generator),
        },
        str(folder / "speaker_embeddings.safetensors"),
    )
    return folder
