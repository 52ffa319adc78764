"""Native Llama / Qwen2 / Qwen3 against transformers on the same tiny random weights.

The paged attention used here is a small reference written in this file (write K/V at the
slot mapping, gather each request's context through its block table, causal softmax), so these
tests pin the model definitions independently of the attention backends; one test also runs
the real `torch` backend end to end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import omni.stages.llm.models.base as model_base
import pytest
import torch
from fixtures_models import BLOCK_SIZE, PagedRequest, build_meta, make_tiny_checkpoint, new_caches
from omni.stages.llm.attention import AttentionMetadata
from omni.stages.llm.models import get_model_class, load_model, supported_architectures
from omni.stages.llm.models.layers import compute_inv_freq
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The capital of France is Paris. The quick brown fox"


def reference_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Paged attention written for clarity: one request and one head group at a time."""
    assert backend == "reference"
    block_size = kv_cache.shape[2]
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    valid = meta.slot_mapping >= 0
    flat[0, meta.slot_mapping[valid]] = key[valid]
    flat[1, meta.slot_mapping[valid]] = value[valid]
    out = torch.zeros_like(query)
    group = query.shape[1] // key.shape[1]
    for r in range(meta.num_reqs):
        start, end = int(meta.query_start_loc[r]), int(meta.query_start_loc[r + 1])
        seq_len = int(meta.seq_lens[r])
        positions = torch.arange(seq_len)
        slots = meta.block_tables[r, positions // block_size].long() * block_size
        slots = slots + positions % block_size
        keys = flat[0, slots].repeat_interleave(group, dim=1)  # [S, H, D]
        values = flat[1, slots].repeat_interleave(group, dim=1)
        q = query[start:end]  # [Q, H, D]
        q_positions = torch.arange(seq_len - (end - start), seq_len)
        scores = torch.einsum("qhd,shd->hqs", q.float(), keys.float()) * scale
        causal = positions[None, :] > q_positions[:, None]
        scores = scores.masked_fill(causal[None], float("-inf"))
        probs = scores.softmax(-1)
        out[start:end] = torch.einsum("hqs,shd->qhd", probs, values.float()).to(query.dtype)
    return out


@pytest.fixture
def reference_attention(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(model_base, "attend", reference_attend)
    return "reference"


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    # Llama 3.1 rope scaling plus tied embeddings (SmolLM2 ties them too).
    "llama3-rope-tied": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        case: make_tiny_checkpoint(arch, root / case, **overrides)
        for case, (arch, overrides) in CASES.items()
    }


def hf_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_paged_decode_match_transformers(
    case: str, checkpoints: dict[str, Path], reference_attention: str
) -> None:
    path = checkpoints[case]
    hf_model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model, config = load_model(str(path), dtype="float32")
    assert type(model).__name__ == config.architectures[0]
    ids = AutoTokenizer.from_pretrained(path)(PROMPT).input_ids
    assert len(ids) > 2 * BLOCK_SIZE  # the prompt spans several (scattered) blocks

    caches = new_caches(model)
    request = PagedRequest(block_ids=[9, 3, 12, 5, 1, 14, 7])
    with torch.no_grad():
        meta = build_meta([request], [len(ids)])
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), caches, meta, reference_attention)
        logits = model.compute_logits(hidden)
    expected = hf_logits(hf_model, ids)
    assert logits.dtype == torch.float32
    assert logits.shape == (len(ids), config.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))

    # Greedy decode, one token a step, reading the prompt's K/V back from the paged cache.
    tokens = list(ids)
    next_token = int(logits[-1].argmax())
    for _ in range(4):
        tokens.append(next_token)
        with torch.no_grad():
            meta = build_meta([request], [1])
            hidden = model(
                torch.tensor([next_token]),
                torch.tensor([len(tokens) - 1]),
                caches,
                meta,
                reference_attention,
            )
            step_logits = model.compute_logits(hidden)[0]
        expected_last = hf_logits(hf_model, tokens)[-1]
        torch.testing.assert_close(step_logits, expected_last, atol=1e-5, rtol=1e-5)
        assert int(step_logits.argmax()) == int(expected_last.argmax())
        next_token = int(step_logits.argmax())


def test_mixed_batch_chunked_prefill_and_decode(
    checkpoints: dict[str, Path], reference_attention: str
) -> None:
    """One flattened step: request A prefills the second chunk of its prompt while request B
    decodes; each row must equal what transformers gives for that request alone."""
    path = checkpoints["qwen2"]
    hf_model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model, _ = load_model(str(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids_a = tokenizer(PROMPT).input_ids
    ids_b = tokenizer("Hello, world! How are you").input_ids
    caches = new_caches(model)
    req_a, req_b = PagedRequest([2, 8, 4, 11, 15]), PagedRequest([6, 13, 10])
    split = 5
    with torch.no_grad():
        # Step 1: A's first chunk and B's whole prompt but its last token.
        meta = build_meta([req_a, req_b], [split, len(ids_b) - 1])
        model(
            torch.tensor(ids_a[:split] + ids_b[:-1]),
            torch.tensor(list(range(split)) + list(range(len(ids_b) - 1))),
            caches,
            meta,
            reference_attention,
        )
        # Step 2: the rest of A's prompt, and B's last token as a one-token "decode".
        meta = build_meta([req_a, req_b], [len(ids_a) - split, 1])
        hidden = model(
            torch.tensor(ids_a[split:] + ids_b[-1:]),
            torch.tensor([*range(split, len(ids_a)), len(ids_b) - 1]),
            caches,
            meta,
            reference_attention,
        )
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(
        logits[:-1], hf_logits(hf_model, ids_a)[split:], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(logits[-1], hf_logits(hf_model, ids_b)[-1], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equals_input_ids(
    checkpoints: dict[str, Path], reference_attention: str
) -> None:
    model, _ = load_model(str(checkpoints["qwen3"]))
    ids = torch.tensor([5, 17, 42, 99, 7])
    with torch.no_grad():
        by_ids = model(
            ids,
            torch.arange(5),
            new_caches(model),
            build_meta([PagedRequest([3, 4])], [5]),
            reference_attention,
        )
        embeds = model.embed_tokens(ids)
        by_embeds = model(
            None,
            torch.arange(5),
            new_caches(model),
            build_meta([PagedRequest([3, 4])], [5]),
            reference_attention,
            inputs_embeds=embeds,
        )
    assert embeds.shape == (5, 64)
    assert torch.equal(by_ids, by_embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(
            ids,
            torch.arange(5),
            new_caches(model),
            build_meta([PagedRequest([3, 4])], [5]),
            reference_attention,
            inputs_embeds=embeds,
        )
    with pytest.raises(ValueError, match="got 1 KV cache tensors; the model has 2 layers"):
        model(
            ids,
            torch.arange(5),
            new_caches(model)[:1],
            build_meta([PagedRequest([3, 4])], [5]),
            reference_attention,
        )


def test_real_torch_attention_backend_matches_transformers(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llama"]
    hf_model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model, _ = load_model(str(path))
    ids = AutoTokenizer.from_pretrained(path)(PROMPT).input_ids
    caches = new_caches(model)
    request = PagedRequest([9, 3, 12, 5, 1, 14, 7])
    with torch.no_grad():
        hidden = model(
            torch.tensor(ids),
            torch.arange(len(ids)),
            caches,
            build_meta([request], [len(ids)]),
            "torch",
        )
        next_token = int(model.compute_logits(hidden)[-1].argmax())
        hidden = model(
            torch.tensor([next_token]),
            torch.tensor([len(ids)]),
            caches,
            build_meta([request], [1]),
            "torch",
        )
        step_logits = model.compute_logits(hidden)[0]
    expected = hf_logits(hf_model, [*ids, next_token])[-1]
    torch.testing.assert_close(step_logits, expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_spec_follows_config(checkpoints: dict[str, Path]) -> None:
    qwen3, _ = load_model(str(checkpoints["qwen3"]), load_format="dummy")
    spec = qwen3.kv_cache_spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 32)
    assert (qwen3.num_layers, qwen3.num_kv_heads, qwen3.head_dim) == (2, 2, 32)
    llama, _ = load_model(str(checkpoints["llama"]), load_format="dummy")
    assert llama.kv_cache_spec.head_dim == 16  # hidden 64 / 4 heads


def test_registry_rejects_unknown_architecture() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(architectures=["MambaForCausalLM"])
    with pytest.raises(ValueError, match="'MambaForCausalLM' is not supported") as info:
        get_model_class(config)
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(info.value)
    assert supported_architectures() == [
        "DeepseekV2ForCausalLM",
        "LlamaForCausalLM",
        "Qwen2AudioForConditionalGeneration",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    ]


def test_rope_tables_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    ours, scale = compute_inv_freq(llama3, 64)
    theirs, their_scale = ROPE_INIT_FUNCTIONS["llama3"](llama3, None)
    assert torch.equal(ours, theirs)
    assert scale == their_scale == 1.0
    linear = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    )
    ours, _ = compute_inv_freq(linear, 64)
    theirs, _ = ROPE_INIT_FUNCTIONS["linear"](linear, None)
    assert torch.equal(ours, theirs)
    yarn = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )
    ours, scale = compute_inv_freq(yarn, 64)
    theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](yarn, None)
    assert torch.equal(ours, theirs)
    assert scale == their_scale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    dynamic = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    )
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        compute_inv_freq(dynamic, 64)


def test_sliding_window_config_is_rejected(tmp_path: Path) -> None:
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        architectures=["Qwen2ForCausalLM"],
    )
    with pytest.raises(ValueError, match=r"layers \[1\] use 'sliding_attention'"):
        get_model_class(config)(config, torch.float32)
