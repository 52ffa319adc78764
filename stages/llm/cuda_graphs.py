"""CUDA graphs for the forward pass: decode steps, and mixed steps up to a token bound.

A decode step of a 7B model launches hundreds of small kernels; at batch 1 their launch cost
alone exceeds the time the GPU needs to stream the weights. Capturing the forward pass once per
batch size and replaying it removes that cost. A step is padded up to the nearest captured size:
padded rows read the null block (id 0) and write no KV (slot -1).

Steps with prompt tokens pay the same cost at a larger scale: serving Qwen2.5-VL-7B image chats
on an H200, such a step spent about 30 ms of host time launching its kernels one by one (Python
and Triton's launcher, ~170 Triton launches) while the GPU idled for half of it
(docs/benchmarks.md). Mixed graphs capture the whole forward, attention included, once per
token count (multiples of EAGER_TOKEN_MULTIPLE up to `max_graph_tokens`) for up to max_num_seqs
requests of any query length: the unified attention kernel finds each tile's request on the
device, so only the token count and the request bound are baked into a graph (graph_inputs
says how steps are padded). Bigger steps run eagerly; their GPU time hides their launches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from omni.stages.llm.eager_shapes import EAGER_TOKEN_MULTIPLE
from omni.stages.llm.graph_inputs import GraphShape, StaticStepInputs
from omni.stages.llm.host_to_device import copy_to_device
from omni.stages.llm.step_inputs import HostStepInputs

if TYPE_CHECKING:
    from omni.stages.llm.model_runner import TokenFeed
    from torch.cuda.graphs import _POOL_HANDLE
from omni.stages.llm.models.base import CausalLM


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (vLLM's spacing: padding wastes at
    most 7 rows, and the number of graphs stays small)."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def mixed_capture_sizes(max_graph_tokens: int) -> list[int]:
    """Every multiple of EAGER_TOKEN_MULTIPLE up to `max_graph_tokens`: the counts eager steps
    are rounded to already, so a graph computes the very GEMM shapes the eager step would."""
    return list(range(EAGER_TOKEN_MULTIPLE, max_graph_tokens + 1, EAGER_TOKEN_MULTIPLE))


class _Graphs:
    """One family of graphs over shared static inputs: capture once per size, replay."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        attn_backend: str,
        sizes: list[int],
        inputs: StaticStepInputs,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attn_backend = attn_backend
        self.sizes = sizes
        self.inputs = inputs
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0  # how many steps ran as this family's graphs

    def shape(self, size: int) -> GraphShape:
        raise NotImplementedError

    def _forward(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def capture(self, pool: _POOL_HANDLE) -> None:
        # Largest first, so the shared pool is sized by the largest graph and smaller ones fit.
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: Triton compiles and autotunes outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def padded_size(self, count: int) -> int | None:
        for size in self.sizes:
            if size >= count:
                return size
        return None

    def _call_model(self, size: int, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        shape = self.shape(size)
        hidden: torch.Tensor = self.model(
            None if inputs_embeds is not None else self.inputs.token_ids[:size],
            self.inputs.positions[..., :size],
            self.kv_caches,
            self.inputs.meta(shape, self.max_model_len),
            self.attn_backend,
            inputs_embeds=inputs_embeds,
        )
        return hidden


class DecodeGraphs(_Graphs):
    """One graph per decode batch size (capture_sizes): a row per request."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        attn_backend: str,
        max_num_seqs: int,
        table_width: int,
        max_model_len: int,
        device: torch.device,
        position_rows: int = 1,
    ) -> None:
        inputs = StaticStepInputs(
            max_num_seqs, max_num_seqs, position_rows, table_width, device, decode=True
        )
        sizes = capture_sizes(max_num_seqs)
        super().__init__(model, kv_caches, attn_backend, sizes, inputs, max_model_len)

    def shape(self, size: int) -> GraphShape:
        return GraphShape(size, size, decode=True)

    def _forward(self, size: int) -> torch.Tensor:
        return self._call_model(size)

    def run(self, host: HostStepInputs, feed: TokenFeed | None = None) -> torch.Tensor:
        """Replays the graph for a decode-only step; returns hidden states [num_reqs, hidden]."""
        n = host.num_reqs
        size = self.padded_size(n)
        assert size is not None and host.is_decode_only
        self.inputs.load(host, self.shape(size), feed)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][:n]


class MixedGraphs(_Graphs):
    """One graph per rounded token count up to `max_graph_tokens`, for steps with prompt
    tokens (mixed with decode rows or not). The graph starts from the input embeddings, so a
    step's image or audio embeddings are written over them before the replay, as the eager
    path does; its output is the hidden state of each request's last token."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        attn_backend: str,
        max_num_seqs: int,
        max_graph_tokens: int,
        table_width: int,
        max_model_len: int,
        device: torch.device,
        hidden_size: int,
        dtype: torch.dtype,
        position_rows: int = 1,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        inputs = StaticStepInputs(
            max_graph_tokens, max_num_seqs, position_rows, table_width, device, decode=False
        )
        sizes = mixed_capture_sizes(max_graph_tokens)
        super().__init__(model, kv_caches, attn_backend, sizes, inputs, max_model_len)
        self.embeds = torch.zeros((max_graph_tokens, hidden_size), dtype=dtype, device=device)

    def shape(self, size: int) -> GraphShape:
        return GraphShape(size, self.max_num_seqs, decode=False)

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self._call_model(size, inputs_embeds=self.embeds[:size])
        return hidden.index_select(0, self.inputs.logits_indices[: self.max_num_seqs])

    def fits(self, host: HostStepInputs) -> bool:
        return host.num_reqs <= self.max_num_seqs and self.padded_size(host.num_tokens) is not None

    def run(self, host: HostStepInputs, feed: TokenFeed | None = None) -> torch.Tensor:
        """Replays the graph for a step that `fits`; returns the hidden states at its
        logits_indices, [num_reqs, hidden]."""
        size = self.padded_size(host.num_tokens)
        assert size is not None
        self.inputs.load(host, self.shape(size), feed)
        self.embeds[:size].copy_(self.model.embed_tokens(self.inputs.token_ids[:size]))
        for start, rows in host.mm_splices:
            on_device = copy_to_device(rows, self.embeds.device)
            self.embeds[start : start + rows.shape[0]] = on_device.to(self.embeds.dtype)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][: host.num_reqs]
