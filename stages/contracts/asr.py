"""The speech recognition stage (role "asr"): audio in, text out.

A request carries the tensor `AUDIO_INPUT`, float32 mono samples at `SAMPLE_RATE`, and the
body `TranscribeRequest`. Its one reply is finished and is `Transcript`: the text heard ("" for
silence). A clip that is not float32, not 1-D, empty, too long or not finite is refused with an
error naming the input.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from omni.stages.contracts import Contract

ROLE = "asr"
AUDIO_INPUT = "audio"
# Whisper hears 16 kHz audio.
SAMPLE_RATE = 16_000

Count = Annotated[int, msgspec.Meta(ge=0)]


class TranscribeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The request item the audio came from ("messages[0].content[1]"), named in a refusal.
    item: Annotated[str, msgspec.Meta(max_length=256)] = ""


class Transcript(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str


class ASRStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Requests waiting for a batch, requests transcribed, and the batches that did it
    # (requests_transcribed / batches is the batch size the stage achieves).
    requests_queued: Count = 0
    requests_transcribed: Count = 0
    batches: Count = 0


CONTRACT: Contract[TranscribeRequest, Transcript, ASRStats] = Contract(
    ROLE, TranscribeRequest, Transcript, ASRStats
)
