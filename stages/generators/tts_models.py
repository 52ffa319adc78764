"""transformers text-to-speech models as `Synthesizer`s: VITS (the MMS-TTS family) and
SpeechT5 with its HiFi-GAN vocoder, loaded with `from_pretrained` from a folder or a hub id.

Both models sample (VITS draws its latent noise and durations, SpeechT5's decoder pre-net keeps
dropout on at inference, as Tacotron does), so each sentence seeds torch's generator first: the
same text and seed give the same audio, equal to a direct transformers call after
`torch.manual_seed(seed)`.

SpeechT5 speaks with a speaker embedding (a 512-value x-vector for the released checkpoints).
Its voices are the named tensors of `speaker_embeddings.safetensors` in the model folder (or the
file given by the `speaker_embeddings` option): safetensors, never a pickle. Its vocoder is the
folder's `vocoder/` subfolder, or the `vocoder` option (a folder or hub id such as
`microsoft/speecht5_hifigan`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from omni.speech.espeak import ESPEAK_NAME, EspeakSynthesizer
from omni.speech.synthesizer import Synthesizer

DEFAULT_VOICE = "default"
SPEAKER_EMBEDDINGS_FILE = "speaker_embeddings.safetensors"
VOCODER_SUBFOLDER = "vocoder"


def load_synthesizer(
    model: str, device: str = "cpu", options: Mapping[str, str] | None = None
) -> Synthesizer:
    """The voice model `model` names: "" or "espeak-ng" for the embedded default voice, else a
    VITS or SpeechT5 checkpoint (folder or hub id)."""
    options = dict(options or {})
    if model in ("", ESPEAK_NAME):
        _no_options(options, ESPEAK_NAME)
        return EspeakSynthesizer()
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model).model_type
    if model_type == "vits":
        _no_options(options, "VITS")
        return VitsSynthesizer(model, device)
    if model_type == "speecht5":
        vocoder = options.pop("vocoder", None)
        embeddings = options.pop("speaker_embeddings", None)
        _no_options(options, "SpeechT5")
        return SpeechT5Synthesizer(model, device, vocoder=vocoder, speaker_embeddings=embeddings)
    raise ValueError(
        f"model {model!r} is a {model_type!r} model; the speech stage serves 'vits' (MMS-TTS) "
        "and 'speecht5' checkpoints, or the default voice (espeak-ng)"
    )


def _no_options(options: Mapping[str, str], what: str) -> None:
    if options:
        raise ValueError(f"unknown option(s) {sorted(options)} for a {what} voice model")


class VitsSynthesizer(Synthesizer):
    """`VitsModel` with its tokenizer. Voices: "default", and "speaker-N" for a model trained
    on several speakers. `speed` is VITS's own speaking rate (durations divided by it)."""

    def __init__(self, model: str, device: str = "cpu") -> None:
        from transformers import AutoTokenizer, VitsModel

        self.name = model
        self.device = torch.device(device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model)
        loaded: Any = VitsModel.from_pretrained(model)
        self.model = loaded.to(self.device).eval()
        self.sample_rate = int(self.model.config.sampling_rate)
        speakers = int(self.model.config.num_speakers)
        extra = tuple(f"speaker-{i}" for i in range(speakers)) if speakers > 1 else ()
        self.voices = (DEFAULT_VOICE, *extra)
        self.default_voice = DEFAULT_VOICE

    @torch.inference_mode()
    def synthesize(self, text: str, voice: str, speed: float, seed: int) -> np.ndarray:
        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        if inputs["input_ids"].shape[-1] == 0:
            raise ValueError(f"input: {text!r} has no characters this voice model can speak")
        speaker_id = None if voice == DEFAULT_VOICE else int(voice.removeprefix("speaker-"))
        torch.manual_seed(seed)
        waveform = self.model(**inputs, speaker_id=speaker_id, speaking_rate=speed).waveform
        return waveform[0].float().cpu().numpy()


class SpeechT5Synthesizer(Synthesizer):
    """`SpeechT5ForTextToSpeech` + `SpeechT5HifiGan`; one voice per speaker embedding. It has
    no speaking-rate control, so only speed 1.0 is accepted."""

    speed_range = (1.0, 1.0)

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        vocoder: str | None = None,
        speaker_embeddings: str | None = None,
    ) -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, SpeechT5ForTextToSpeech, SpeechT5HifiGan

        self.name = model
        self.device = torch.device(device)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model)
        loaded: Any = SpeechT5ForTextToSpeech.from_pretrained(model)
        self.model = loaded.to(self.device).eval()
        vocoder = vocoder or _local_path(model, VOCODER_SUBFOLDER, "the vocoder option")
        loaded_vocoder: Any = SpeechT5HifiGan.from_pretrained(vocoder)
        self.vocoder = loaded_vocoder.to(self.device).eval()
        self.sample_rate = int(self.vocoder.config.sampling_rate)
        path = speaker_embeddings or _local_path(
            model, SPEAKER_EMBEDDINGS_FILE, "the speaker_embeddings option"
        )
        width = int(self.model.config.speaker_embedding_dim)
        self.embeddings: dict[str, torch.Tensor] = {}
        for name, tensor in sorted(load_file(path).items()):
            if tensor.shape != (width,):
                raise ValueError(
                    f"{path}: speaker embedding {name!r} has shape {tuple(tensor.shape)}; "
                    f"this model needs ({width},)"
                )
            self.embeddings[name] = tensor.float().to(self.device)
        if not self.embeddings:
            raise ValueError(f"{path} holds no speaker embeddings")
        self.voices = tuple(self.embeddings)
        self.default_voice = DEFAULT_VOICE if DEFAULT_VOICE in self.embeddings else self.voices[0]

    @torch.inference_mode()
    def synthesize(self, text: str, voice: str, speed: float, seed: int) -> np.ndarray:
        input_ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
        torch.manual_seed(seed)
        waveform = self.model.generate_speech(
            input_ids, self.embeddings[voice][None], vocoder=self.vocoder
        )
        return waveform.float().cpu().numpy().reshape(-1)


def _local_path(model: str, name: str, option: str) -> str:
    path = os.path.join(model, name)
    if not os.path.exists(path):
        raise ValueError(f"SpeechT5 model {model!r} has no {name}; give one with {option}")
    return path
