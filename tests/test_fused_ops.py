"""The fused elementwise kernels (`stages/kernels/fused_ops.py`) against the torch code
they replace, run on the CPU by Triton's interpreter.

As in test_attention_triton.py, TRITON_INTERPRET must be set before triton is first imported,
so the kernel tests (named test_interpreter_*) run in a child pytest with the variable set;
this process runs the launcher and the input checks, which fail before any launch.

Precision: float32 is compared with a ~1e-6 tolerance (the interpreter's numpy cos/exp/rsqrt
and the RMSNorm sum order may differ from torch's by an ulp), float16 and bfloat16 within one
ulp with almost every element bit-exact. Triton 3.6's interpreter converts float32 to bfloat16
by truncation, not by the round-to-nearest-even that compiled Triton (and torch) use; the
child process patches that one conversion (`_round_bf16_to_nearest_even`) so the bf16 rounding
steps can be checked exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from triton_interpreter import IN_INTERPRETER_CHILD, in_child_only, run_interpreter_child

NUM_INTERPRETER_TESTS = 17
triton = pytest.importorskip("triton")

from omni.stages.kernels import fused_kernels, fused_ops  # noqa: E402
from omni.stages.kernels.fused_ops import (  # noqa: E402
    add_rms_norm,
    add_rms_norm_triton,
    apply_rotary_torch,
    rms_norm,
    rms_norm_torch,
    rms_norm_triton,
    rotary_cos_sin_torch,
    rotary_qk,
    rotary_qk_triton_,
    silu_and_mul,
    silu_and_mul_torch,
    silu_and_mul_triton,
    silu_mul,
    silu_mul_triton,
    vision_rotary,
    vision_rotary_torch,
    vision_rotary_triton_,
)

EPS = 1e-6


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="this is the launcher")
def test_kernels_in_child_process() -> None:
    run_interpreter_child(__file__, NUM_INTERPRETER_TESTS)


def _round_bf16_to_nearest_even() -> None:
    """Make the interpreter's float32 -> bfloat16 cast round to nearest even, as compiled
    Triton does by default (`semantic.cast`: "for fp downcasting default rounding mode should
    be RTNE"); torch's own conversion does the rounding."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self: object, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            as_float = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            rounded = as_float.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if IN_INTERPRETER_CHILD:
    _round_bf16_to_nearest_even()


# ---- helpers -------------------------------------------------------------------------------


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable 16-bit floats lie between a and b (0 when bit-equal, and
    +0 == -0): the integer encodings made monotonic in value."""
    assert a.dtype == b.dtype and a.element_size() == 2

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def _assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    distance = _ulp_distance(actual, expected)
    assert int(distance.max()) <= 1, f"max ulp distance {int(distance.max())}"
    # One-ulp differences come only from float32 ties broken differently (sum order, libm):
    # rare, so nearly every element must be bit-equal.
    exact_fraction = float((distance == 0).float().mean())
    assert exact_fraction >= 0.99, f"only {exact_fraction:.4f} of the elements are exact"


def _assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def _inv_freq(head_dim: int, base: float = 1_000_000.0) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (base**exponents)


# Positions from the first token to long contexts: the angle position * inv_freq reaches
# ~1.3e5 rad, where an inaccurate cos/sin range reduction would show.
POSITIONS = torch.tensor([0, 1, 7, 4095, 30000, 131071], dtype=torch.int64)


# ---- kernels under the interpreter ---------------------------------------------------------


@in_child_only
@pytest.mark.parametrize("hidden", [3584, 37])
def test_interpreter_rms_norm_fp32(hidden: int) -> None:
    x = _inputs((5, hidden), torch.float32, seed=1) * 3.0
    weight = _inputs((hidden,), torch.float32, seed=2)
    out = rms_norm_triton(x, weight, EPS)
    assert out.shape == (5, hidden) and out.dtype == torch.float32
    _assert_close_fp32(out, rms_norm_torch(x, weight, EPS))


@in_child_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreter_rms_norm_half_and_strided_heads(dtype: torch.dtype) -> None:
    # A hidden vector of Qwen2-7B's width, then Qwen3-style per-head norms over q and k heads
    # that are strided views of a fused qkv output [T, (6 + 2*2) * 48].
    x = _inputs((4, 3584), dtype, seed=3)
    weight = _inputs((3584,), dtype, seed=4)
    _assert_within_one_ulp(rms_norm_triton(x, weight, EPS), rms_norm_torch(x, weight, EPS))

    head_dim, q_heads, kv_heads = 48, 6, 2
    qkv = _inputs((3, (q_heads + 2 * kv_heads) * head_dim), dtype, seed=5)
    q = qkv[:, : q_heads * head_dim].view(3, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(3, kv_heads, head_dim)
    head_weight = _inputs((head_dim,), dtype, seed=6)
    for view in (q, k):
        assert not view.is_contiguous()
        out = rms_norm_triton(view, head_weight, EPS)
        assert out.shape == view.shape and out.is_contiguous()
        _assert_within_one_ulp(out, rms_norm_torch(view, head_weight, EPS))
    q32, w32 = q.float(), head_weight.float()
    _assert_close_fp32(rms_norm_triton(q32, w32, EPS), rms_norm_torch(q32, w32, EPS))


@in_child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interpreter_add_rms_norm(dtype: torch.dtype) -> None:
    x = _inputs((3, 3584), dtype, seed=7)
    residual = _inputs((3, 3584), dtype, seed=8) * 4.0
    weight = _inputs((3584,), dtype, seed=9)
    normed, new_residual = add_rms_norm_triton(x, residual, weight, EPS)
    # The residual stream must be bit-identical to torch's add: it feeds every later layer.
    assert torch.equal(new_residual, residual + x)
    expected = rms_norm_torch(residual + x, weight, EPS)
    if dtype == torch.float32:
        _assert_close_fp32(normed, expected)
    else:
        _assert_within_one_ulp(normed, expected)
    # The inputs are left alone (the CUDA path must not clobber the caller's residual).
    assert torch.equal(residual, _inputs((3, 3584), dtype, seed=8) * 4.0)


@in_child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interpreter_rotary_qk_strided_views_in_place(dtype: torch.dtype) -> None:
    # Qwen2-7B's head layout (28 q heads, 4 kv heads, head_dim 128) as views of one fused
    # qkv output; v's columns must come through untouched.
    num_tokens, q_heads, kv_heads, head_dim = len(POSITIONS), 28, 4, 128
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    qkv = _inputs((num_tokens, q_size + 2 * kv_size), dtype, seed=10)
    original = qkv.clone()
    q = qkv[:, :q_size].view(num_tokens, q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, kv_heads, head_dim)
    inv_freq = _inv_freq(head_dim)
    cos, sin = rotary_cos_sin_torch(POSITIONS, inv_freq, 1.0, dtype)
    expected_q, expected_k = (
        apply_rotary_torch(q.clone(), cos, sin),
        apply_rotary_torch(k.clone(), cos, sin),
    )

    rotary_qk_triton_(q, k, POSITIONS, inv_freq, 1.0)

    assert torch.equal(qkv[:, q_size + kv_size :], original[:, q_size + kv_size :])
    if dtype == torch.float32:
        _assert_close_fp32(q, expected_q)
        _assert_close_fp32(k, expected_k)
    else:
        _assert_within_one_ulp(q, expected_q)
        _assert_within_one_ulp(k, expected_k)
    # Position 0 is the identity rotation: bit-equal to the input.
    assert torch.equal(qkv[0], original[0])


@in_child_only
def test_interpreter_rotary_qk_scaled_odd_heads() -> None:
    # A YaRN-like attention scaling, non-power-of-two head counts and half-dim (head_dim 80,
    # half 40), and contiguous q/k (what Qwen3's q/k norms return).
    head_dim = 80
    q = _inputs((len(POSITIONS), 5, head_dim), torch.float32, seed=11)
    k = _inputs((len(POSITIONS), 3, head_dim), torch.float32, seed=12)
    inv_freq = _inv_freq(head_dim, base=10_000.0) / 4.0
    cos, sin = rotary_cos_sin_torch(POSITIONS, inv_freq, 1.1, torch.float32)
    expected_q, expected_k = apply_rotary_torch(q, cos, sin), apply_rotary_torch(k, cos, sin)
    rotary_qk_triton_(q, k, POSITIONS, inv_freq, 1.1)
    _assert_close_fp32(q, expected_q)
    _assert_close_fp32(k, expected_k)


@in_child_only
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, for exp(100): inf
def test_interpreter_silu_and_mul() -> None:
    intermediate = 1000  # not a multiple of the kernel's block: the tail is masked
    gate_up = _inputs((3, 2 * intermediate), torch.float32, seed=13) * 4.0
    # Saturated ends: exp(-x) overflows to inf (silu -> -0) and underflows to 0 (silu -> x).
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    _assert_close_fp32(silu_and_mul_triton(gate_up), silu_and_mul_torch(gate_up))

    # Strided inputs: rows of a wider buffer (the kernel takes the row stride).
    for dtype in (torch.float16, torch.bfloat16):
        wide = _inputs((3, 2 * intermediate + 24), dtype, seed=14) * 4.0
        strided = wide[:, : 2 * intermediate]
        assert not strided.is_contiguous()
        out = silu_and_mul_triton(strided)
        assert out.shape == (3, intermediate) and out.dtype == dtype
        _assert_within_one_ulp(out, silu_and_mul_torch(strided))


@in_child_only
def test_interpreter_silu_mul_of_two_projections() -> None:
    # The vision tower's MLP: gate and up come from two linear layers (with biases), so the
    # kernel reads two tensors; torch's `silu(gate) * up` rounds twice, and so does the kernel.
    for dtype in (torch.float16, torch.bfloat16):
        gate = _inputs((5, 1000), dtype, seed=15) * 4.0
        up = _inputs((5, 1000), dtype, seed=16)
        out = silu_mul_triton(gate, up)
        assert out.shape == (5, 1000) and out.dtype == dtype
        _assert_within_one_ulp(out, torch.nn.functional.silu(gate) * up)


def _vision_cos_sin(tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as transformers' vision tower builds them: angles of 2-D patch positions,
    each half of the head dim repeated (`cat((freqs, freqs))`), in float32."""
    rows = torch.arange(tokens, dtype=torch.float32)[:, None]
    inv_freq = _inv_freq(head_dim // 2, base=10_000.0)
    half = torch.cat([rows * inv_freq, (rows % 7) * inv_freq], dim=-1)[:, : head_dim // 2]
    angles = torch.cat([half, half], dim=-1)
    return angles.cos(), angles.sin()


@in_child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreter_vision_rotary_in_place_on_qkv_views(dtype: torch.dtype) -> None:
    # q and k are views of the tower's fused qkv output ([T, 3, heads, 80]), rotated in place.
    tokens, heads, head_dim = 37, 16, 80
    qkv = _inputs((tokens, 3, heads, head_dim), dtype, seed=17) * 3.0
    q, k, _ = qkv.unbind(1)
    cos, sin = _vision_cos_sin(tokens, head_dim)
    expected_q, expected_k = vision_rotary_torch(q.clone(), k.clone(), cos, sin)
    out_q, out_k = vision_rotary_triton_(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    if dtype == torch.float32:
        _assert_close_fp32(out_q, expected_q)
        _assert_close_fp32(out_k, expected_k)
    else:  # products and sums in float32 exactly as torch: one rounding, bit-equal
        assert torch.equal(out_q, expected_q) and torch.equal(out_k, expected_k)


@in_child_only
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_interpreter_decoder_forward_wired_to_kernels(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model's CUDA wiring (residual carried between layers into add+norm, q/k rotated in
    # place as views of the fused qkv output, Qwen3's per-head norms over those views, the
    # final add+norm) runs only on a GPU. Here the dispatchers are pointed at the kernels for
    # CPU tensors and a prefill plus a decode step are compared with the plain CPU path.
    from fixtures_models import PagedRequest, build_meta, make_tiny_checkpoint, new_caches
    from omni.stages.llm.models import layers, load_model

    model, _ = load_model(str(make_tiny_checkpoint(arch, tmp_path / arch)))
    prompt, next_token = torch.tensor([5, 17, 3, 250, 9, 41, 8]), torch.tensor([77])

    def prefill_then_decode() -> tuple[torch.Tensor, list[torch.Tensor]]:
        caches, request = new_caches(model), PagedRequest([3, 0, 6])
        with torch.no_grad():
            prefill = model(prompt, torch.arange(7), caches, build_meta([request], [7]), "torch")
            decode = model(
                next_token, torch.tensor([7]), caches, build_meta([request], [1]), "torch"
            )
        return torch.cat([prefill, decode]), caches

    expected_hidden, expected_caches = prefill_then_decode()

    def rotary_kernel(
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        scaling: float,
        cos_sin: object = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rotary_qk_triton_(q, k, positions, inv_freq, scaling)
        return q, k

    monkeypatch.setattr(layers, "rms_norm", rms_norm_triton)
    monkeypatch.setattr(layers, "add_rms_norm", add_rms_norm_triton)
    monkeypatch.setattr(layers, "silu_and_mul", silu_and_mul_triton)
    monkeypatch.setattr(layers, "rotary_qk", rotary_kernel)
    fused_hidden, fused_caches = prefill_then_decode()

    torch.testing.assert_close(fused_hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    for fused_cache, expected_cache in zip(fused_caches, expected_caches, strict=True):
        torch.testing.assert_close(fused_cache, expected_cache, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused_caches[0], torch.zeros_like(fused_caches[0]))


# ---- dispatch and input checks (no launch) -------------------------------------------------


def test_cpu_tensors_take_the_torch_path_bit_for_bit() -> None:
    # CPU numerics are compared against transformers bit for bit elsewhere; the dispatchers
    # must be exactly the torch code there.
    x = _inputs((3, 64), torch.bfloat16, seed=21)
    residual = _inputs((3, 64), torch.bfloat16, seed=22)
    weight = _inputs((64,), torch.bfloat16, seed=23)
    assert torch.equal(rms_norm(x, weight, EPS), rms_norm_torch(x, weight, EPS))
    normed, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(normed, rms_norm_torch(residual + x, weight, EPS))

    gate_up = _inputs((3, 128), torch.bfloat16, seed=24)
    gate, up = gate_up.split(64, dim=-1)
    assert torch.equal(silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)
    assert torch.equal(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)
    q, k = _inputs((4, 2, 8), torch.bfloat16, seed=18), _inputs((4, 2, 8), torch.bfloat16, seed=19)
    cos, sin = _vision_cos_sin(4, 8)
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    reference = apply_rotary_pos_emb_vision(q, k, cos, sin)  # transformers' own function
    for ours in (vision_rotary_torch(q, k, cos, sin), vision_rotary(q, k, cos, sin)):
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])

    q = _inputs((len(POSITIONS), 4, 32), torch.bfloat16, seed=25)
    k = _inputs((len(POSITIONS), 2, 32), torch.bfloat16, seed=26)
    cos, sin = rotary_cos_sin_torch(POSITIONS, _inv_freq(32), 1.0, torch.bfloat16)
    rotated_q, rotated_k = rotary_qk(q, k, POSITIONS, _inv_freq(32), 1.0)
    assert torch.equal(rotated_q, apply_rotary_torch(q, cos, sin))
    assert torch.equal(rotated_k, apply_rotary_torch(k, cos, sin))
    # Off CUDA the inputs are not rotated in place.
    assert torch.equal(q, _inputs((len(POSITIONS), 4, 32), torch.bfloat16, seed=25))


def test_rejects_bad_inputs_with_the_limit_named() -> None:
    x = torch.zeros(2, 16)
    with pytest.raises(ValueError, match=r"weight has shape \(8,\); it must be \[16\]"):
        rms_norm_triton(x, torch.ones(8), EPS)
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        rms_norm_triton(torch.zeros(16, 2).t(), torch.ones(16), EPS)
    with pytest.raises(ValueError, match=r"residual is torch.float16 \(2, 16\)"):
        add_rms_norm_triton(x, torch.zeros(2, 16, dtype=torch.float16), torch.ones(16), EPS)
    with pytest.raises(ValueError, match=r"gate_up must be \[T, 2\*I\]"):
        silu_and_mul_triton(torch.zeros(2, 7))

    q, k = torch.zeros(3, 4, 16), torch.zeros(3, 2, 16)
    positions = torch.arange(3)
    with pytest.raises(ValueError, match=r"inv_freq has shape \(16,\); head_dim 16 needs \[8\]"):
        rotary_qk_triton_(q, k, positions, torch.ones(16), 1.0)
    with pytest.raises(ValueError, match="must agree on T and head_dim"):
        rotary_qk_triton_(q, k, torch.arange(4), torch.ones(8), 1.0)
    with pytest.raises(ValueError, match="inv_freq must be float32"):
        rotary_qk_triton_(q, k, positions, torch.ones(8, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"must be \[T, heads, head_dim\]"):
        rotary_qk_triton_(torch.zeros(3, 16), k, positions, torch.ones(8), 1.0)


_HALF_KERNEL_SIGNATURES: dict[str, tuple[Any, dict[str, str], dict[str, Any]]] = {
    "rms_norm": (
        fused_kernels.rms_norm_kernel,
        {
            **dict.fromkeys(
                ["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"], "*bf16"
            ),
            **dict.fromkeys(["num_heads", "stride_x_token", "stride_x_head", "n_cols"], "i32"),
            "inv_n_cols": "fp32",
            "eps": "fp32",
        },
        {"HAS_RESIDUAL": True, "BLOCK": 1024},
    ),
    "rotary_qk": (
        fused_kernels.rotary_qk_kernel,
        {
            "q_ptr": "*bf16",
            "k_ptr": "*bf16",
            "positions_ptr": "*i64",
            "inv_freq_ptr": "*fp32",
            **dict.fromkeys(
                ["stride_q_token", "stride_q_head", "stride_k_token", "stride_k_head"], "i32"
            ),
            "num_q_heads": "i32",
            "num_k_heads": "i32",
            "scaling": "fp32",
        },
        {"half": 64, "BLOCK_Q_HEADS": 32, "BLOCK_K_HEADS": 4, "BLOCK_HALF": 64},
    ),
    "silu_and_mul": (
        fused_kernels.silu_and_mul_kernel,
        {
            "gate_ptr": "*bf16",
            "up_ptr": "*bf16",
            "out_ptr": "*bf16",
            "stride_gate_token": "i32",
            "stride_up_token": "i32",
            "intermediate_size": "i32",
        },
        {"BLOCK": 1024},
    ),
    "vision_rotary": (
        fused_kernels.vision_rotary_kernel,
        {
            "q_ptr": "*bf16",
            "k_ptr": "*bf16",
            "cos_ptr": "*fp32",
            "sin_ptr": "*fp32",
            **dict.fromkeys(
                ["stride_q_token", "stride_q_head", "stride_k_token", "stride_k_head"], "i32"
            ),
            "stride_cos_token": "i32",
            "stride_sin_token": "i32",
            "num_heads": "i32",
        },
        {"half": 40, "BLOCK_HEADS": 16, "BLOCK_HALF": 64},
    ),
}


def _compile_for_h100(name: str, dtype: str, options: dict[str, Any]) -> str:
    """PTX of a kernel compiled for sm_90 on this GPU-less machine (Triton ships ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs = _HALF_KERNEL_SIGNATURES[name]
    signature = {
        key: ("*" + dtype if value == "*bf16" else value) for key, value in signature.items()
    }
    if "USE_LIBDEVICE" in fn.arg_names:
        constexprs = {**constexprs, "USE_LIBDEVICE": True}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return str(compiled.asm["ptx"])


@pytest.mark.skipif(IN_INTERPRETER_CHILD, reason="compiles for CUDA; the child interprets")
def test_cuda_compilation_keeps_torch_float_semantics() -> None:
    # The CUDA-only branches (libdevice, the launch options) never run under the interpreter;
    # compiling them checks they build and that the PTX has the properties the numerics rely
    # on: no approximate division, no approximate sin/cos, denormals kept, no FMA contraction.
    options = dict(fused_ops._TORCH_FP_OPTIONS, num_warps=8)
    for name in _HALF_KERNEL_SIGNATURES:
        ptx = _compile_for_h100(name, "bf16", options)
        assert "div.full" not in ptx and "div.approx" not in ptx, name
        assert "sin.approx" not in ptx and "cos.approx" not in ptx, name
        assert "cvt.rn.bf16.f32" in ptx, name  # round to nearest even, as torch rounds
    rms_ptx = _compile_for_h100("rms_norm", "fp32", options)
    assert "rsqrt.approx.f32" in rms_ptx and "rsqrt.approx.ftz" not in rms_ptx
    assert "div.rn.f32" in _compile_for_h100("silu_and_mul", "fp32", options)
    # In float32 nothing rounds between `x1*cos` and the subtraction: only the option keeps
    # them two roundings (what remains is libdevice's own cos/sin, identical either way).
    fused = _compile_for_h100("rotary_qk", "fp32", dict(options, enable_fp_fusion=True))
    unfused = _compile_for_h100("rotary_qk", "fp32", options)
    assert unfused.count("fma.rn.f32") < fused.count("fma.rn.f32")
    fused = _compile_for_h100("vision_rotary", "bf16", dict(options, enable_fp_fusion=True))
    unfused = _compile_for_h100("vision_rotary", "bf16", options)
    assert "fma.rn.f32" not in unfused and "fma.rn.f32" in fused


def test_launch_widths_follow_the_row_size() -> None:
    # One program holds a whole row; warps grow with it so a 4096-wide block is not left to
    # one warp (128 elements per thread) and a 64-wide one does not idle seven warps.
    assert [fused_ops._num_warps(block) for block in (64, 256, 1024, 4096, 16384)] == [
        1,
        1,
        4,
        8,
        8,
    ]
