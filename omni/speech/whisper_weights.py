"""Map CTranslate2's Whisper arrays onto the parameter names of transformers' Whisper.

CTranslate2's converter fuses projections that transformers keeps apart: self-attention stores
q, k and v as one `linear_0` (rows q, then k, then v), cross-attention stores q as `linear_0`
and k, v as one `linear_1`; the output projection is the last `linear_*`. Whisper's key
projection has no bias, so CTranslate2 wrote zeros there; they are checked and dropped. The
output projection is tied to the token embedding (CTranslate2 stores it once, as an alias).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def ctranslate2_to_hf_whisper(
    variables: Mapping[str, np.ndarray], *, encoder_layers: int, decoder_layers: int
) -> dict[str, torch.Tensor]:
    """The `WhisperForConditionalGeneration` state dict (float32) from CTranslate2 arrays.

    ValueError if an expected array is missing, or if arrays are left over (a layout this
    mapping does not know, which would otherwise be silently ignored).
    """
    source = _Source(variables)
    state: dict[str, torch.Tensor] = {}

    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        state[f"{enc}.{conv}.weight"] = source.take(f"encoder/{conv}/weight")
        state[f"{enc}.{conv}.bias"] = source.take(f"encoder/{conv}/bias")
    state[f"{enc}.embed_positions.weight"] = source.take("encoder/position_encodings/encodings")
    for i in range(encoder_layers):
        ct, hf = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        _self_attention(source, f"{ct}/self_attention", f"{hf}.self_attn", state)
        _layer_norm(source, f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", state)
        _feed_forward(source, f"{ct}/ffn", hf, state)
    _layer_norm(source, "encoder/layer_norm", f"{enc}.layer_norm", state)

    state[f"{dec}.embed_tokens.weight"] = source.take("decoder/embeddings/weight")
    state[f"{dec}.embed_positions.weight"] = source.take("decoder/position_encodings/encodings")
    for i in range(decoder_layers):
        ct, hf = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        _self_attention(source, f"{ct}/self_attention", f"{hf}.self_attn", state)
        _layer_norm(source, f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", state)
        _cross_attention(source, f"{ct}/attention", f"{hf}.encoder_attn", state)
        _layer_norm(source, f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", state)
        _feed_forward(source, f"{ct}/ffn", hf, state)
    _layer_norm(source, "decoder/layer_norm", f"{dec}.layer_norm", state)

    projection = source.take("decoder/projection/weight")
    if not torch.equal(projection, state[f"{dec}.embed_tokens.weight"]):
        raise ValueError(
            "decoder/projection/weight differs from the token embedding; "
            "transformers' Whisper ties them"
        )
    # The same tensor object: the model's tied parameters stay one, and are saved once.
    state["proj_out.weight"] = state[f"{dec}.embed_tokens.weight"]
    source.check_all_taken()
    return state


def _self_attention(source: _Source, ct: str, hf: str, state: dict[str, torch.Tensor]) -> None:
    q, k, v = source.take(f"{ct}/linear_0/weight").chunk(3, dim=0)
    q_bias, k_bias, v_bias = source.take(f"{ct}/linear_0/bias").chunk(3, dim=0)
    _check_zero_key_bias(k_bias, f"{ct}/linear_0/bias")
    state.update({
        f"{hf}.q_proj.weight": q, f"{hf}.q_proj.bias": q_bias,
        f"{hf}.k_proj.weight": k,
        f"{hf}.v_proj.weight": v, f"{hf}.v_proj.bias": v_bias,
        f"{hf}.out_proj.weight": source.take(f"{ct}/linear_1/weight"),
        f"{hf}.out_proj.bias": source.take(f"{ct}/linear_1/bias"),
    })  # fmt: skip


def _cross_attention(source: _Source, ct: str, hf: str, state: dict[str, torch.Tensor]) -> None:
    k, v = source.take(f"{ct}/linear_1/weight").chunk(2, dim=0)
    k_bias, v_bias = source.take(f"{ct}/linear_1/bias").chunk(2, dim=0)
    _check_zero_key_bias(k_bias, f"{ct}/linear_1/bias")
    state.update({
        f"{hf}.q_proj.weight": source.take(f"{ct}/linear_0/weight"),
        f"{hf}.q_proj.bias": source.take(f"{ct}/linear_0/bias"),
        f"{hf}.k_proj.weight": k,
        f"{hf}.v_proj.weight": v, f"{hf}.v_proj.bias": v_bias,
        f"{hf}.out_proj.weight": source.take(f"{ct}/linear_2/weight"),
        f"{hf}.out_proj.bias": source.take(f"{ct}/linear_2/bias"),
    })  # fmt: skip


def _feed_forward(source: _Source, ct: str, hf: str, state: dict[str, torch.Tensor]) -> None:
    _layer_norm(source, f"{ct}/layer_norm", f"{hf}.final_layer_norm", state)
    for index, name in enumerate(("fc1", "fc2")):
        state[f"{hf}.{name}.weight"] = source.take(f"{ct}/linear_{index}/weight")
        state[f"{hf}.{name}.bias"] = source.take(f"{ct}/linear_{index}/bias")


def _layer_norm(source: _Source, ct: str, hf: str, state: dict[str, torch.Tensor]) -> None:
    state[f"{hf}.weight"] = source.take(f"{ct}/gamma")
    state[f"{hf}.bias"] = source.take(f"{ct}/beta")


def _check_zero_key_bias(bias: torch.Tensor, name: str) -> None:
    if bool(bias.any()):
        raise ValueError(
            f"{name}: the key part of the bias is not zero, but Whisper's key "
            "projection has no bias"
        )


# Scalars CTranslate2 stores beside the weights (activation id, pre-norm flag, head counts...).
# They describe the architecture, which the config carries, so they are not weights to map.
_METADATA_NAMES = frozenset({
    "activation", "alibi", "alignment_heads", "alignment_layer", "num_heads", "pre_norm",
    "scale_embeddings", "start_from_zero_embedding",
})  # fmt: skip


class _Source:
    """CTranslate2 arrays handed out once each, so leftovers can be reported."""

    def __init__(self, variables: Mapping[str, np.ndarray]) -> None:
        self._variables = variables
        self._taken: set[str] = set()

    def take(self, name: str) -> torch.Tensor:
        try:
            array = self._variables[name]
        except KeyError:
            raise ValueError(f"the CTranslate2 model has no variable {name!r}") from None
        self._taken.add(name)
        # A copy: the reader's arrays are read-only views of the file's bytes.
        return torch.tensor(np.asarray(array, dtype=np.float32))

    def check_all_taken(self) -> None:
        left = sorted(
            name
            for name in self._variables
            if name not in self._taken and name.rsplit("/", 1)[-1] not in _METADATA_NAMES
        )
        if left:
            raise ValueError(f"CTranslate2 variables not mapped to Whisper: {left[:8]}")
