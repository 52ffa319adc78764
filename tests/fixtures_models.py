"""Tiny random-weight checkpoints (Llama, Qwen2, Qwen3) with a real tokenizer, built offline.

`make_tiny_checkpoint("qwen2", tmp_path)` writes config.json, safetensors and a byte-level BPE
tokenizer (trained here with the `tokenizers` library, with a ChatML chat template) into a
folder that both transformers and omni's loader read. Everything is seeded: the same call
gives the same bytes.

`PagedRequest`, `build_meta`, `new_caches` and `greedy_native` drive a native model over a
paged KV cache by hand, the way the model runner does, for tests that compare against
transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omni.stages.llm.attention import AttentionMetadata
from omni.stages.llm.models import CausalLM

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "deepseek_v2")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A fixed corpus so the trained merges (and thus token ids) never change.
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "A paged attention kernel reads keys and values from fixed-size blocks.",
    "Encoders turn images and audio into embeddings; the language model reads them.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { }",
    "Hello, world! How are you today? I am fine, thank you.",
] * 4
TOKENIZER_VOCAB_SIZE = 384
# Paged-cache geometry for driving a native model by hand (small blocks: prompts span several).
BLOCK_SIZE = 4
NUM_BLOCKS = 16


def build_tokenizer(
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
    special_tokens: list[str] = SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
    corpus: list[str] | None = None,
) -> Any:
    """A byte-level BPE fast tokenizer trained offline on a small corpus, with ChatML special
    tokens (ids 0, 1, ... in the order given) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus or _CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A 2-layer, hidden-64, GQA (4 query / 2 KV heads) config of the given family (the
    mixture-of-experts ones: 8 experts, 2 or 3 per token, and a dense layer beside the sparse
    ones where the family has them)."""
    from transformers import (
        DeepseekV2Config,
        LlamaConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    config: Any
    if arch == "llama":
        config = LlamaConfig(**{**common, **overrides})
    elif arch == "qwen2":
        config = Qwen2Config(**{**common, **overrides})
    elif arch == "qwen3":
        # An explicit head_dim that differs from hidden / heads (16), as real Qwen3 has.
        config = Qwen3Config(**{**common, "head_dim": 32, **overrides})
    elif arch == "qwen3_moe":
        # Qwen3-30B-A3B's shape in miniature: renormalised top-k, an explicit head_dim; the
        # middle of three layers is dense (mlp_only_layers) so both kinds are exercised.
        moe = {
            "head_dim": 32,
            "num_hidden_layers": 3,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        }
        config = Qwen3MoeConfig(**{**common, **moe, **overrides})
    elif arch == "qwen2_moe":
        # A shared expert behind a sigmoid gate, plain (not renormalised) top-k weights.
        moe = {
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": False,
        }
        config = Qwen2MoeConfig(**{**common, **moe, **overrides})
    elif arch == "deepseek_v2":
        # DeepSeek-V2-Lite's shape in miniature: MLA without a q compression (q_lora_rank
        # None), a dense first layer, two shared experts, group-limited greedy routing over 4
        # groups of 2 experts, scaled weights.
        mla = {
            "num_key_value_heads": 4,
            "q_lora_rank": None,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "first_k_dense_replace": 1,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 2,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 1.5,
        }
        config = DeepseekV2Config(**{**common, **mla, **overrides})
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    return config


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise in every parameter: norm weights near 1, embeddings at unit scale, the
    rest small. Norms and biases are random too (transformers would start those at 1 and 0,
    which would hide a mis-mapped norm or bias)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                param.copy_(0.08 * noise)


def load_reference(model_class: Any, folder: str | Path) -> Any:
    """transformers' model of `model_class` on a folder, fp32, eager attention, eval mode:
    what omni's outputs are compared against."""
    model = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def make_tiny_checkpoint(
    arch: str,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint plus tokenizer into `path`; returns the folder.

    Every parameter is random, norms and biases included (transformers would start those at
    1 and 0, which would hide a mis-mapped norm or bias).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    vocab_size = config_overrides.pop("vocab_size", len(tokenizer))  # may exceed the tokenizer's
    config = tiny_config(arch, vocab_size, **config_overrides)
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    return save_random_model(
        path,
        lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32),
        tokenizer,
        seed,
        dtype,
        **kwargs,
    )


def save_random_model(
    path: str | Path,
    make_model: Callable[[], Any],
    companion: Any,
    seed: int,
    dtype: torch.dtype = torch.float32,
    **save_kwargs: Any,
) -> Path:
    """`make_model()` built under `seed`, every parameter randomized (in float32), then saved
    in `dtype` into `path` with `companion` (its tokenizer or processor); returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = make_model()
    randomize_parameters(model, seed)
    model.to(dtype).save_pretrained(folder, **save_kwargs)
    companion.save_pretrained(folder)
    return folder


# ---- driving a native model over a paged cache, as the runner would -----------------------


@dataclass
class PagedRequest:
    """One request's view of the paged cache: its block ids and how many tokens it holds."""

    block_ids: list[int]
    num_cached: int = 0


def build_meta(
    requests: list[PagedRequest], query_lens: list[int], device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for a step in which request i adds query_lens[i] tokens after its cached ones."""
    starts, seq_lens, slots = [0], [], []
    for req, q_len in zip(requests, query_lens, strict=True):
        starts.append(starts[-1] + q_len)
        seq_lens.append(req.num_cached + q_len)
        for pos in range(req.num_cached, req.num_cached + q_len):
            slots.append(req.block_ids[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        req.num_cached += q_len
    width = max(len(r.block_ids) for r in requests)
    tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r in requests]
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        is_decode_only=all(q == 1 for q in query_lens),
    )


def new_caches(model: CausalLM, num_blocks: int = NUM_BLOCKS) -> list[torch.Tensor]:
    spec = model.kv_cache_spec
    shape = spec.layer_shape(num_blocks, BLOCK_SIZE)
    device = model.model.embed_tokens.weight.device
    return [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(spec.num_layers)]


def greedy_native(
    model: CausalLM, prompt_ids: list[int], max_new_tokens: int, backend: str = "torch"
) -> list[int]:
    """Greedy continuation with a native model: one prefill step, then one-token decode steps
    over a paged cache whose blocks are deliberately not in order."""
    total = len(prompt_ids) + max_new_tokens
    num_blocks = -(-total // BLOCK_SIZE)
    request = PagedRequest(block_ids=list(range(num_blocks, 0, -1)))
    caches = new_caches(model, num_blocks + 1)
    device = caches[0].device
    step_ids, start, out = list(prompt_ids), 0, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            meta = build_meta([request], [len(step_ids)], device)
            positions = torch.arange(start, start + len(step_ids), device=device)
            hidden = model(torch.tensor(step_ids, device=device), positions, caches, meta, backend)
            token = int(model.compute_logits(hidden[-1:])[0].argmax())
            out.append(token)
            start += len(step_ids)
            step_ids = [token]
    return out


def step_hidden_states(llm: Any, host: Any) -> torch.Tensor:
    """Runs one step's host inputs (step_inputs.HostStepInputs) eagerly on `llm`'s model and
    cache; returns the hidden states at its logits_indices rows."""
    from omni.stages.llm.step_inputs import to_device

    runner = llm.engine.runner
    inputs = to_device(host, runner.device)
    hidden = runner.model(
        inputs.token_ids, inputs.positions, runner.kv_caches, inputs.attn, runner.attn_backend
    )
    return hidden[inputs.logits_indices]
