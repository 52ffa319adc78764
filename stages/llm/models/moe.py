"""Mixture-of-experts layers: routing, the expert computation and the sparse MLP block.

Every expert computation goes through one function, `fused_moe(hidden, w13, w2, topk_ids,
topk_weights)`: on CUDA the fused Triton path (`fused_moe_triton`: tokens sorted by expert, one
grouped GEMM per projection, routing weights applied in the epilogue), elsewhere the torch path
below. Expert parallelism needs nothing else from the model: it passes `expert_map` (global
expert id -> local id, -1 for experts another rank holds) and sums the ranks' outputs.

Expert weights are stacked, as transformers 5 keeps them: `gate_up_proj` [E, 2I, H] (gate
rows first) and `down_proj` [E, H, I]. Checkpoints on the hub store one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`, ...); `MoECausalLM.load_weights` stacks them on load.

Numerics follow transformers: router logits in the model dtype (Qwen) or float32 (DeepSeek),
softmax in float32, each expert's output scaled by its routing weight and added to the token's
sum in ascending expert order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omni.stages.llm.models.base import CausalLM
from omni.stages.llm.models.layers import GatedMLP, Linear
from omni.stages.llm.models.parallel_layers import copy_shard
from omni.stages.llm.parallel.group import Shard, current_group
from torch import nn

# ---- routing -------------------------------------------------------------------------------


def use_moe_kernels(tensor: torch.Tensor) -> bool:
    """The Triton routing and expert kernels serve every CUDA tensor. Unlike the elementwise
    kernels there is no OMNI_FUSED_OPS=0 fallback: the torch path reads expert counts back to
    the host, which a CUDA-graph capture forbids."""
    return tensor.is_cuda


@dataclass(frozen=True)
class Routing:
    """How a router's logits pick experts.

    top_k: experts per token. renormalize: scale the chosen probabilities to sum to 1 (Qwen's
    `norm_topk_prob`). scaling: a factor on the final weights (DeepSeek's
    `routed_scaling_factor`). num_groups / topk_groups: DeepSeek's group-limited greedy, which
    keeps only the `topk_groups` groups whose best expert scores highest. float32_logits: the
    router matmul runs in float32 (DeepSeek) rather than the model dtype (Qwen), and the
    weights stay float32 instead of being cast back to the model dtype.
    """

    top_k: int
    renormalize: bool = False
    scaling: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    float32_logits: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"num_experts_per_tok must be >= 1, got {self.top_k}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"topk_group {self.topk_groups} must be between 1 and n_group {self.num_groups}"
            )

    def logits(self, hidden: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
        if self.float32_logits:
            return F.linear(hidden.float(), gate_weight.float())
        return F.linear(hidden, gate_weight)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, top_k], expert ids [T, top_k] int64) from router logits [T, E]."""
        weights_dtype = torch.float32 if self.float32_logits else logits.dtype
        if use_moe_kernels(logits) and self.num_groups == 1:
            from omni.stages.llm.models.fused_moe_triton import softmax_topk_triton

            return softmax_topk_triton(
                logits, self.top_k, self.renormalize, self.scaling, weights_dtype
            )
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.num_groups > 1:
            scores = _keep_best_groups(scores, self.num_groups, self.topk_groups)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return weights.to(weights_dtype), ids


def _keep_best_groups(scores: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Zero every expert outside the `topk_groups` groups with the highest best score (the
    probabilities are positive, so a zeroed expert is never chosen over a kept one)."""
    num_tokens, num_experts = scores.shape
    if num_experts % num_groups:
        raise ValueError(f"{num_experts} experts do not split into n_group {num_groups} groups")
    grouped = scores.view(num_tokens, num_groups, num_experts // num_groups)
    best_groups = grouped.max(dim=-1).values.topk(topk_groups, dim=-1).indices
    keep = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, best_groups, True)
    return grouped.masked_fill(~keep[:, :, None], 0.0).view(num_tokens, num_experts)


# ---- the expert computation ----------------------------------------------------------------


def check_moe_inputs(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    """Shape checks that need no device sync."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got {tuple(hidden.shape)}")
    num_tokens, hidden_size = hidden.shape
    if w13.dim() != 3 or w13.shape[2] != hidden_size or w13.shape[1] % 2:
        raise ValueError(f"w13 must be [E, 2I, H={hidden_size}], got {tuple(w13.shape)}")
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, hidden_size, intermediate):
        raise ValueError(
            f"w2 must be [E, H, I] = {(num_experts, hidden_size, intermediate)}, "
            f"got {tuple(w2.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [T={num_tokens}, top_k], got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} must match topk_ids "
            f"{tuple(topk_ids.shape)}"
        )


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down(silu(gate(x_t)) * up(x_t)) through expert
    topk_ids[t, k], for hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]. Returns [T, H] in the
    hidden dtype.

    expert_map (int [num_global_experts]): global ids in topk_ids -> rows of w13/w2, -1 for
    experts held elsewhere, whose terms are left out (expert parallelism).
    """
    check_moe_inputs(hidden, w13, w2, topk_ids, topk_weights)
    if expert_map is not None:
        topk_ids = expert_map[topk_ids]
    if use_moe_kernels(hidden):
        # Imported here so CPU-only users never compile Triton.
        from omni.stages.llm.models.fused_moe_triton import fused_moe_triton

        return fused_moe_triton(
            hidden, w13, w2, topk_ids, topk_weights, ids_may_be_dropped=expert_map is not None
        )
    return fused_moe_torch(hidden, w13, w2, topk_ids, topk_weights)


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """The CPU path, and the yardstick for the kernel: one gathered matmul pair per expert that
    any token chose. Ids outside [0, E) are skipped."""
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1)
    valid = (flat_ids >= 0) & (flat_ids < num_experts)
    # Entries sorted by expert (stable, so each expert's tokens stay in order); a host read of
    # the counts is free on the CPU.
    order = torch.argsort(torch.where(valid, flat_ids, num_experts), stable=True)
    counts = torch.bincount(flat_ids[valid], minlength=num_experts).tolist()
    flat_weights = topk_weights.reshape(-1)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        entries = order[start : start + count]
        start += count
        tokens = entries // top_k
        gate, up = F.linear(hidden[tokens], w13[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2[expert])
        weighted = expert_out * flat_weights[entries, None]
        out.index_add_(0, tokens, weighted.to(out.dtype))
    return out


# ---- the sparse MLP block ------------------------------------------------------------------


class FusedExperts(nn.Module):
    """E SwiGLU experts as two stacked parameters (transformers 5's names and layout).

    Over a tensor-parallel group, either every expert's intermediate features are split
    across the ranks (each holds [E, 2 x I/N, H] and [E, H, I/N], a column- then row-parallel
    MLP per expert), or, with expert parallelism, whole experts are (each holds E/N of them,
    and `expert_map` sends the others' choices nowhere). Either way a rank's output is a
    partial sum: the block all-reduces it once, with its shared expert's."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        group = current_group()
        self.num_experts = num_experts
        if group.expert_parallel and group.world_size > 1:
            self.experts = group.split(num_experts, "the number of experts")
            self.features = Shard(0, intermediate_size, intermediate_size)
        else:
            self.experts = Shard(0, num_experts, num_experts)
            self.features = group.split(intermediate_size, "moe_intermediate_size")
        self.intermediate_size = self.features.size
        local, inter = self.experts.size, self.features.size
        self.gate_up_proj = nn.Parameter(torch.empty(local, 2 * inter, hidden_size, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(local, hidden_size, inter, dtype=dtype))
        # Global expert id -> row of this rank's parameters, -1 for another rank's expert.
        expert_map = None
        if local != num_experts:
            ids = torch.arange(num_experts)
            held = (ids >= self.experts.start) & (ids < self.experts.start + local)
            expert_map = torch.where(held, ids - self.experts.start, -1)
        self.expert_map: torch.Tensor | None
        self.register_buffer("expert_map", expert_map, persistent=False)

    def forward(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return fused_moe(
            hidden, self.gate_up_proj, self.down_proj, topk_ids, topk_weights, self.expert_map
        )

    def holds(self, expert: int) -> bool:
        return self.experts.start <= expert < self.experts.start + self.experts.size

    def load(self, param: str, tensor: torch.Tensor, name: str, part: str | None = None) -> None:
        """A stacked checkpoint tensor ([E, 2I, H] gate then up, or [E, H, I]): this rank's
        experts, and of each its slice of the intermediate features."""
        experts = self.experts
        if tensor.dim() != 3 or tensor.shape[0] != experts.full:
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; the model expects "
                f"{experts.full} stacked experts"
            )
        mine = tensor.narrow(0, experts.start, experts.size)
        if param == "down_proj":
            copy_shard(self.down_proj.data, mine, 2, self.features, name)
            return
        full = self.features.full
        for half in (0, 1):
            self.load_half(mine.narrow(1, half * full, full), half, name)

    def load_expert(self, proj: str, expert: int, tensor: torch.Tensor, name: str) -> None:
        """One expert's checkpoint tensor (`gate_proj`, `up_proj` [I, H] or `down_proj`
        [H, I]), when this rank holds that expert."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"checkpoint tensor {name} names expert {expert}; the model has "
                f"{self.num_experts}"
            )
        local = expert - self.experts.start
        if proj == "down_proj":
            copy_shard(self.down_proj.data[local], tensor, 1, self.features, name)
        else:
            self.load_half(tensor, 0 if proj == "gate_proj" else 1, name, local)

    def load_half(
        self, tensor: torch.Tensor, half: int, name: str, expert: int | None = None
    ) -> None:
        """Gate (half 0) or up (half 1) rows [(E,) I, H] into this rank's slice of them."""
        target = self.gate_up_proj.data if expert is None else self.gate_up_proj.data[expert]
        size = self.features.size
        dim = target.dim() - 2
        copy_shard(target.narrow(dim, half * size, size), tensor, dim, self.features, name)


class SparseMoeBlock(nn.Module):
    """Router (`gate`), routed experts, and optionally a shared expert that every token goes
    through (`shared_expert`, or DeepSeek's `shared_experts`), itself optionally scaled by a
    sigmoid gate (Qwen2-MoE's `shared_expert_gate`)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        moe_intermediate_size: int,
        routing: Routing,
        dtype: torch.dtype,
        shared_intermediate_size: int = 0,
        shared_name: str = "shared_expert",
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        if routing.top_k > num_experts:
            raise ValueError(
                f"num_experts_per_tok {routing.top_k} exceeds the {num_experts} experts"
            )
        self.routing = routing
        self.gate = Linear(hidden_size, num_experts, False, dtype)
        self.experts = FusedExperts(num_experts, hidden_size, moe_intermediate_size, dtype)
        self.shared_name = shared_name
        if shared_intermediate_size > 0:
            shared = GatedMLP(
                hidden_size, shared_intermediate_size, False, "silu", dtype, reduce=False
            )
            self.add_module(shared_name, shared)
        self.shared_expert_gate = Linear(hidden_size, 1, False, dtype) if shared_gate else None
        self.group = current_group()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.routing.logits(hidden, self.gate.weight)
        topk_weights, topk_ids = self.routing.select(logits)
        # Under tensor parallelism both parts are this rank's partial sums: one all-reduce.
        out = self.experts(hidden, topk_ids, topk_weights)
        shared: nn.Module | None = getattr(self, self.shared_name, None)
        if shared is not None:
            shared_out = shared(hidden)
            if self.shared_expert_gate is not None:
                # The gate is per token, so it may scale each rank's part before the sum.
                shared_out = torch.sigmoid(self.shared_expert_gate(hidden)) * shared_out
            out = out + shared_out
        return self.group.all_reduce(out)


# ---- loading per-expert checkpoint tensors -------------------------------------------------

_EXPERT_TENSOR = re.compile(
    r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
# Per-expert projection -> (stacked parameter, index of its half along dim 1 or None).
_STACKED_EXPERT = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
}


class MoECausalLM(CausalLM):
    """Mix in before a dense model's class: loads per-expert checkpoint tensors into the
    stacked expert parameters (stacked checkpoints load by name as they are)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        modules = dict(self.named_modules())
        parts_seen: dict[str, set[tuple[int, str]]] = defaultdict(set)

        def others() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                match = _EXPERT_TENSOR.match(name)
                if match is None:
                    yield name, tensor
                    continue
                experts = modules.get(match["experts"])
                if not isinstance(experts, FusedExperts):
                    continue
                expert = int(match["expert"])
                if not experts.holds(expert) and 0 <= expert < experts.num_experts:
                    continue  # another rank's expert (expert parallelism)
                experts.load_expert(match["proj"], expert, tensor, name)
                stacked, _ = _STACKED_EXPERT[match["proj"]]
                parts_seen[f"{match['experts']}.{stacked}"].add((expert, match["proj"]))

        loaded = super().load_weights(others())
        for param_name, parts in parts_seen.items():
            if len(parts) == len(self.checkpoint_names(param_name)):
                loaded.add(param_name)
        return loaded

    def checkpoint_names(self, param_name: str) -> list[str]:
        """A stacked expert parameter is filled by the per-expert tensors of the experts
        this rank holds."""
        for stacked in ("gate_up_proj", "down_proj"):
            suffix = f".experts.{stacked}"
            if param_name.endswith(suffix):
                prefix = param_name.removesuffix(f".{stacked}")
                experts = self.get_submodule(prefix)
                assert isinstance(experts, FusedExperts)
                held = range(experts.experts.start, experts.experts.start + experts.experts.size)
                projs = [p for p, (s, _) in _STACKED_EXPERT.items() if s == stacked]
                return [f"{prefix}.{e}.{proj}.weight" for e in held for proj in projs]
        return super().checkpoint_names(param_name)


def is_sparse_layer(config: object, layer_idx: int) -> bool:
    """Qwen-MoE's rule: every `decoder_sparse_step`-th layer is sparse unless listed in
    `mlp_only_layers`."""
    num_experts = int(getattr(config, "num_experts", 0) or 0)
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    return num_experts > 0 and layer_idx not in mlp_only and (layer_idx + 1) % step == 0
