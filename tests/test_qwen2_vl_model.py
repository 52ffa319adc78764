"""The native Qwen2.5-VL language model (M-RoPE) against transformers on a tiny checkpoint.

Both models get the same `inputs_embeds` (token embeddings with transformers' image features
spliced in) and the same 3-row positions (transformers' `get_rope_index`); the native one runs
over a paged cache whose blocks are out of order, with the torch attention backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_models import PagedRequest, build_meta, new_caches
from fixtures_vl import (
    IMAGE_TOKEN_ID,
    build_vl_processor,
    load_reference_vl,
    make_tiny_qwen2_5_vl,
    noise_image,
    tiny_vl_config,
)
from omni.stages.encoders.vision import VisionEncoder
from omni.stages.kernels.fused_ops import apply_rotary_torch
from omni.stages.llm.models import loader, mrope
from omni.stages.llm.models.mrope import MRotaryEmbedding, mrope_qk_triton_
from omni.stages.llm.models.qwen2_vl import Qwen2VLForCausalLM
from omni.stages.llm.models.registry import get_model_class
from safetensors.torch import load_file, save_file

from omni.multimodal import Qwen2VLPromptProcessor, decode_mrope_positions, prepare_qwen2_vl_prompt

NUM_DECODE_STEPS = 3
# The Triton M-RoPE kernel runs on the CPU under Triton's interpreter, which must be switched on
# before triton is first imported: those tests (test_interpreter_*) run in a child pytest.
IN_INTERPRETER_CHILD = os.environ.get("OMNI_TRITON_INTERPRETER_CHILD") == "1"
in_child_only = pytest.mark.skipif(
    not IN_INTERPRETER_CHILD, reason="runs in the TRITON_INTERPRET=1 child process"
)
NUM_INTERPRETER_TESTS = 3


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def reference(vl_folder: Path) -> Any:
    return load_reference_vl(vl_folder)


def _prompt_inputs(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    processor = build_vl_processor(AutoTokenizer.from_pretrained(folder))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image"},
                {"type": "text", "text": "and"},
                {"type": "image"},
                {"type": "text", "text": "briefly."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [noise_image(84, 56, seed=1), noise_image(56, 112, seed=2)]
    return dict(processor(text=[text], images=images, return_tensors="pt"))


def test_registry_maps_both_vl_architectures() -> None:
    for name in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        config = type("Config", (), {"architectures": [name]})()
        assert get_model_class(config) is Qwen2VLForCausalLM
    assert Qwen2VLForCausalLM.uses_mrope
    assert not getattr(
        get_model_class(type("C", (), {"architectures": ["Qwen2ForCausalLM"]})()),
        "uses_mrope",
        False,
    )


def test_mrope_equals_1d_rotary_when_rows_agree(vl_folder: Path) -> None:
    native, _ = loader.load_model(str(vl_folder), dtype="float32")
    rotary = native.model.rotary_emb
    assert isinstance(rotary, MRotaryEmbedding)
    assert rotary.row_of_freq.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    text_positions = torch.tensor([0, 3, 7, 100])
    one_row = rotary(text_positions, torch.float32).cos_sin
    three_rows = rotary(text_positions.expand(3, -1), torch.float32).cos_sin
    assert one_row is not None and three_rows is not None
    assert torch.equal(one_row[0], three_rows[0]) and torch.equal(one_row[1], three_rows[1])
    # Rows that disagree select per section: frequency 0 reads row 0, 2 row 1, 7 row 2.
    positions = torch.tensor([[5], [11], [13]])
    cos, _ = rotary(positions, torch.float32).cos_sin
    inv_freq = rotary.inv_freq
    expected = [(0, 5), (2, 11), (7, 13)]
    for freq, pos in expected:
        assert cos[0, 0, freq].item() == torch.cos(torch.tensor(float(pos)) * inv_freq[freq]).item()
    with pytest.raises(ValueError, match=r"\[3, T\] or \[T\]"):
        rotary(torch.zeros(2, 4, dtype=torch.long), torch.float32)


def test_prefill_and_decode_logits_match_transformers(vl_folder: Path, reference: Any) -> None:
    inputs = _prompt_inputs(vl_folder)
    input_ids = inputs["input_ids"]
    assert int((input_ids == IMAGE_TOKEN_ID).sum()) == 6 + 8
    with torch.no_grad():
        features = reference.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
        embeds = reference.model.get_input_embeddings()(input_ids)
        mask = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, torch.cat(features))
        positions, delta = reference.model.get_rope_index(
            input_ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
        )
    prompt_len = input_ids.shape[1]
    # The images make the 3-row positions differ from 1-D ones (the test would be vacuous else).
    assert not torch.equal(positions[0, 0], positions[1, 0])
    assert int(delta) < 0

    native, _ = loader.load_model(str(vl_folder), dtype="float32")
    assert isinstance(native, Qwen2VLForCausalLM)
    total = prompt_len + NUM_DECODE_STEPS
    num_blocks = -(-total // 4)
    request = PagedRequest(block_ids=list(range(num_blocks, 0, -1)))
    caches = new_caches(native, num_blocks + 1)

    with torch.no_grad():
        ref_out = reference(
            inputs_embeds=embeds, position_ids=positions, use_cache=True, return_dict=True
        )
        meta = build_meta([request], [prompt_len])
        hidden = native(None, positions[:, 0], caches, meta, "torch", inputs_embeds=embeds[0])
        native_logits = native.compute_logits(hidden)
        torch.testing.assert_close(native_logits, ref_out.logits[0], rtol=0, atol=2e-5)

        past, last_pos = ref_out.past_key_values, int(positions.max())
        token = int(ref_out.logits[0, -1].argmax())
        for step in range(1, NUM_DECODE_STEPS + 1):
            last_pos += 1
            step_positions = torch.full((3, 1, 1), last_pos, dtype=torch.long)
            # Decode positions are the token's text position plus the prompt's M-RoPE delta.
            assert last_pos == prompt_len - 1 + step + int(delta)
            step_embeds = reference.model.get_input_embeddings()(torch.tensor([[token]]))
            ref_out = reference(
                inputs_embeds=step_embeds,
                position_ids=step_positions,
                past_key_values=past,
                use_cache=True,
                return_dict=True,
            )
            past = ref_out.past_key_values
            meta = build_meta([request], [1])
            hidden = native(torch.tensor([token]), step_positions[:, 0], caches, meta, "torch")
            torch.testing.assert_close(
                native.compute_logits(hidden), ref_out.logits[0], rtol=0, atol=2e-5
            )
            token = int(ref_out.logits[0, -1].argmax())


def test_loader_skips_vision_tensors_but_reports_missing_language_ones(
    vl_folder: Path, tmp_path: Path
) -> None:
    tensors = load_file(str(vl_folder / "model.safetensors"))
    assert any(name.startswith("visual.") for name in tensors)
    # transformers 5 module names (model.language_model.*, model.visual.*) load the same.
    renamed = {
        name.replace("model.", "model.language_model.", 1)
        if name.startswith("model.")
        else "model." + name
        if name.startswith("visual.")
        else name: tensor
        for name, tensor in tensors.items()
    }
    for file in vl_folder.iterdir():
        if file.suffix == ".json":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    save_file(renamed, str(tmp_path / "model.safetensors"))
    original, _ = loader.load_model(str(vl_folder), dtype="float32")
    renamed_model, _ = loader.load_model(str(tmp_path), dtype="float32")
    for (name, a), (_, b) in zip(
        original.named_parameters(), renamed_model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name

    # Missing language-model tensors still fail the load (the vision ones are never needed).
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors = {name: t for name, t in tensors.items() if not name.startswith("visual.blocks.1")}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"missing 1 tensor\(s\) the model needs: model\.layers\.1\.self_attn\.k_proj",
    ):
        loader.load_model(str(tmp_path), dtype="float32")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_pipeline_greedy_tokens_match_transformers_generate(
    vl_folder: Path, reference: Any, device: str
) -> None:
    """Prompt processing, the vision encoder and the native model together, with the prompt
    prefilled in two chunks split inside an image, give transformers' greedy tokens. On a GPU
    (skipped elsewhere) this runs the fused kernels (M-RoPE included) and Triton attention
    against transformers on the same GPU, in float32."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image", "image": noise_image(84, 56, seed=1)},
                {"type": "text", "text": "and"},
                {"type": "image", "image": noise_image(56, 112, seed=2)},
                {"type": "text", "text": "briefly."},
            ],
        }
    ]
    hf_model = reference if device == "cpu" else load_reference_vl(vl_folder).to(device)
    with torch.no_grad():
        hf_inputs = {name: t.to(device) for name, t in _prompt_inputs(vl_folder).items()}
        expected = hf_model.generate(**hf_inputs, max_new_tokens=8, do_sample=False)[0].tolist()

    prompt = prepare_qwen2_vl_prompt(
        Qwen2VLPromptProcessor.from_pretrained(str(vl_folder)), messages=messages
    )
    prompt_len = len(prompt.prompt_token_ids)
    assert expected[:prompt_len] == prompt.prompt_token_ids
    expected_new = expected[prompt_len:]
    assert prompt.pixel_values is not None and prompt.image_grid_thw is not None
    image_embeds = VisionEncoder.from_pretrained(str(vl_folder), device=device).encode(
        prompt.pixel_values, prompt.image_grid_thw
    )

    native, _ = loader.load_model(str(vl_folder), dtype="float32", device=device)
    backend = "torch" if device == "cpu" else "triton"
    with torch.no_grad():
        embeds = native.embed_tokens(torch.tensor(prompt.prompt_token_ids, device=device))
        row = 0
        for placeholder in prompt.placeholders:
            embeds[placeholder.offset : placeholder.end] = image_embeds[
                row : row + placeholder.length
            ]
            row += placeholder.length
        assert row == image_embeds.shape[0]

        total = prompt_len + len(expected_new)
        num_blocks = -(-total // 4)
        request = PagedRequest(block_ids=list(range(num_blocks, 0, -1)))
        caches = new_caches(native, num_blocks + 1)
        split = prompt.placeholders[0].offset + 3  # inside the first image's run
        for start, end in ((0, split), (split, prompt_len)):
            meta = build_meta([request], [end - start], device)
            hidden = native(
                None,
                prompt.mrope_positions[:, start:end].to(device),
                caches,
                meta,
                backend,
                inputs_embeds=embeds[start:end],
            )
        tokens = [int(native.compute_logits(hidden[-1:])[0].argmax())]
        while len(tokens) < len(expected_new):
            index = prompt_len + len(tokens) - 1
            positions = decode_mrope_positions(index, 1, prompt.mrope_position_delta)
            meta = build_meta([request], [1], device)
            step_ids = torch.tensor(tokens[-1:], device=device)
            hidden = native(step_ids, positions.to(device), caches, meta, backend)
            tokens.append(int(native.compute_logits(hidden)[0].argmax()))
    assert len(expected_new) == 8
    assert tokens == expected_new


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mrope_kernel_matches_the_torch_path(dtype: torch.dtype) -> None:
    """On a GPU (skipped elsewhere): the compiled kernel against the torch code on the same
    GPU, strided q/k views of a fused qkv output."""
    rotary = _qwen2_5_vl_7b_rotary().to("cuda")
    positions = MROPE_POSITIONS.to("cuda")
    num_tokens, q_heads, kv_heads, head_dim = positions.shape[1], 28, 4, 128
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn((num_tokens, q_size + 2 * kv_size), generator=generator).to("cuda", dtype)
    q = qkv[:, :q_size].view(num_tokens, q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, kv_heads, head_dim)
    cos, sin = rotary._cos_sin(positions, dtype)
    expected_q = apply_rotary_torch(q.clone(), cos, sin)
    expected_k = apply_rotary_torch(k.clone(), cos, sin)
    mrope_qk_triton_(q, k, positions, rotary.row_of_freq, rotary.inv_freq, 1.0)
    for actual, expected in ((q, expected_q), (k, expected_k)):
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)
            exact = float((actual == expected).float().mean())
            assert exact >= 0.99, f"only {exact:.4f} of the elements are bit-exact"


def test_qwen2_vl_checkpoint_logits_and_image_embeddings(tmp_path: Path) -> None:
    """Qwen2-VL (full-attention quick-GELU tower, the same M-RoPE language model): vision
    embeddings, M-RoPE positions and prefill logits equal transformers'."""
    folder = make_tiny_qwen2_5_vl(tmp_path, family="qwen2_vl")
    reference = load_reference_vl(folder)
    assert type(reference).__name__ == "Qwen2VLForConditionalGeneration"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": noise_image(140, 84, seed=3)},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    prompt = prepare_qwen2_vl_prompt(
        Qwen2VLPromptProcessor.from_pretrained(str(folder)), messages=messages
    )
    assert prompt.pixel_values is not None and prompt.image_grid_thw is not None
    ids = torch.tensor([prompt.prompt_token_ids])
    with torch.no_grad():
        expected_embeds = torch.cat(
            reference.model.get_image_features(
                prompt.pixel_values, prompt.image_grid_thw
            ).pooler_output
        )
        ref_positions, ref_delta = reference.model.get_rope_index(
            ids, (ids == IMAGE_TOKEN_ID).int(), image_grid_thw=prompt.image_grid_thw
        )
    image_embeds = VisionEncoder.from_pretrained(str(folder)).encode(
        prompt.pixel_values, prompt.image_grid_thw
    )
    assert image_embeds.shape == (15, 64)
    torch.testing.assert_close(image_embeds, expected_embeds, rtol=0, atol=1e-5)
    assert torch.equal(prompt.mrope_positions, ref_positions[:, 0])
    assert prompt.mrope_position_delta == int(ref_delta)

    native, _ = loader.load_model(str(folder), dtype="float32")
    assert isinstance(native, Qwen2VLForCausalLM)
    with torch.no_grad():
        embeds = native.embed_tokens(ids[0])
        (placeholder,) = prompt.placeholders
        embeds[placeholder.offset : placeholder.end] = image_embeds
        request = PagedRequest(block_ids=list(range(1, 1 + -(-ids.shape[1] // 4))))
        caches = new_caches(native, len(request.block_ids) + 1)
        meta = build_meta([request], [ids.shape[1]])
        hidden = native(None, prompt.mrope_positions, caches, meta, "torch", inputs_embeds=embeds)
        expected = reference(
            inputs_embeds=embeds[None], position_ids=ref_positions, return_dict=True
        ).logits[0]
    torch.testing.assert_close(native.compute_logits(hidden), expected, rtol=0, atol=2e-5)


# ---- the fused M-RoPE kernel --------------------------------------------------------------


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="this is the launcher")
def test_mrope_kernel_in_interpreter_child() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMNI_TRITON_INTERPRETER_CHILD="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-k", "interpreter_", __file__]
    child = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert f"{NUM_INTERPRETER_TESTS} passed" in child.stdout, child.stdout[-2000:]


def _qwen2_5_vl_7b_rotary() -> MRotaryEmbedding:
    """Qwen2.5-VL-7B's text rotary: head_dim 128, mrope_section [16, 24, 24]."""
    config = type(
        "TextConfig",
        (),
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            }
        },
    )()
    return MRotaryEmbedding(config, 128)


# Image-like positions: rows differ, large values included (long-context range reduction).
MROPE_POSITIONS = torch.tensor(
    [[0, 5, 5, 5, 9, 30000], [0, 5, 6, 7, 9, 30000], [0, 5, 8, 6, 9, 131071]], dtype=torch.int64
)


@in_child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreter_mrope_kernel_strided_views_in_place(dtype: torch.dtype) -> None:
    rotary = _qwen2_5_vl_7b_rotary()
    num_tokens, q_heads, kv_heads, head_dim = MROPE_POSITIONS.shape[1], 28, 4, 128
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn((num_tokens, q_size + 2 * kv_size), generator=generator).to(dtype)
    original = qkv.clone()
    q = qkv[:, :q_size].view(num_tokens, q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, kv_heads, head_dim)
    cos, sin = rotary._cos_sin(MROPE_POSITIONS, dtype)
    expected_q = apply_rotary_torch(q.clone(), cos, sin)
    expected_k = apply_rotary_torch(k.clone(), cos, sin)

    mrope_qk_triton_(q, k, MROPE_POSITIONS, rotary.row_of_freq, rotary.inv_freq, 1.0)

    assert torch.equal(qkv[:, q_size + kv_size :], original[:, q_size + kv_size :])
    assert torch.equal(qkv[0], original[0])  # position 0 in every row: the identity
    for actual, expected in ((q, expected_q), (k, expected_k)):
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
            exact = float((actual == expected).float().mean())
            assert exact >= 0.99, f"only {exact:.4f} of the elements are bit-exact"


@in_child_only
def test_interpreter_model_forward_wired_to_the_mrope_kernel(
    vl_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    native, _ = loader.load_model(str(vl_folder), dtype="float32")
    positions = torch.tensor([[0, 1, 2, 2, 2, 2, 5], [0, 1, 2, 2, 3, 3, 5], [0, 1, 2, 3, 2, 3, 5]])
    ids = torch.tensor([1, 9, 5, 5, 5, 5, 20])

    def run() -> torch.Tensor:
        request = PagedRequest(block_ids=[2, 1])
        meta = build_meta([request], [ids.shape[0]])
        with torch.no_grad():
            return native(ids, positions, new_caches(native, 3), meta, "torch")

    expected = run()
    launches: list[int] = []
    kernel = mrope.mrope_qk_triton_

    def counting_kernel(*args: Any) -> None:
        launches.append(1)
        kernel(*args)

    monkeypatch.setattr(mrope, "use_fused_kernels", lambda tensor: True)
    monkeypatch.setattr(mrope, "mrope_qk_triton_", counting_kernel)
    actual = run()
    assert len(launches) == native.num_layers
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_mrope_kernel_rejects_bad_inputs() -> None:
    rotary = _qwen2_5_vl_7b_rotary()
    q, k = torch.zeros(6, 4, 128), torch.zeros(6, 2, 128)
    with pytest.raises(ValueError, match=r"positions has shape \(6,\); expected \(3, 6\)"):
        mrope_qk_triton_(q, k, MROPE_POSITIONS[0], rotary.row_of_freq, rotary.inv_freq, 1.0)
    with pytest.raises(ValueError, match=r"must be \[64\] for head_dim 128"):
        mrope_qk_triton_(q, k, MROPE_POSITIONS, rotary.row_of_freq[:8], rotary.inv_freq, 1.0)
    with pytest.raises(ValueError, match="positions int64"):
        mrope_qk_triton_(q, k, MROPE_POSITIONS.int(), rotary.row_of_freq, rotary.inv_freq, 1.0)


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="compiles for CUDA; the child interprets")
def test_mrope_kernel_compiles_for_h100_with_torch_float_semantics() -> None:
    import triton
    from omni.stages.kernels.fused_ops import _TORCH_FP_OPTIONS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        "q_ptr": "*bf16",
        "k_ptr": "*bf16",
        "positions_ptr": "*i64",
        "row_of_freq_ptr": "*i64",
        "inv_freq_ptr": "*fp32",
        **dict.fromkeys(
            [
                "stride_positions_row",
                "stride_positions_token",
                "stride_q_token",
                "stride_q_head",
                "stride_k_token",
                "stride_k_head",
                "num_q_heads",
                "num_k_heads",
            ],
            "i32",
        ),
        "scaling": "fp32",
    }
    constexprs = {
        "half": 64,
        "USE_LIBDEVICE": True,
        "BLOCK_Q_HEADS": 32,
        "BLOCK_K_HEADS": 4,
        "BLOCK_HALF": 64,
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=mrope.mrope_qk_kernel, signature=signature, constexprs=constexprs)
    options = dict(_TORCH_FP_OPTIONS, num_warps=8)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = str(compiled.asm["ptx"])
    assert "sin.approx" not in ptx and "cos.approx" not in ptx
    assert "cvt.rn.bf16.f32" in ptx


@pytest.mark.parametrize(
    ("token_budget", "device"),
    [(4096, "cpu"), (9, "cpu"), pytest.param(4096, "cuda", marks=needs_cuda),
     pytest.param(9, "cuda", marks=needs_cuda)],
)
def test_engine_serves_vl_requests_like_transformers(
    vl_folder: Path, reference: Any, token_budget: int, device: str
) -> None:
    """The whole path through the LLM engine: prompt processing, the vision encoder, the
    engine's splicing and M-RoPE positions (chunked when the budget is 9 tokens), and the
    prefix cache for a repeated image, against transformers' greedy generate. On a GPU the
    steps with prompt tokens replay CUDA graphs, the image embeddings spliced in first."""
    from transformers import GenerationConfig

    from omni import LLM, SamplingParams

    new_tokens = 6
    with torch.no_grad():
        greedy = GenerationConfig(
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        expected = reference.generate(**_prompt_inputs(vl_folder), generation_config=greedy)
    prompt = prepare_qwen2_vl_prompt(
        Qwen2VLPromptProcessor.from_pretrained(str(vl_folder)),
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image", "image": noise_image(84, 56, seed=1)},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": noise_image(56, 112, seed=2)},
                    {"type": "text", "text": "briefly."},
                ],
            }
        ],
    )
    expected_new = expected[0, len(prompt.prompt_token_ids) :].tolist()
    assert len(expected_new) == new_tokens
    encoder = VisionEncoder.from_pretrained(str(vl_folder))
    per_image = prompt.split_embeddings(encoder.encode(*prompt.encoder_inputs()))

    llm = LLM(
        str(vl_folder),
        device=device,
        dtype="float32",
        num_kv_blocks=64,
        block_size=8,
        max_num_batched_tokens=token_budget,
    )
    sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    def run(request_id: str) -> tuple[list[int], int]:
        inputs = prompt.to_multimodal_inputs(per_image)
        llm.engine.add_request(
            request_id, prompt.prompt_token_ids, sampling, mm=inputs, stream=False
        )
        while llm.engine.has_unfinished_requests():
            for output in llm.engine.step():
                if output.request_id == request_id and output.finished:
                    return output.outputs[0].token_ids, output.num_cached_tokens
        raise AssertionError("request did not finish")

    assert run("first") == (expected_new, 0)
    tokens, cached = run("again")
    assert tokens == expected_new
    # Every full block before the last prompt token comes from the prefix cache.
    assert cached == (len(prompt.prompt_token_ids) - 1) // 8 * 8
    # A 9-token budget is below the smallest mixed graph (64 tokens): none is captured.
    graphs = llm.engine.runner.mixed_graphs
    assert (graphs is not None and graphs.replays > 0) == (device == "cuda" and token_budget > 9)


def test_tied_embeddings_follow_the_top_level_config() -> None:
    """Qwen2.5-VL-3B ties lm_head to the embeddings in the top-level config only."""
    from omni.stages.llm.models.multimodal_lm import text_config_of

    config = tiny_vl_config(320)
    config.tie_word_embeddings = True
    text = text_config_of(config)
    assert text.tie_word_embeddings is True and text.hidden_size == 64
    assert text is not config.text_config  # the checkpoint's own config is left alone
    with torch.device("cpu"):
        model = Qwen2VLForCausalLM(config, torch.float32)
    assert model.lm_head is None
    assert "lm_head.weight" not in dict(model.named_parameters())
