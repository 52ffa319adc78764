"""Runs scheduler steps on the model: owns the weights, the paged KV cache and CUDA graphs."""

from __future__ import annotations

import logging
import math

import torch
from omni.stages.llm.config import EngineConfig
from omni.stages.llm.cuda_graphs import DecodeGraphs
from omni.stages.llm.kv_cache_sizing import allocate_kv_caches, num_blocks_for_memory
from omni.stages.llm.models.loader import load_model
from omni.stages.llm.sampler import Sampler, SamplingBatch
from omni.stages.llm.sampling_params import SamplingParams
from omni.stages.llm.scheduler import SchedulerOutput
from omni.stages.llm.step_inputs import HostStepInputs, build_host_inputs, to_device

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
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        self.model, self.hf_config = load_model(
            model_path,
            dtype=config.dtype,
            device=self.device,
            load_format=config.load_format,
            seed=config.seed,
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
        # Qwen2-VL-family models rotate by [3, T] M-RoPE positions instead of [T].
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))

        num_blocks = config.num_kv_blocks or num_blocks_for_memory(self)
        self.num_kv_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(
            self.model, num_blocks, self.block_size, self.dtype, self.device
        )
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.attn_backend,
                config.max_num_seqs,
                self.table_width,
                self.max_model_len,
                self.device,
                position_rows=3 if self.uses_mrope else 1,
            )
            self.graphs.capture()
            logger.info("captured CUDA graphs for decode batch sizes %s", self.graphs.sizes)

    # ---- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def forward_hidden(self, host: HostStepInputs) -> torch.Tensor:
        """Hidden states at each request's last new token: [num_reqs, hidden]."""
        if (
            self.graphs is not None
            and host.is_decode_only
            and self.graphs.padded_size(host.num_reqs) is not None
        ):
            return self.graphs.run(host)
        inputs = to_device(host, self.device)
        inputs_embeds = None
        if host.mm_splices:
            inputs_embeds = self.model.embed_tokens(inputs.token_ids)
            for start, rows in host.mm_splices:
                inputs_embeds[start : start + rows.shape[0]] = rows.to(
                    inputs_embeds.device, inputs_embeds.dtype
                )
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
    def execute(self, out: SchedulerOutput) -> tuple[list[int | None], list[float | None] | None]:
        """Runs one step; returns per scheduled request its sampled token (None for a prefill
        chunk that has not reached the last known token) and, if asked for, its logprob."""
        host = build_host_inputs(
            out.scheduled, self.block_size, self.table_width, mrope=self.uses_mrope
        )
        hidden = self.forward_hidden(host)
        rows = [i for i, s in enumerate(out.scheduled) if s.completes_known_tokens]
        tokens: list[int | None] = [None] * len(out.scheduled)
        if not rows:
            return tokens, None
        if len(rows) != len(out.scheduled):
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        logits = self.model.compute_logits(hidden)
        requests = [out.scheduled[i].request for i in rows]
        if all(_plain_greedy(r.sampling_params) for r in requests):
            # Nothing to mask, penalise or report: skip building the sampling batch, whose
            # host-to-device copies are a measurable share of a batch-1 decode step.
            token_list = logits.argmax(dim=-1).tolist()
            for j, i in enumerate(rows):
                tokens[i] = token_list[j]
            return tokens, None
        batch = SamplingBatch.from_params(
            [r.sampling_params for r in requests],
            [r.generator for r in requests],
            self.device,
            output_token_ids=[r.output_token_ids for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            eos_token_ids=[r.eos_token_ids for r in requests],
        )
        sampled = self.sampler(logits, batch)
        token_list = sampled.token_ids.tolist()
        logprob_list = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        logprobs: list[float | None] | None = None
        if logprob_list is not None:
            logprobs = [None] * len(out.scheduled)
        for j, i in enumerate(rows):
            tokens[i] = token_list[j]
            if logprobs is not None and logprob_list is not None:
                logprobs[i] = logprob_list[j]
        return tokens, logprobs


def _plain_greedy(params: SamplingParams) -> bool:
    return (
        params.is_greedy
        and params.logprobs is None
        and not params.has_penalties
        and params.min_tokens == 0
    )
