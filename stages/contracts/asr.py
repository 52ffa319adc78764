"""The speech recognition stage (role "asr"): audio in, text out.

A request carries the tensor `AUDIO_INPUT`, float32 mono samples at `SAMPLE_RATE`, and the
body `TranscribeRequest`. The clip is heard in 30 s windows; as windows are done the stage
replies with `Transcript`s, each holding the text and timed segments of the windows it covers
(in order), the last one `finished`. Joined with spaces, the replies' texts are the clip's
text ("" for silence). A clip that is not float32, not 1-D, empty, too long or not finite, or a
language the model does not transcribe, is refused with an error naming the input.
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
Seconds = Annotated[float, msgspec.Meta(ge=0)]


class TranscribeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The request item the audio came from ("messages[0].content[1]"), named in a refusal.
    item: Annotated[str, msgspec.Meta(max_length=256)] = ""
    # Text the speech continues (OpenAI's `prompt`): names and spellings to prefer.
    prompt: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    # An ISO-639-1 code ("en"); "" lets the model decide (English-only models: English).
    language: Annotated[str, msgspec.Meta(max_length=32)] = ""


class Segment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Speech from `start` to `end` seconds of the clip."""

    start: Seconds
    end: Seconds
    text: str


class Transcript(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str
    segments: list[Segment] = []
    # Seconds of the clip this reply's windows cover, ending at `end_s`.
    end_s: Seconds = 0.0


class ASRStats(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Requests waiting or being heard, requests transcribed, the batches that did it
    # (requests_transcribed / batches is the batch size the stage achieves), 30 s windows
    # decoded, seconds of audio heard and seconds spent hearing it (their ratio is the
    # real-time factor).
    requests_queued: Count = 0
    requests_transcribed: Count = 0
    batches: Count = 0
    windows: Count = 0
    audio_seconds: Seconds = 0.0
    busy_seconds: Seconds = 0.0


CONTRACT: Contract[TranscribeRequest, Transcript, ASRStats] = Contract(
    ROLE, TranscribeRequest, Transcript, ASRStats
)
