"""The audio encoder stage: Qwen2-Audio's audio tower and projector, batched across requests.

In process:

    encoder = AudioEncoder.from_pretrained(model_folder, device="cuda:0", dtype="auto")
    per_request = encoder.encode_batch([(input_features, feature_lengths), ...])

where `input_features` float `[clips, num_mel_bins, 3000]` are one request's clips as Whisper
log-mel features padded to the tower's 30-second window and `feature_lengths` int `[clips]`
are their valid frame counts (`Qwen2AudioPrompt.encoder_inputs()` from
`omni.multimodal.qwen2_audio`). Each result is that request's embeddings `[num_audio_tokens,
hidden]`, the clips in order: the rows to write over the request's `<|AUDIO|>` placeholder
tokens. They equal what transformers' `Qwen2AudioModel` splices in on the same inputs.

As a stage (role "audio", `omni stage audio --model FOLDER`): a request carries the same two
tensors as inputs `input_features` and `feature_lengths`; the reply is one finished output
with the tensor `embeddings`. Requests queued together run in one forward (clips stacked on the
batch dimension; each clip's padding is masked, so batching changes nothing), bounded by the
`max_batch_clips` option. Every clip costs the same, a full 30-second window, so the budget
counts clips.

The tower is transformers' own `Qwen2AudioEncoder` built from `config.audio_config`, and the
projector its `Qwen2AudioMultiModalProjector`; only the checkpoint's `audio_tower.*` and
`multi_modal_projector.*` tensors (or their `model.`-prefixed forms) are read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omni.stages.checkpoint import load_module, resolve_dtype, resolve_model_path
from omni.stages.encoders.batching import BatchingEncoderWorker, EncodeOne, Inputs
from omni.stages.runtime.worker import register_worker
from torch import nn

logger = logging.getLogger(__name__)

# Released Qwen2-Audio checkpoints (and transformers' save_pretrained) write `audio_tower.*`
# and `multi_modal_projector.*`; transformers 5's module layout puts `model.` in front.
AUDIO_TOWER_PREFIXES = ("model.audio_tower.", "audio_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
DEFAULT_MAX_BATCH_CLIPS = 32


@dataclass(frozen=True)
class AudioGeometry:
    """What input validation needs from the audio config."""

    num_mel_bins: int
    # The tower's fixed input window in mel frames: two per position, its conv2 has stride 2.
    num_frames: int

    @classmethod
    def from_config(cls, audio_config: Any) -> AudioGeometry:
        return cls(int(audio_config.num_mel_bins), 2 * int(audio_config.max_source_positions))


class AudioEncoder(EncodeOne):
    """Qwen2-Audio's tower and projector: log-mel features in, audio embeddings out."""

    def __init__(self, tower: nn.Module, projector: nn.Module, geometry: AudioGeometry) -> None:
        # Any: the tower's own helpers (`_get_feat_extract_output_lengths`) are untyped.
        self.tower: Any = tower
        self.projector = projector
        self.geometry = geometry
        parameter = next(tower.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    @classmethod
    def from_pretrained(
        cls, model: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"
    ) -> AudioEncoder:
        from transformers import AutoConfig
        from transformers.models.qwen2_audio.modeling_qwen2_audio import (
            Qwen2AudioEncoder,
            Qwen2AudioMultiModalProjector,
        )

        folder = resolve_model_path(model)
        config = AutoConfig.from_pretrained(folder)
        if config.model_type != "qwen2_audio":
            raise ValueError(
                f"{model!r} is a {config.model_type!r} model; the audio stage serves qwen2_audio"
            )
        torch_dtype = resolve_dtype(dtype, config)
        with torch.device(device):
            tower = Qwen2AudioEncoder._from_config(config.audio_config, dtype=torch_dtype)
            projector = Qwen2AudioMultiModalProjector(config).to(torch_dtype)
        load_module(tower, folder, AUDIO_TOWER_PREFIXES, "audio tower")
        load_module(projector, folder, PROJECTOR_PREFIXES, "audio projector")
        logger.info("loaded the Qwen2-Audio tower from %s (%s, %s)", folder, torch_dtype, device)
        return cls(tower, projector, AudioGeometry.from_config(config.audio_config))

    def check_inputs(self, input_features: torch.Tensor, feature_lengths: torch.Tensor) -> None:
        """ValueError naming what is wrong with one request's inputs."""
        mels, frames = self.geometry.num_mel_bins, self.geometry.num_frames
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != (mels, frames):
            raise ValueError(
                f"input_features has shape {tuple(input_features.shape)}; "
                f"expected [clips, {mels}, {frames}]"
            )
        if not input_features.is_floating_point():
            raise ValueError(f"input_features must be floating point, got {input_features.dtype}")
        clips = input_features.shape[0]
        if (
            feature_lengths.dim() != 1
            or feature_lengths.shape[0] != clips
            or clips < 1
            or feature_lengths.is_floating_point()
        ):
            raise ValueError(
                f"feature_lengths must be integer [clips] with one entry per clip of "
                f"input_features ({clips}), got {feature_lengths.dtype} "
                f"{tuple(feature_lengths.shape)}"
            )
        for index, length in enumerate(feature_lengths.tolist()):
            if not 1 <= length <= frames:
                raise ValueError(f"clip {index} has {length} feature frames; it needs 1..{frames}")

    def num_audio_tokens(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        """Embedding rows per clip: the tower's own output-length rule."""
        _, output_lengths = self.tower._get_feat_extract_output_lengths(feature_lengths)
        return output_lengths

    @torch.no_grad()
    def encode_batch(
        self, requests: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Embeddings `[num_audio_tokens, hidden]` per request, from one forward over all of
        them. Inputs must have passed `check_inputs`."""
        from transformers.masking_utils import create_bidirectional_mask

        if not requests:
            return []
        features = torch.cat([f for f, _ in requests]).to(self.device, self.dtype)
        lengths = torch.cat([n for _, n in requests]).to(self.device, torch.int64)
        # As Qwen2AudioModel does: after conv2 each clip attends only to its own valid
        # positions; the padded tail of the 30-second window is masked out.
        conv_lengths, output_lengths = self.tower._get_feat_extract_output_lengths(lengths)
        positions = (features.shape[-1] - 2) // 2 + 1
        valid = torch.arange(positions, device=self.device)[None, :] < conv_lengths[:, None]
        mask = create_bidirectional_mask(
            config=self.tower.config,
            inputs_embeds=torch.zeros(
                len(lengths), positions, 1, dtype=self.dtype, device=self.device
            ),
            attention_mask=valid.long(),
        )
        hidden = self.tower(features, attention_mask=mask).last_hidden_state
        embeddings = self.projector(hidden)
        clips = [embeddings[i, :n] for i, n in enumerate(output_lengths.tolist())]
        per_request: list[torch.Tensor] = []
        start = 0
        for features_of_request, _ in requests:
            count = features_of_request.shape[0]
            per_request.append(torch.cat(clips[start : start + count]))
            start += count
        return per_request


@register_worker("audio")
class AudioWorker(BatchingEncoderWorker):
    """The audio encoder behind the stage runtime. Options: `dtype` (auto, float32, bfloat16,
    float16) and `max_batch_clips` (clips per forward; a request with more still runs,
    alone)."""

    ENCODER_CLASS = AudioEncoder
    ROLE = "audio"
    MODEL_KIND = "a Qwen2-Audio folder"
    INPUT_NAMES = ("input_features", "feature_lengths")
    BUDGET_OPTION = "max_batch_clips"
    DEFAULT_BUDGET = DEFAULT_MAX_BATCH_CLIPS

    def cost(self, inputs: Inputs) -> int:
        return int(inputs["input_features"].shape[0])
