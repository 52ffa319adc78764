"""Engine configuration: one frozen dataclass whose fields are the launch flags of the LLM stage."""

from __future__ import annotations

from dataclasses import dataclass

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_BACKENDS = (None, "torch", "triton")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    # Tokenizer folder or hub id; defaults to the model's own.
    tokenizer: str | None = None
    # True runs without a tokenizer: prompts must be token ids and outputs carry no text
    # (benchmarks of architectures whose checkpoints ship no tokenizer).
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    # "auto" picks cuda when a GPU is visible, else cpu.
    device: str = "auto"
    # "dummy" gives random weights at the checkpoint's size: benchmarks of full-size
    # architectures without downloading them.
    load_format: str = "auto"
    seed: int = 0
    # Tokens per KV block. 16 matches vLLM's default: small enough that prefix hits are
    # fine-grained, large enough that block-table overhead stays negligible.
    block_size: int = 16
    # Explicit KV block count; None sizes the cache from memory (the fraction below on a GPU,
    # cpu_kv_cache_gib on the CPU).
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    # Continuous batching limits: sequences in flight and tokens per forward pass. The token
    # budget is what chunks long prefills so decodes keep flowing.
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # None uses the model's max_position_embeddings.
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # True skips CUDA-graph capture (debugging, or when start-up time matters more).
    enforce_eager: bool = False
    # Steps with prompt tokens up to this many tokens (rounded up to a multiple of 64) replay
    # a captured graph too (cuda_graphs.MixedGraphs); 0 captures decode steps only. Serving
    # Qwen2.5-VL-7B image chats on an H200, 2048 gave 39.8 req/s against 37.6 with 1024
    # (docs/benchmarks.md); each graph costs start-up time and its share of a memory pool.
    max_graph_tokens: int = 2048
    # None picks "triton" on CUDA and "torch" elsewhere.
    attention_backend: str | None = None
    # Schedule and launch step N+1 before step N's sampled tokens reach the host (they are fed
    # to N+1 on the device), hiding the host's per-step work behind the GPU's. Steps fall back
    # to synchronous while a running request uses penalties or min_tokens, which read the
    # output tokens on the host, or structured output, whose next mask needs the last token.
    # On by default: on an H100 it took Qwen2.5-7B-size batch-1 decode from 1.31x to 1.25x its
    # floor and throughput from 67% to 75% of its floor (docs/benchmarks.md); greedy tokens
    # are the same either way.
    async_scheduling: bool = True
    # On the CPU, run each step on the cores that no other runnable thread holds, at most the
    # process's thread count (cpu_threads.CoreShare). The LLM stage turns it on, as it shares
    # the machine with the pipeline's other stages; off, the offline engine's arithmetic does
    # not depend on what else the machine runs (a GEMM may round differently on 1 thread).
    share_cpu_cores: bool = False
    # Processes (one device each) that one replica's model is sharded over, with
    # torch.distributed: NCCL on GPUs, gloo on the CPU. `device` then names every rank's
    # device (`cuda:0,cuda:1`) or the first of consecutive ones (`cuda:2`: cuda:2, cuda:3, ...).
    tensor_parallel_size: int = 1
    # Mixture-of-experts layers: whole experts split across the ranks instead of every
    # expert's intermediate features (vLLM's --enable-expert-parallel).
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a local folder or a hub id")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}"
            )
        if self.attention_backend not in _BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be at least 2, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"cpu_kv_cache_gib must be positive, got {self.cpu_kv_cache_gib}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_graph_tokens < 0:
            raise ValueError(f"max_graph_tokens must be 0 or more, got {self.max_graph_tokens}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
