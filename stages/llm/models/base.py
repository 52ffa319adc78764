"""The decoder-only transformer that Llama, Qwen2 and Qwen3 share, with paged attention.

The three families differ only in a few switches (biases, per-head q/k norms), collected in
`DecoderArch`; each family's module picks its switches from the Hugging Face config. Parameter
names mirror transformers' (`model.layers.0.self_attn...`) except for the two fused
projections, `qkv_proj` (q, k and v stacked along the output dim) and `gate_up_proj`, so
checkpoint tensors map onto parameters by name with a slice for the fused ones.

Forward runs one flattened batch ([T] tokens of many requests, see `AttentionMetadata`); there
is no batch dimension and no padding inside the model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from omni.stages.llm.attention import AttentionMetadata, attend
from omni.stages.llm.models.layers import (
    GatedMLP,
    RMSNorm,
    RotaryAngles,
    RotaryEmbedding,
)
from omni.stages.llm.models.parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    attention_head_shards,
    copy_checked,
    scaled,
)
from omni.stages.llm.parallel.group import current_group
from torch import nn


@dataclass(frozen=True)
class KVCacheSpec:
    """What the runner needs to size one `[planes, blocks, block_size, kv_heads, head_dim]`
    cache tensor per layer.

    planes is 2 for attention that caches keys and values apart (plane 0 keys, plane 1
    values); MLA caches one compressed latent per token that serves as both, so its spec has
    one plane, one "head" and head_dim = kv_lora_rank + qk_rope_head_dim.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    planes: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"KVCacheSpec.{name} must be positive, got {value}")
        if self.planes not in (1, 2):
            raise ValueError(f"KVCacheSpec.planes must be 1 or 2, got {self.planes}")

    def layer_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int, int]:
        """The shape of one layer's cache tensor."""
        return (self.planes, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def block_bytes(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers."""
        element = torch.empty((), dtype=dtype).element_size()
        per_layer = self.planes * block_size * self.num_kv_heads * self.head_dim * element
        return int(per_layer * self.num_layers)


@dataclass(frozen=True)
class DecoderArch:
    """The switches that tell the supported families apart."""

    qkv_bias: bool  # Qwen2 always; Llama/Qwen3 when config.attention_bias
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on every q and k head, before rotary


# Checkpoint projections that live inside one fused parameter: (fused, checkpoint part, shard).
STACKED_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
)


@dataclass(frozen=True)
class Geometry:
    """Sizes read once from the Hugging Face config (with transformers' fallbacks)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_config(cls, config: Any) -> Geometry:
        num_heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        return cls(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.rms_norm_eps),
            hidden_act=str(config.hidden_act),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class Attention(nn.Module):
    """Self-attention over the paged KV cache. Under tensor parallelism each rank holds its
    slice of the query heads and the KV heads they read (see `attention_head_shards`), so
    attention itself needs no communication; o_proj's all-reduce joins the heads."""

    def __init__(self, geo: Geometry, arch: DecoderArch, dtype: torch.dtype) -> None:
        super().__init__()
        heads, kv_heads = attention_head_shards(geo.num_heads, geo.num_kv_heads, current_group())
        self.num_heads = heads.size
        self.num_kv_heads = kv_heads.size
        self.head_dim = geo.head_dim
        self.q_size = self.num_heads * geo.head_dim
        self.kv_size = self.num_kv_heads * geo.head_dim
        self.scale = geo.head_dim**-0.5
        q, kv = scaled(heads, geo.head_dim), scaled(kv_heads, geo.head_dim)
        self.qkv_proj = ColumnParallelLinear(
            geo.hidden_size, [q, kv, kv], arch.qkv_bias, dtype, part_names=("q", "k", "v")
        )
        self.o_proj = RowParallelLinear(q, geo.hidden_size, arch.o_bias, dtype)
        self.q_norm = RMSNorm(geo.head_dim, geo.rms_norm_eps, dtype) if arch.qk_norm else None
        self.k_norm = RMSNorm(geo.head_dim, geo.rms_norm_eps, dtype) if arch.qk_norm else None

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: RotaryAngles,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: str,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        # A strided view of the fused qkv output: both attention backends take it as is.
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary.rotate(q, k)
        out = attend(q, k, v, kv_cache, meta, self.scale, backend)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP. The attention and MLP modules are the model's
    choice (`CausalLM.make_attention` / `make_mlp`): a mixture-of-experts layer or MLA slots
    in with the same forward signatures."""

    def __init__(
        self, geo: Geometry, self_attn: nn.Module, mlp: nn.Module, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(geo.hidden_size, geo.rms_norm_eps, dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(geo.hidden_size, geo.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: RotaryAngles,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream before it is added): each residual add is deferred
        into the next norm, so on CUDA add and norm are one kernel (vLLM's pattern).
        `residual` is None for the first layer, whose `hidden` is the embeddings.

        The residual stream stays in the model dtype and each add is torch's `residual + x`,
        as transformers does it: the same bits as `hidden + sublayer(...)` (IEEE addition is
        commutative), so the CPU path matches the reference exactly. A float32 residual would
        drift from the reference in bf16.
        """
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attn_out = self.self_attn(normed, rotary, kv_cache, meta, backend)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return self.mlp(normed), residual


class DecoderModel(nn.Module):
    """Embeddings, layers and the final norm: `model.*` in checkpoint names."""

    def __init__(
        self, config: Any, geo: Geometry, layers: Iterable[DecoderLayer], dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(geo.vocab_size, geo.hidden_size, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(geo.hidden_size, geo.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config, geo.head_dim)


class CausalLM(nn.Module):
    """A decoder-only language model over a paged KV cache.

    Subclasses choose their `DecoderArch` from the config; everything else is shared.
    """

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        check_full_attention(config)
        self.config = config
        self.dtype = dtype
        self.geometry = Geometry.from_config(config)
        self.arch = self.decoder_arch(config)
        layers = (
            DecoderLayer(self.geometry, self.make_attention(i), self.make_mlp(i), dtype)
            for i in range(self.geometry.num_layers)
        )
        self.model = DecoderModel(config, self.geometry, layers, dtype)
        # Tied models read logits straight off the embedding table: one parameter, so a
        # checkpoint's redundant lm_head.weight (if any) is simply ignored. Either way the
        # vocabulary is split across tensor-parallel ranks like the embedding's.
        self.lm_head = (
            None
            if self.geometry.tie_word_embeddings
            else VocabParallelEmbedding(self.geometry.vocab_size, self.geometry.hidden_size, dtype)
        )
        geo = self.geometry
        # KV heads this rank caches (all of them without tensor parallelism).
        self.kv_heads_per_rank = attention_head_shards(
            geo.num_heads, geo.num_kv_heads, current_group()
        )[1].size

    @classmethod
    def decoder_arch(cls, config: Any) -> DecoderArch:
        raise NotImplementedError

    def make_attention(self, layer_idx: int) -> nn.Module:
        """Layer `layer_idx`'s attention; called from `__init__` once `geometry`, `arch`,
        `config` and `dtype` are set."""
        return Attention(self.geometry, self.arch, self.dtype)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        """Layer `layer_idx`'s MLP (a mixture-of-experts model returns its sparse block)."""
        geo = self.geometry
        return GatedMLP(
            geo.hidden_size, geo.intermediate_size, self.arch.mlp_bias, geo.hidden_act, self.dtype
        )

    # ---- cache geometry --------------------------------------------------------------------

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        geo = self.geometry
        return KVCacheSpec(geo.num_layers, self.kv_heads_per_rank, geo.head_dim)

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads in this rank's cache."""
        return self.kv_heads_per_rank

    @property
    def head_dim(self) -> int:
        return self.geometry.head_dim

    # ---- forward ---------------------------------------------------------------------------

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden]; multi-modal callers splice encoder outputs into them
        and pass the result as `inputs_embeds`."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_meta: AttentionMetadata,
        attn_backend: str,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] for the flattened batch; writes every new
        token's K/V into `kv_caches` (one tensor per layer) at `attn_meta.slot_mapping`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if len(kv_caches) != self.geometry.num_layers:
            raise ValueError(
                f"got {len(kv_caches)} KV cache tensors; the model has "
                f"{self.geometry.num_layers} layers"
            )
        if inputs_embeds is not None:
            hidden = inputs_embeds.to(self.dtype)
        else:
            assert input_ids is not None
            hidden = self.embed_tokens(input_ids)
        rotary = self.model.rotary_emb(positions, hidden.dtype)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, attn_meta, attn_backend)
        if residual is None:  # a model without layers
            return self.model.norm(hidden)
        normed, _ = self.model.norm.add_and_norm(hidden, residual)
        return normed

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 (the matmul itself runs in the model dtype, like
        transformers, and is upcast for the sampler). Under tensor parallelism every rank
        must call it, and only rank 0's result is the whole vocabulary's."""
        head = self.lm_head if self.lm_head is not None else self.model.embed_tokens
        return head.logits(hidden_states)

    # ---- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) into the parameters, casting to the
        model's dtype and device; a sharded layer copies only this rank's slice. Returns the
        names of the parameters that were fully loaded (a fused parameter counts once all its
        parts arrived). Tensors the model has no parameter for (rotary `inv_freq`, a tied
        `lm_head.weight`) are ignored."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        shards_seen: dict[str, set[str]] = defaultdict(set)
        loaded: set[str] = set()
        for name, tensor in weights:
            for fused, part, shard in STACKED_PARAMS:
                if f".{part}." not in name:
                    continue
                param_name = name.replace(f".{part}.", f".{fused}.")
                if param_name in params:
                    load_param(modules, param_name, tensor, name, shard)
                    shards_seen[param_name].add(shard)
                    break
            else:
                # Not part of a fused parameter (MLA's q_proj is a projection of its own).
                if name in params:
                    load_param(modules, name, tensor, name)
                    loaded.add(name)
        for param_name, shards in shards_seen.items():
            if len(shards) == len(self.checkpoint_names(param_name)):
                loaded.add(param_name)
        return loaded

    def checkpoint_names(self, param_name: str) -> list[str]:
        """The checkpoint tensor names that fill `param_name` (several for a fused one)."""
        for fused in {fused for fused, _, _ in STACKED_PARAMS}:
            if f".{fused}." in param_name:
                return [
                    param_name.replace(f".{fused}.", f".{part}.")
                    for f, part, _ in STACKED_PARAMS
                    if f == fused
                ]
        return [param_name]


def load_param(
    modules: dict[str, nn.Module],
    param_name: str,
    tensor: torch.Tensor,
    name: str,
    part: str | None = None,
) -> None:
    """Fills parameter `param_name` from checkpoint tensor `name`: a sharded layer (one with a
    `load` method) takes its slice, any other parameter is copied whole."""
    module_name, _, attr = param_name.rpartition(".")
    module = modules[module_name]
    load = getattr(module, "load", None)
    if load is not None:
        load(attr, tensor, name, part)
        return
    copy_checked(getattr(module, attr).data, tensor, name)


def check_full_attention(config: Any) -> None:
    """Reject sliding-window layers: the paged attention backends attend to whole contexts,
    so such a model would silently compute something else past the window."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    if sliding:
        raise ValueError(
            f"layers {sliding[:8]} use {layer_types[sliding[0]]!r}; only full attention is "
            "supported (set use_sliding_window=false)"
        )
