"""Layers sharded over a tensor-parallel group (Megatron-LM's layout, as vLLM and SGLang use).

* `ColumnParallelLinear`: each rank holds a slice of the output features and computes that
  slice; nothing is exchanged. A fused projection (q, k and v; gate and up) is several parts,
  each sliced on its own, so one matmul still yields this rank's slice of every part.
* `RowParallelLinear`: each rank holds a slice of the input features (the slice a column-
  parallel layer before it produced), computes a partial product, and the partials are summed
  by one all-reduce. The bias is added once, after the sum.
* `VocabParallelEmbedding`: each rank holds a contiguous slice of the vocabulary's rows (padded
  so every rank's slice has the same size); a token outside the slice contributes zeros and the
  all-reduce fills in the rest. The LM head uses the same slices and gathers logits on rank 0.

So a decoder layer costs two all-reduces (after attention's o_proj and after the MLP's
down_proj), and the model one more for the embedding plus one gather for the logits.

Every layer loads its slice of a full checkpoint tensor with `load`, narrowing the tensor
before it is copied: the checkpoint is memory-mapped (`safe_open`), so a rank reads only the
pages of its slice. With a group of one these are the plain layers, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from omni.stages.llm.parallel.group import Shard, TensorParallel, current_group
from torch import nn


def copy_shard(
    target: torch.Tensor, tensor: torch.Tensor, dim: int, shard: Shard, name: str
) -> None:
    """Copies rows [shard.start, + shard.size) of `tensor` along `dim` into the first
    `shard.size` rows of `target` (the rest, a padded vocabulary's tail, stays as it is);
    ValueError naming the checkpoint tensor when its shape is not the layer's full shape."""
    expected = list(target.shape)
    expected[dim] = shard.full
    if list(tensor.shape) != expected:
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; "
            f"the model expects {tuple(expected)}"
        )
    target.narrow(dim, 0, shard.size).copy_(tensor.narrow(dim, shard.start, shard.size))


def copy_checked(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copies a replicated parameter; ValueError naming the checkpoint tensor on a shape
    mismatch."""
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; "
            f"the model expects {tuple(target.shape)}"
        )
    target.copy_(tensor)


class ColumnParallelLinear(nn.Module):
    """`y = x @ W.T + b` holding this rank's slice of each part of the output features."""

    def __init__(
        self,
        in_features: int,
        parts: Sequence[Shard],
        bias: bool,
        dtype: torch.dtype,
        part_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if part_names and len(part_names) != len(parts):
            raise ValueError(f"{len(parts)} parts but {len(part_names)} part names")
        self.parts = tuple(parts)
        self.part_names = tuple(part_names)
        self.offsets = [sum(p.size for p in self.parts[:i]) for i in range(len(self.parts))]
        out_features = sum(p.size for p in self.parts)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, param: str, tensor: torch.Tensor, name: str, part: str | None = None) -> None:
        """Loads checkpoint tensor `name` (part `part` of a fused projection, or the whole
        output when the layer has a single part) into `weight` or `bias`."""
        index = 0 if part is None else self.part_names.index(part)
        if part is None and len(self.parts) != 1:
            raise ValueError(f"checkpoint tensor {name} needs a part of {self.part_names}")
        shard = self.parts[index]
        target = getattr(self, param).data.narrow(0, self.offsets[index], shard.size)
        copy_shard(target, tensor, 0, shard, name)


class RowParallelLinear(nn.Module):
    """`y = x @ W.T + b` with the input features sliced across ranks: each computes a
    partial product of its slice, and one all-reduce sums them."""

    def __init__(
        self,
        in_shard: Shard,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        reduce: bool = True,
    ) -> None:
        """`reduce=False` returns this rank's partial product (plus the bias on rank 0 only,
        so that the caller's sum adds it once)."""
        super().__init__()
        self.group: TensorParallel = current_group()
        self.reduce = reduce
        self.in_shard = in_shard
        self.in_features = in_shard.size
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_shard.size, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = F.linear(x, self.weight)
        if self.reduce:
            out = self.group.all_reduce(out)
        elif not self.group.is_first:
            return out
        return out if self.bias is None else out + self.bias

    def load(self, param: str, tensor: torch.Tensor, name: str, part: str | None = None) -> None:
        if param == "bias":
            assert self.bias is not None
            copy_checked(self.bias.data, tensor, name)
            return
        copy_shard(self.weight.data, tensor, 1, self.in_shard, name)


class VocabParallelEmbedding(nn.Module):
    """The embedding table's rows split across ranks (the vocabulary padded to a multiple of
    the group size); also the weight of a vocab-parallel LM head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.group: TensorParallel = current_group()
        self.num_embeddings = num_embeddings
        self.shard = self.group.split_padded(num_embeddings)
        rows = -(-num_embeddings // self.group.world_size)
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, dtype=dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.size)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded.masked_fill_(outside.unsqueeze(-1), 0)
        return self.group.all_reduce(embedded)

    def load(self, param: str, tensor: torch.Tensor, name: str, part: str | None = None) -> None:
        copy_shard(self.weight.data, tensor, 0, self.shard, name)
        # The padding rows: never looked up, and their logits are cut off, but not garbage.
        self.weight.data[self.shard.size :].zero_()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 on rank 0 (the matmul in the model dtype, like
        transformers); on the other ranks, which only take part in the gather, their own
        slice's."""
        local = F.linear(hidden, self.weight)
        if self.group.world_size == 1:
            return local.float()
        parts = self.group.gather_to_first(local.contiguous())
        if parts is None:
            return local.float()
        return torch.cat(parts, dim=-1)[:, : self.num_embeddings].float()


def attention_head_shards(
    num_heads: int, num_kv_heads: int, group: TensorParallel
) -> tuple[Shard, Shard]:
    """(query heads, KV heads) this rank holds. Query heads split evenly. KV heads split
    evenly too when there are at least as many as ranks; with fewer, each is replicated on
    `world_size // num_kv_heads` consecutive ranks, the ones whose query heads read it."""
    heads = group.split(num_heads, "num_attention_heads")
    if num_kv_heads >= group.world_size:
        return heads, group.split(num_kv_heads, "num_key_value_heads")
    if group.world_size % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads is {num_kv_heads}; with fewer KV heads than ranks, "
            f"tensor_parallel_size {group.world_size} must be a multiple of it"
        )
    copies = group.world_size // num_kv_heads
    return heads, Shard(group.rank // copies, 1, num_kv_heads)


def scaled(shard: Shard, factor: int) -> Shard:
    """A shard of heads as a shard of their features (`factor` = head_dim)."""
    return Shard(shard.start * factor, shard.size * factor, shard.full * factor)
