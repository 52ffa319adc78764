"""The audio stage (role "audio"): clips' features in, embeddings out (Qwen2-Audio tower).

A request carries the tensors `INPUT_FEATURES` (float `[clips, mel bins, frames]`) and
`FEATURE_LENGTHS` (int `[clips]`), made by the model's feature extractor from decoded clips;
its body is `EncodeClips`. The reply is `encoder.EncodeReply` with `encoder.EMBEDDINGS`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from omni.stages.contracts import Contract
from omni.stages.contracts.encoder import EncodeReply, EncoderStats

ROLE = "audio"
INPUT_FEATURES = "input_features"
FEATURE_LENGTHS = "feature_lengths"


class EncodeClips(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The request item it came from, named in every refusal.
    item: Annotated[str, msgspec.Meta(max_length=256)] = ""


CONTRACT: Contract[EncodeClips, EncodeReply, EncoderStats] = Contract(
    ROLE, EncodeClips, EncodeReply, EncoderStats
)
