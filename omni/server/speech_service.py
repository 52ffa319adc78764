"""The speech stage as the API process sees it: which voice model it serves, requests checked
at the edge, and its replies (or failures) turned into audio (or OpenAI errors).

Shared by `POST /v1/audio/speech` (`omni.server.speech`) and chat completions with audio output
(`omni.server.speech_chat`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import numpy as np

from omni.server.protocol import APIError, model_not_found
from omni.server.stage_calls import stage_replies
from omni.speech.audio_format import SUPPORTED_FORMATS
from omni.speech.espeak import ESPEAK_NAME
from omni.stages.contracts.speech import (
    AUDIO_OUTPUT,
    CONTRACT,
    ROLE,
    SpeechParamError,
    SpeechParams,
)
from omni.supervision.router import StageRouter
from omni.supervision.streams import (
    NoReplicaError,
    ReplicaLostError,
    StageFailure,
    StageRequestError,
)

if TYPE_CHECKING:
    from omni.server.config import ServeConfig
    from omni.supervision.streams import Reply

logger = logging.getLogger(__name__)

# OpenAI's audio is 24 kHz (its `pcm` is defined so), so every HTTP answer is resampled to it.
HTTP_SAMPLE_RATE = 24_000
# OpenAI's speech model names: OpenAI clients send them, and they mean "the voice model".
OPENAI_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# The fields a refusal may start with (and so name as OpenAI's `param`).
_PARAMS = SpeechParams.__struct_fields__


def speech_stage_model(config: ServeConfig) -> str | None:
    """What the speech stage serves: `--speech-model`, else "" (the default voice) when
    espeak-ng is installed; None for no speech stage."""
    if not config.speech:
        return None
    if config.speech_model is not None:
        return config.speech_model
    if shutil.which(ESPEAK_NAME) is None:
        logger.warning(
            "espeak-ng is not installed: no speech stage, so audio output is not served "
            "(install espeak-ng or pass --speech-model)"
        )
        return None
    return ""


class SpeechService:
    """Sends speech requests to the stage and reads its replies."""

    def __init__(self, router: StageRouter, model: str) -> None:
        self.router = router
        self.model = model
        # What clients call it; OpenAI's model names are accepted too.
        self.model_name = model or ESPEAK_NAME

    def check_model(self, requested: str | None) -> None:
        if requested is None or requested in (self.model_name, *OPENAI_TTS_MODELS):
            return
        raise model_not_found(
            requested,
            f"speaks with {self.model_name!r} (OpenAI's names {', '.join(OPENAI_TTS_MODELS)} "
            "mean it too)",
        )

    def params(
        self,
        input: str,
        voice: str | None = None,
        response_format: str | None = None,
        speed: float = 1.0,
        seed: int = 0,
    ) -> SpeechParams:
        """Checked settings at HTTP's 24 kHz; APIError(400) naming the field otherwise."""
        params = SpeechParams(
            input=input,
            voice=voice,
            response_format=response_format,
            speed=speed,
            seed=seed,
            sample_rate=HTTP_SAMPLE_RATE,
        )
        try:
            params.check(formats=SUPPORTED_FORMATS)
        except SpeechParamError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        return params

    async def check_voice(self, voice: str | None, speed: float = 1.0) -> None:
        """Ask the stage whether it has `voice` and can speak at `speed` (before an LLM runs,
        so a bad voice is a 400 rather than an error half way through a stream)."""
        async for _ in self.replies(SpeechParams(voice=voice or None, speed=speed, describe=True)):
            pass

    def replies(self, params: SpeechParams) -> AsyncGenerator[Reply, None]:
        """The stage's replies, one per sentence; stage failures as APIErrors. Closing the
        iterator early (a client that left) aborts the request in the stage."""
        return stage_replies(self.router, ROLE, CONTRACT.encode(params), stage_error)

    async def samples(self, params: SpeechParams) -> AsyncGenerator[tuple[np.ndarray, Reply], None]:
        """Each sentence's float32 samples at `params.sample_rate`, as the stage sends them."""
        async for reply in self.replies(params):
            yield reply.tensors[AUDIO_OUTPUT].numpy(), reply


def stage_error(exc: StageFailure) -> APIError:
    """The stage's refusal in its own words (which name the item and its limit) as a 400; a
    lost or missing replica as a 503."""
    if isinstance(exc, StageRequestError):
        message = exc.stage_message
        word = message.split(" ", 1)[0]
        return APIError(400, message, param=word if word in _PARAMS else None)
    if isinstance(exc, ReplicaLostError | NoReplicaError):
        return APIError(503, str(exc), "service_unavailable")
    return APIError(500, str(exc), "internal_error")
