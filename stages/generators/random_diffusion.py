"""Stable Diffusion pipelines with random weights, built offline from configs.

No diffusion weights can be downloaded here, so tests and benchmarks build their own: a
`StableDiffusionPipeline` of a chosen geometry (`TINY` for CPU tests, `SD15` for the GPU
benchmark: Stable Diffusion 1.5's UNet, VAE and CLIP text encoder sizes) with a small
byte-level CLIP tokenizer that needs no vocabulary files. `save_random_sd_pipeline` writes it
with `save_pretrained` (safetensors), so it loads back through `DiffusionPipeline
.from_pretrained` like any checkpoint folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class SDGeometry:
    """The sizes that decide a Stable Diffusion pipeline's cost."""

    unet_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int | tuple[int, ...]
    # Latent side the UNet was "trained" at; times the VAE factor, the default image side.
    sample_size: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    # Groups of every GroupNorm; must divide every channel count above.
    norm_groups: int
    # CLIP's text window; prompts are padded or truncated to it.
    max_text_tokens: int
    text_vocab: int


# Two UNet levels, one of them with cross-attention, and a two-level VAE (factor 2): a 32x32
# image is a 16x16 latent, a full pipeline call takes tens of milliseconds on a CPU.
TINY = SDGeometry(
    unet_channels=(8, 16),
    layers_per_block=1,
    attention_head_dim=4,
    sample_size=16,
    vae_channels=(8, 16),
    vae_layers_per_block=1,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    text_intermediate=37,
    norm_groups=4,
    max_text_tokens=16,
    text_vocab=600,
)

# runwayml/stable-diffusion-v1-5's configs (860M-parameter UNet, 84M VAE, CLIP ViT-L/14 text).
SD15 = SDGeometry(
    unet_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    sample_size=64,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    text_hidden=768,
    text_layers=12,
    text_heads=12,
    text_intermediate=3072,
    norm_groups=32,
    max_text_tokens=77,
    text_vocab=49408,
)


def byte_level_clip_tokenizer(max_length: int) -> Any:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (each also as a word end) and
    the two specials: every text tokenizes, with no merges table to download."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _byte_symbols() -> list[str]:
    # GPT-2's byte-to-unicode table, the alphabet CLIP's BPE works in: printable bytes stand
    # for themselves, the rest are shifted past 255 so no symbol is whitespace or a control.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def build_random_sd_pipeline(geometry: SDGeometry = TINY, seed: int = 0) -> Any:
    """A `StableDiffusionPipeline` (fp32, CPU unless built under a `torch.device` context) with
    random weights drawn from `seed`, a DDIM scheduler and no safety checker."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    g = geometry
    tokenizer = byte_level_clip_tokenizer(g.max_text_tokens)
    if len(tokenizer) > g.text_vocab:
        raise ValueError(f"text_vocab {g.text_vocab} is smaller than the tokenizer's")
    torch.manual_seed(seed)
    levels = len(g.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=g.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=g.unet_channels,
        layers_per_block=g.layers_per_block,
        # SD's layout: cross-attention at every level but the deepest.
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=g.text_hidden,
        attention_head_dim=g.attention_head_dim,
        norm_num_groups=g.norm_groups,
    )
    vae_levels = len(g.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=g.vae_channels,
        layers_per_block=g.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=g.norm_groups,
        sample_size=g.sample_size * 2 ** (vae_levels - 1),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=g.text_vocab,
            hidden_size=g.text_hidden,
            intermediate_size=g.text_intermediate,
            num_hidden_layers=g.text_layers,
            num_attention_heads=g.text_heads,
            max_position_embeddings=g.max_text_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_random_sd_pipeline(
    folder: str | Path,
    geometry: SDGeometry = TINY,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Build (on `device`, which is much faster than the CPU for SD sizes), cast to `dtype`
    and save a random pipeline into `folder`; returns the folder."""
    with torch.device(device):
        pipeline = build_random_sd_pipeline(geometry, seed)
    if dtype != torch.float32:
        pipeline.to(dtype=dtype)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
