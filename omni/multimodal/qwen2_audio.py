"""Prompt processing for Qwen2-Audio requests: one request in, engine inputs out.

Entry point:

    processor = Qwen2AudioPromptProcessor.from_pretrained(model_folder)
    prompt = processor.prepare(messages=[...])                  # chat messages, or
    prompt = processor.prepare(prompt=text, audios=[samples, ...])

`messages` are chat messages whose `content` is a string or a list of items
`{"type": "text", "text": ...}` / `{"type": "audio", "audio": samples}`, where `samples` are
float32 mono numpy arrays at the feature extractor's rate (16 kHz; media intake's
`load_audio` decodes, bounds and resamples them). A text `prompt` marks each clip with one
`<|AUDIO|>` (inside `<|audio_bos|>`/`<|audio_eos|>`, as Qwen's template writes it).

This does what transformers' `Qwen2AudioProcessor` does, and the tests hold the two equal:
each clip goes through the `WhisperFeatureExtractor` padded to its 30-second window (log-mel
features plus the count of valid frames), and each `<|AUDIO|>` becomes a run of
`num_audio_tokens(valid frames)` tokens. Unlike the processor, a clip longer than the window is
refused rather than silently cut, and the runs are recorded as placeholders with the clip's
content hash (the encoder-output cache's key and the block hashes' extra key).

Then, with the audio encoder (`omni.stages.encoders.audio`):

    per_clip = prompt.split_embeddings(encoder.encode(*prompt.encoder_inputs()))
    engine.add_request(request_id, prompt.prompt_token_ids, sampling,
                       mm=prompt.to_multimodal_inputs(per_clip))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from omni.cache import MultiModalPlaceholder
from omni.multimodal.chat import (
    ChatText,
    MediaKind,
    load_tokenizer_with_template,
    render_chat,
)
from omni.multimodal.hashing import audio_item_hash
from omni.multimodal.prompt import EncoderItem, MultiModalPrompt, expand_placeholders
from omni.stages.contracts import audio

AUDIO_TOKEN = "<|AUDIO|>"
DEFAULT_MAX_AUDIOS = 8
AUDIO_ITEMS = MediaKind("audio", np.ndarray, "float32 mono samples (a numpy array)")


def num_audio_tokens(num_frames: int) -> int:
    """Placeholder tokens for a clip of `num_frames` valid mel frames: conv2 halves the frames
    (stride 2), then the tower's average pool halves them again."""
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


# The fewest mel frames `num_audio_tokens` turns into a token.
MIN_FRAMES = 3


@dataclass(frozen=True)
class ProcessedAudio:
    """One clip as the audio encoder takes it, with its content hash."""

    input_features: torch.Tensor  # float32 [num_mel_bins, window frames], padded
    num_frames: int  # valid frames at the start of input_features
    item_hash: str


@dataclass(frozen=True)
class Qwen2AudioPrompt(MultiModalPrompt):
    """Everything the engine needs for one Qwen2-Audio prompt (see the module docstring)."""

    ENCODER_ROLE: ClassVar[str] = audio.ROLE
    ITEM_NOUN: ClassVar[str] = "audio clips"

    prompt_token_ids: list[int]
    audios: tuple[ProcessedAudio, ...]
    placeholders: tuple[MultiModalPlaceholder, ...]

    def __post_init__(self) -> None:
        if len(self.audios) != len(self.placeholders):
            raise ValueError(
                f"{len(self.audios)} audio clips but {len(self.placeholders)} placeholders"
            )

    def encoder_inputs(
        self, item_indices: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_features [clips, mels, frames], feature_lengths int64 [clips]) of the given
        clips (all by default), in that order: the audio encoder's inputs."""
        chosen = [self.audios[i] for i in self.selected_items(item_indices)]
        features = torch.stack([audio.input_features for audio in chosen])
        lengths = torch.tensor([audio.num_frames for audio in chosen], dtype=torch.int64)
        return features, lengths

    def encoder_request(self, item_indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        features, lengths = self.encoder_inputs(item_indices)
        return {audio.INPUT_FEATURES: features, audio.FEATURE_LENGTHS: lengths}

    def encoder_items(self) -> list[EncoderItem]:
        body = audio.CONTRACT.encode(audio.EncodeClips())
        return [
            EncoderItem(audio.ROLE, body, self.encoder_request([index]))
            for index in range(len(self.audios))
        ]


class Qwen2AudioPromptProcessor:
    """Tokenizer plus Whisper feature extractor for one Qwen2-Audio checkpoint."""

    # The media items its messages carry (the server maps content parts onto it).
    MEDIA: ClassVar[MediaKind] = AUDIO_ITEMS

    def __init__(
        self,
        tokenizer: Any,
        feature_extractor: Any,
        max_audios: int = DEFAULT_MAX_AUDIOS,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if max_audios < 0:
            raise ValueError(f"max_audios is {max_audios}; it must be >= 0")
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.max_audios = max_audios
        self.max_prompt_tokens = max_prompt_tokens
        self.sampling_rate = int(feature_extractor.sampling_rate)
        # The tower's fixed window; a longer clip would be cut by the extractor.
        self.max_samples = int(feature_extractor.n_samples)
        # The shortest clip that yields an audio token: one mel frame per hop (the last one
        # partial), and the tower needs MIN_FRAMES of them for one token.
        self.min_samples = (MIN_FRAMES - 1) * int(feature_extractor.hop_length) + 1
        token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {AUDIO_TOKEN} token; is this Qwen2-Audio?")
        self.audio_token_id = int(token_id)
        # Everything in the extractor's settings shapes the features the tower sees.
        self.processor_settings: Mapping[str, Any] = feature_extractor.to_dict()

    @classmethod
    def from_pretrained(cls, folder: str, **limits: Any) -> Qwen2AudioPromptProcessor:
        """From a checkpoint folder holding the tokenizer and `preprocessor_config.json`."""
        from transformers import AutoFeatureExtractor

        feature_extractor = AutoFeatureExtractor.from_pretrained(folder)
        return cls(load_tokenizer_with_template(folder), feature_extractor, **limits)

    @property
    def max_seconds(self) -> float:
        return self.max_samples / self.sampling_rate

    def too_short(self, name: str, num_samples: int) -> str:
        """The refusal of a clip that would yield no audio token (its placeholder would be
        empty)."""
        return (
            f"{name} is {num_samples} samples at {self.sampling_rate} Hz, too short to yield an "
            f"audio token; the shortest clip is {self.min_samples} samples "
            f"({1000 * self.min_samples / self.sampling_rate:g} ms)"
        )

    def prepare(
        self,
        messages: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | None = None,
        audios: Sequence[np.ndarray] = (),
        add_generation_prompt: bool = True,
    ) -> Qwen2AudioPrompt:
        """Process one request: `messages` (clips inside them) or `prompt` plus `audios`."""
        if (messages is None) == (prompt is None):
            raise ValueError("pass exactly one of messages or prompt")
        if messages is not None:
            if len(audios):
                raise ValueError("with messages, audio clips go inside the message content")
            chat, audios = render_chat(
                self.tokenizer, messages, self.MEDIA, add_generation_prompt
            )
        else:
            assert prompt is not None
            chat = ChatText(prompt)
        self._check_prompt(chat.text, audios)

        processed = [self._process_audio(index, samples) for index, samples in enumerate(audios)]
        text_ids = chat.encode(self.tokenizer)
        token_ids, placeholders = expand_placeholders(
            text_ids,
            self.audio_token_id,
            [num_audio_tokens(audio.num_frames) for audio in processed],
            [audio.item_hash for audio in processed],
            AUDIO_TOKEN,
        )
        if self.max_prompt_tokens is not None and len(token_ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens with its audio expanded; the limit is "
                f"{self.max_prompt_tokens}"
            )
        return Qwen2AudioPrompt(token_ids, tuple(processed), tuple(placeholders))

    def _check_prompt(self, prompt: str, audios: Sequence[np.ndarray]) -> None:
        if len(audios) > self.max_audios:
            raise ValueError(
                f"request has {len(audios)} audio clips; the limit is {self.max_audios}"
            )
        markers = prompt.count(AUDIO_TOKEN)
        if markers != len(audios):
            raise ValueError(
                f"the prompt has {markers} {AUDIO_TOKEN} markers for {len(audios)} audio clips; "
                "each clip needs exactly one"
            )

    def _process_audio(self, index: int, samples: np.ndarray) -> ProcessedAudio:
        if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(
                f"audio {index} must be 1-D float mono samples, got {samples.dtype} "
                f"{tuple(samples.shape)}"
            )
        if samples.size == 0:
            raise ValueError(f"audio {index} has no samples")
        if samples.size > self.max_samples:
            raise ValueError(
                f"audio {index} is {samples.size / self.sampling_rate:.2f} seconds long; "
                f"the limit is {self.max_seconds:g} seconds per clip"
            )
        if not np.isfinite(samples).all():
            raise ValueError(f"audio {index} has samples that are NaN or infinite")
        if samples.size < self.min_samples:
            raise ValueError(self.too_short(f"audio {index}", samples.size))
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        out = self.feature_extractor(
            samples,
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return ProcessedAudio(
            input_features=out["input_features"][0],
            num_frames=int(out["attention_mask"][0].sum()),
            item_hash=audio_item_hash(samples, self.sampling_rate, self.processor_settings),
        )
