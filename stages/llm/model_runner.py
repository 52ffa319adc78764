"""Runs scheduler steps on the model: owns the weights, the paged KV cache and CUDA graphs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from omni.stages.contracts.llm import TokenLogprob
from omni.stages.contracts.sampling import SamplingParams
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.cpu_threads import CoreShare
from omni.stages.llm.cuda_graphs import DecodeGraphs, MixedGraphs
from omni.stages.llm.eager_shapes import EAGER_TOKEN_MULTIPLE, warm_up_gemms
from omni.stages.llm.host_to_device import copy_to_device
from omni.stages.llm.kv_cache_sizing import allocate_kv_caches, num_blocks_for_memory
from omni.stages.llm.models.loader import load_model
from omni.stages.llm.parallel.group import SINGLE, TensorParallel, building_with
from omni.stages.llm.parallel.plan import (
    PlanReceiver,
    PlanSender,
    Shutdown,
    host_inputs_of,
    plan_for,
)
from omni.stages.llm.request import Request
from omni.stages.llm.sampler import Sampler, SamplingBatch
from omni.stages.llm.scheduler import SchedulerOutput
from omni.stages.llm.step_inputs import (
    HostStepInputs,
    as_decode_rows,
    build_host_inputs,
    pad_tokens,
    to_device,
)
from omni.stages.llm.structured_output import BitmaskBuffers

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        # An explicit index: set_device and CUDA-graph pools need one.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ModelRunner:
    """Runs steps on one rank's shard of the model. Rank 0 (the only rank of an unsharded
    replica) is given scheduler steps (`launch`); under tensor parallelism it broadcasts each
    step's plan first, and the other ranks run `follow`, which replays the plans."""

    def __init__(
        self,
        config: EngineConfig,
        model_path: str,
        group: TensorParallel = SINGLE,
        plans: PlanSender | None = None,
    ) -> None:
        """`plans`: rank 0's pipes to the other ranks of its group."""
        self.config = config
        self.group = group
        self.plans = plans
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        with building_with(group):
            self.model, self.hf_config = load_model(
                model_path,
                dtype=config.dtype,
                device=self.device,
                load_format=config.load_format,
                # Dummy weights differ by rank: each rank's shard is its own random tensor.
                seed=config.seed + group.rank,
            )
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        self.attn_backend = config.attention_backend or (
            "triton" if self.device.type == "cuda" else "torch"
        )
        self.max_model_len = config.max_model_len or int(
            self.hf_config.get_text_config().max_position_embeddings
        )
        self.block_size = config.block_size
        self.table_width = math.ceil(self.max_model_len / self.block_size)
        self.sampler = Sampler()
        # On the CPU, each step may compute on the cores the other stages leave free.
        self.core_share = (
            CoreShare()
            if config.share_cpu_cores and self.device.type == "cpu" and group.world_size == 1
            else None
        )
        # The last sampled requests and their batch, while reusable (see _reused_batch).
        self._last_batch: tuple[tuple[Request, ...], SamplingBatch] | None = None
        # The logits' width, which grammar bitmasks cover (may exceed the tokenizer's size).
        self.vocab_size = int(self.hf_config.get_text_config().vocab_size)
        self.bitmasks = BitmaskBuffers(self.vocab_size, pin=self.device.type == "cuda")
        # Qwen2-VL-family models rotate by [3, T] M-RoPE positions instead of [T].
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))

        # Every rank must have room for every block rank 0 hands out.
        num_blocks = config.num_kv_blocks or group.min_over_ranks(num_blocks_for_memory(self))
        self.num_kv_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(
            self.model, num_blocks, self.block_size, self.dtype, self.device
        )
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()
        # Eager steps run with their token count rounded up (see pad_tokens), on a GPU only:
        # the CPU has no per-shape kernel choice to amortise.
        self.token_multiple = EAGER_TOKEN_MULTIPLE if self.device.type == "cuda" else 1
        if self.token_multiple > 1:
            graphed = self.mixed_graphs.sizes[-1] if self.mixed_graphs is not None else 0
            warm_up_gemms(
                self.model, config.max_num_batched_tokens, self.token_multiple, above=graphed
            )

    def _capture_graphs(self) -> None:
        config = self.config
        position_rows = 3 if self.uses_mrope else 1
        max_graph_tokens = min(config.max_graph_tokens, config.max_num_batched_tokens)
        if max_graph_tokens >= EAGER_TOKEN_MULTIPLE:
            self.mixed_graphs = MixedGraphs(
                self.model,
                self.kv_caches,
                self.attn_backend,
                config.max_num_seqs,
                max_graph_tokens - max_graph_tokens % EAGER_TOKEN_MULTIPLE,
                self.table_width,
                self.max_model_len,
                self.device,
                hidden_size=int(self.model.geometry.hidden_size),
                dtype=self.dtype,
                position_rows=position_rows,
            )
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.attn_backend,
            config.max_num_seqs,
            self.table_width,
            self.max_model_len,
            self.device,
            position_rows=position_rows,
        )
        # One pool for both families, the largest graph first (the mixed ones are larger).
        pool = torch.cuda.graph_pool_handle()
        if self.mixed_graphs is not None:
            self.mixed_graphs.capture(pool)
            logger.info("captured CUDA graphs for steps of %s tokens", self.mixed_graphs.sizes)
        self.graphs.capture(pool)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.graphs.sizes)

    # ---- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def forward_hidden(self, host: HostStepInputs, feed: TokenFeed | None = None) -> torch.Tensor:
        """Hidden states at each request's last new token: [num_reqs, hidden]."""
        if self.graphs is not None:
            rows = host if host.is_decode_only else as_decode_rows(host)
            if rows is not None and self.graphs.padded_size(rows.num_reqs) is not None:
                hidden = self.graphs.run(rows, feed)
                if rows is host:
                    return hidden
                return hidden[index_tensor(host.logits_indices.tolist(), hidden.device)]
        if self.mixed_graphs is not None and self.mixed_graphs.fits(host):
            return self.mixed_graphs.run(host, feed)
        if self.token_multiple > 1:
            host = pad_tokens(host, self.token_multiple)
        inputs = to_device(host, self.device)
        if feed is not None:
            feed.apply(inputs.token_ids)
        inputs_embeds = None
        if host.mm_splices:
            inputs_embeds = self.model.embed_tokens(inputs.token_ids)
            for start, rows in host.mm_splices:
                on_device = copy_to_device(rows, inputs_embeds.device)
                inputs_embeds[start : start + rows.shape[0]] = on_device.to(inputs_embeds.dtype)
        hidden = self.model(
            None if inputs_embeds is not None else inputs.token_ids,
            inputs.positions,
            self.kv_caches,
            inputs.attn,
            self.attn_backend,
            inputs_embeds=inputs_embeds,
        )
        return hidden[inputs.logits_indices]

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput
    ) -> tuple[list[int | None], list[TokenLogprob | None] | None]:
        """Runs one step; returns per scheduled request its sampled token (None for a prefill
        chunk that has not reached the last known token) and, if asked for, its logprob."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, feed: TokenFeed | None = None) -> LaunchedStep:
        """Queues one step on the device and returns without waiting for it. `feed` supplies
        input tokens that an earlier, still unread step sampled (asynchronous scheduling)."""
        return self.sample(self.launch_forward(out, feed))

    @torch.inference_mode()
    def launch_forward(
        self, out: SchedulerOutput, feed: TokenFeed | None = None
    ) -> ForwardedStep:
        """Queues one step's forward pass and logits, not its sampling: `sample` follows,
        once the host knows what the sampling depends on (the token an earlier step sampled
        decides a grammar's next mask, penalties and min_tokens)."""
        host = build_host_inputs(
            out.scheduled, self.block_size, self.table_width, mrope=self.uses_mrope
        )
        rows = [i for i, s in enumerate(out.scheduled) if s.completes_known_tokens]
        if self.core_share is not None:
            self.core_share.apply()
        if self.plans is not None:
            self._send_plan(host, feed, rows)
        hidden = self.forward_hidden(host, feed)
        step = LaunchedStep(num_scheduled=len(out.scheduled), rows=rows)
        if not rows:
            return ForwardedStep(step, [], None)
        if len(rows) != len(out.scheduled):
            hidden = hidden[index_tensor(rows, hidden.device)]
        requests = [out.scheduled[i].request for i in rows]
        return ForwardedStep(step, requests, self.model.compute_logits(hidden))

    @torch.inference_mode()
    def sample(self, forwarded: ForwardedStep) -> LaunchedStep:
        """Queues the sampling of a forwarded step; the grammar masks are filled on the host
        while the device still runs the forward."""
        step, requests, logits = forwarded.step, forwarded.requests, forwarded.logits
        if logits is None:
            return step
        if all(_plain_greedy(r.sampling_params) for r in requests):
            # Nothing to mask, penalise or report: skip building the sampling batch, whose
            # host-to-device copies are a measurable share of a batch-1 decode step.
            step.set_tokens(logits.argmax(dim=-1))
            return step
        constrained = self.bitmasks.fill([r.grammar for r in requests])
        batch = self._reused_batch(requests)
        if batch is None:
            batch = SamplingBatch.from_params(
                [r.sampling_params for r in requests],
                [r.generator for r in requests],
                self.device,
                # Without the tail that this very step is sampling (asynchronous scheduling
                # holds its place with a pending token).
                output_token_ids=[
                    r.output_token_ids[: r.num_resolved_output_tokens] for r in requests
                ],
                prompt_token_ids=[r.prompt_token_ids for r in requests],
                eos_token_ids=[r.eos_token_ids for r in requests],
            )
            self._last_batch = (tuple(requests), batch) if _batch_is_static(requests) else None
        if constrained is not None:
            batch.grammar_bitmask, batch.grammar_rows = constrained
        sampled = self.sampler(logits, batch)
        step.set_tokens(sampled.token_ids, sampled.logprobs)
        if sampled.top_token_ids is not None:
            step.top_token_ids, step.top_logprobs = sampled.top_token_ids, sampled.top_logprobs
            step.num_top = [r.sampling_params.logprobs or 0 for r in requests]
        return step

    def _reused_batch(self, requests: list[Request]) -> SamplingBatch | None:
        """The previous step's sampling batch when this step samples the very same requests in
        the same order (a steady decode) and nothing in it depends on their outputs: building
        it takes a handful of host-to-device copies, a visible share of a decode step's host
        time at 64 requests. The previous requests are held, so none is a new one at the same
        address."""
        last = self._last_batch
        if last is None or len(last[0]) != len(requests):
            return None
        if any(a is not b for a, b in zip(last[0], requests, strict=True)):
            return None
        return last[1]

    # ---- tensor parallelism ------------------------------------------------------------------

    def _send_plan(self, host: HostStepInputs, feed: TokenFeed | None, rows: list[int]) -> None:
        assert self.plans is not None
        fed = None if feed is None else (feed.dst, feed.src_rows, int(feed.tokens.shape[0]))
        self.plans.send(plan_for(host, self.block_size, fed, rows))
        if feed is not None:
            # The followers have no sampler: they take rank 0's tokens for this step's inputs.
            self.group.broadcast(feed.tokens)

    @torch.inference_mode()
    def follow(self, plans: PlanReceiver) -> str:
        """A follower rank's loop: runs rank 0's step plans until told to stop; returns why."""
        assert not self.group.is_first
        while True:
            plan = plans.receive()
            if isinstance(plan, Shutdown):
                return plan.reason
            feed = None
            if plan.num_fed:
                tokens = torch.empty(plan.num_fed, dtype=torch.int64, device=self.device)
                feed = TokenFeed(plan.feed_dst, plan.feed_src, self.group.broadcast(tokens))
            hidden = self.forward_hidden(host_inputs_of(plan, self.table_width), feed)
            if plan.logit_rows:
                if len(plan.logit_rows) != hidden.shape[0]:
                    hidden = hidden[index_tensor(plan.logit_rows, hidden.device)]
                # Its share of the gather; only rank 0 samples.
                self.model.compute_logits(hidden)



@dataclass
class ForwardedStep:
    """A step whose forward pass is queued and whose tokens are not sampled yet."""

    step: LaunchedStep
    requests: list[Request]  # the requests of step.rows, in order
    logits: torch.Tensor | None  # [len(rows), vocab] on the device; None if no row samples


@dataclass
class TokenFeed:
    """Input tokens still on the device: row `dst[i]` of the step's flattened batch takes the
    token that an earlier step sampled in its row `src_rows[i]` (of `tokens`)."""

    dst: list[int]
    src_rows: list[int]
    tokens: torch.Tensor

    def apply(self, token_ids: torch.Tensor) -> None:
        device = token_ids.device
        dst, src = index_tensor(self.dst, device), index_tensor(self.src_rows, device)
        self.apply_at(token_ids, dst, src)

    def apply_at(self, token_ids: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> None:
        """`apply` with `dst` and `src_rows` already on the device (the decode graphs stage
        them with their other inputs)."""
        token_ids.index_copy_(0, dst, self.tokens[src])


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on `device`, without waiting for the device."""
    return copy_to_device(torch.tensor(values, dtype=torch.int64), device)


@dataclass
class LaunchedStep:
    """A step queued on the device. Its sampled tokens are copied to the host without blocking;
    `result()` waits for them."""

    num_scheduled: int
    rows: list[int]  # indices into the step's scheduled requests that sampled a token
    tokens: torch.Tensor | None = None  # int64 [len(rows)] on the device
    logprobs: torch.Tensor | None = None
    # [len(rows), K]: the best K alternatives, of which row j reports its first num_top[j].
    top_token_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    num_top: list[int] | None = None
    _host_tokens: torch.Tensor | None = None
    _ready: torch.cuda.Event | None = None

    def set_tokens(self, tokens: torch.Tensor, logprobs: torch.Tensor | None = None) -> None:
        self.tokens, self.logprobs = tokens, logprobs
        if tokens.is_cuda:
            self._host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host_tokens.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self) -> tuple[list[int | None], list[TokenLogprob | None] | None]:
        tokens: list[int | None] = [None] * self.num_scheduled
        if self.tokens is None:
            return tokens, None
        if self._ready is not None and self._host_tokens is not None:
            self._ready.synchronize()
            token_list = self._host_tokens.tolist()
        else:
            token_list = self.tokens.tolist()
        for j, i in enumerate(self.rows):
            tokens[i] = token_list[j]
        if self.logprobs is None:
            return tokens, None
        logprobs: list[TokenLogprob | None] = [None] * self.num_scheduled
        values = self.logprobs.tolist()
        if self.top_token_ids is None or self.top_logprobs is None or self.num_top is None:
            for j, value in enumerate(values):
                logprobs[self.rows[j]] = TokenLogprob(value)
            return tokens, logprobs
        top_ids, top_values = self.top_token_ids.tolist(), self.top_logprobs.tolist()
        for j, (value, k) in enumerate(zip(values, self.num_top, strict=True)):
            logprobs[self.rows[j]] = TokenLogprob(value, top_ids[j][:k], top_values[j][:k])
        return tokens, logprobs


def _batch_is_static(requests: list[Request]) -> bool:
    """Whether these requests' sampling batch stays valid from step to step: no grammar (its
    mask follows the last token), no penalties and no min_tokens (they read the outputs)."""
    return all(
        r.grammar is None and not r.sampling_params.has_penalties
        and r.sampling_params.min_tokens == 0
        for r in requests
    )


def _plain_greedy(params: SamplingParams) -> bool:
    return (
        params.is_greedy
        and params.logprobs is None
        and not params.has_penalties
        and params.min_tokens == 0
        and not params.logit_bias
        and params.structured_outputs is None
    )
