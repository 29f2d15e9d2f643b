"""attention_jvp against torch.func.jvp (and autograd) of the math attention in float64.

CPU: the chunked reference path (fp64/fp32/fp16/bf16), validation, opcheck, torch.compile.
GPU (requires_cuda): the Triton and the CUDA C++ forward kernels and every backward backend, small shapes in detail and large shapes
(``large`` in the name), each error bounded by the per-dtype tolerance AND by 2x the error of the math-path JVP
(torch.func.jvp of the reference) run in the same dtype.
The Triton kernels under the CPU interpreter are tested by test_attention_interpreter.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import REL_TOL, assert_rel_close, misaligned, noncontiguous, rel_err, requires_cuda
from facm_ext.ops import attention_jvp
from facm_ext.ops import attention as attention_ops
from facm_ext.reference.attention import attention

TANGENT_SETS = {
    "all": (True, True, True),
    "tq_only": (True, False, False),  # cross-attention to a constant context
    "tk_tv": (False, True, True),
    "tv_only": (False, False, True),
    "none": (False, False, False),
}


def _inputs(batch, heads, len_q, len_k, head_dim, dtype, device, tangents=(True, True, True)):
    gen = torch.Generator(device="cpu").manual_seed(batch * 1000 + len_q * 7 + len_k + head_dim)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    q = rand(batch, heads, len_q, head_dim)
    k = rand(batch, heads, len_k, head_dim)
    v = rand(batch, heads, len_k, head_dim)
    tq, tk, tv = (rand(*x.shape) if use else None for x, use in zip((q, k, v), tangents))
    return q, k, v, tq, tk, tv


@pytest.fixture(autouse=True)
def _fixed_kernel_configs(request, monkeypatch):
    # Autotuning every small case would compile each kernel variant six times; the large cases keep it on so the
    # autotuned configurations (those the benchmarks time) are checked too.
    if "large" not in request.node.name:
        monkeypatch.setenv("FACM_EXT_ATTN_AUTOTUNE", "0")


def _reference_jvp(q, k, v, tq, tk, tv, *, scale=None, key_lengths=None, dtype=torch.float64):
    """torch.func.jvp of the math attention with inputs cast to ``dtype`` (float64: the ground truth)."""
    primals = tuple(x.to(dtype) for x in (q, k, v))
    tangents = tuple(torch.zeros_like(p) if t is None else t.to(dtype) for p, t in zip(primals, (tq, tk, tv)))
    return torch.func.jvp(lambda a, b, c: attention(a, b, c, scale=scale, key_lengths=key_lengths),
                          primals, tangents)


# ------------------------------------------------------------------------------------------------------- CPU path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 17, 17, 72), (1, 2, 1, 130, 128), (2, 2, 130, 33, 72), (1, 1, 5, 9, 64)])
@pytest.mark.parametrize("tangent_set", list(TANGENT_SETS))
def test_reference_path_matches_jvp(dtype, shape, tangent_set):
    q, k, v, tq, tk, tv = _inputs(*shape, dtype, "cpu", TANGENT_SETS[tangent_set])
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv)
    assert o.dtype == dtype and to.dtype == dtype
    assert_rel_close(o, ref_o, dtype, what="o")
    if tangent_set == "none":
        assert torch.count_nonzero(to) == 0
    else:
        assert_rel_close(to, ref_to, dtype, what="to")


@pytest.mark.parametrize("lengths", [[5, 33], [0, 12], [33, 1]])
def test_reference_path_key_lengths(lengths):
    q, k, v, tq, tk, tv = _inputs(2, 2, 19, 33, 72, torch.float64, "cpu")
    key_lengths = torch.tensor(lengths)
    o, to = attention_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    assert_rel_close(o, ref_o, torch.float64, what="o")
    assert_rel_close(to, ref_to, torch.float64, what="to")
    # Padded keys must not matter at all: changing them changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[1, :, lengths[1]:] = 1e4
    v2[1, :, lengths[1]:] = float("nan")
    o2, to2 = attention_jvp(q, k2, v2, tq, tk, tv, key_lengths=key_lengths)
    assert torch.equal(o2[1], o[1]) and torch.equal(to2[1], to[1])


def test_reference_path_noncontiguous_and_scale():
    q, k, v, tq, tk, tv = _inputs(1, 2, 21, 30, 72, torch.float64, "cpu")
    args = [noncontiguous(x) for x in (q, k, v, tq, tk, tv)]
    o, to = attention_jvp(*args, scale=0.37)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv, scale=0.37)
    assert_rel_close(o, ref_o, torch.float64, what="o")
    assert_rel_close(to, ref_to, torch.float64, what="to")


def test_reference_path_chunked(monkeypatch):
    # A tiny chunk budget forces one query per chunk: results must not depend on the chunking.
    q, k, v, tq, tk, tv = _inputs(2, 2, 13, 29, 72, torch.float64, "cpu")
    key_lengths = torch.tensor([29, 7])
    whole = attention_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    monkeypatch.setattr(attention_ops, "_MATH_CHUNK_BYTES", 1)
    chunked = attention_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    for got, full, ref, what in zip(chunked, whole, (ref_o, ref_to), ("o", "to")):
        assert_rel_close(got, ref, torch.float64, what=what)
        assert_rel_close(got, full, torch.float64, what=what)


@pytest.mark.parametrize("key_lengths", [None, [7, 29]])
def test_reference_path_gradient(key_lengths, monkeypatch):
    monkeypatch.setattr(attention_ops, "_MATH_CHUNK_BYTES", 2048)  # the backward runs over several chunks too
    q, k, v, tq, tk, tv = _inputs(2, 2, 13, 29, 72, torch.float64, "cpu")
    lengths = None if key_lengths is None else torch.tensor(key_lengths)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, to = attention_jvp(q, k, v, tq, tk, tv, key_lengths=lengths)
    assert o.requires_grad and not to.requires_grad and to.grad_fn is None
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad)
    want = torch.autograd.grad(attention(q, k, v, key_lengths=lengths), (q, k, v), grad)
    for g, w, name in zip(got, want, "qkv"):
        assert_rel_close(g, w, torch.float64, what=f"d{name}")


def test_opcheck():
    q, k, v, tq, tk, tv = _inputs(2, 2, 9, 12, 72, torch.float64, "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.facm_ext.attention_jvp.default, (q, k, v, tq, None, tv, torch.tensor([3, 12]), 0.2))
    torch.library.opcheck(torch.ops.facm_ext.attention_jvp.default, (q, k, v, None, None, None, None, 0.2))
    o = attention(q, k, v).detach()
    lse = torch.logsumexp(q @ k.transpose(-2, -1) * 0.2, dim=-1).detach()
    torch.library.opcheck(torch.ops.facm_ext.attention_jvp_backward.default,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, None, 0.2))


def test_torch_compile_fullgraph():
    q, k, v, tq, tk, tv = _inputs(2, 2, 9, 12, 72, torch.float32, "cpu")
    key_lengths = torch.tensor([5, 12])

    def step(q, k, v, tq, key_lengths):
        o, to = attention_jvp(q, k, v, tq, key_lengths=key_lengths)
        return o * 2, to + 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q.requires_grad_()
    o, to = compiled(q, k, v, tq, key_lengths)
    o_eager, to_eager = step(q, k, v, tq, key_lengths)
    torch.testing.assert_close(o, o_eager)
    torch.testing.assert_close(to, to_eager)
    (g,) = torch.autograd.grad(o.sum(), q)
    (g_eager,) = torch.autograd.grad(o_eager.sum(), q)
    torch.testing.assert_close(g, g_eager)


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs():
    q, k, v, tq, tk, tv = _inputs(2, 2, 9, 12, 72, torch.float32, "cpu")
    with pytest.raises(ValueError, match="k: expected shape"):
        attention_jvp(q, k[:, :1], v[:, :1])  # mismatched heads
    with pytest.raises(ValueError, match="k: expected shape"):
        attention_jvp(q, k[..., :64], v[..., :64])
    with pytest.raises(ValueError, match="v: expected the shape"):
        attention_jvp(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        attention_jvp(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="q: dtype torch.int64"):
        attention_jvp(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="k: expected dtype torch.float32"):
        attention_jvp(q, k.double(), v)
    with pytest.raises(ValueError, match="tq: expected dtype torch.float32"):
        attention_jvp(q, k, v, tq.double())
    with pytest.raises(ValueError, match="tk: tangent shape"):
        attention_jvp(q, k, v, None, tq)
    with pytest.raises(ValueError, match="k: expected a tensor on cpu"):
        attention_jvp(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="key_lengths: expected an int32/int64"):
        attention_jvp(q, k, v, key_lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="key_lengths: expected an int32/int64"):
        attention_jvp(q, k, v, key_lengths=torch.tensor([1, 2, 3]))


def test_forced_cuda_kernel_rejects_cpu_and_bad_switch(monkeypatch):
    q, k, v, tq, *_ = _inputs(1, 2, 9, 12, 72, torch.float32, "cpu")
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "cuda")
    with pytest.raises(ValueError, match="q: the CUDA attention kernel .* needs CUDA tensors, got cpu"):
        attention_jvp(q, k, v, tq)
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "wgmma")
    with pytest.raises(ValueError, match="FACM_EXT_ATTN_KERNEL: expected auto, cuda or triton, got 'wgmma'"):
        attention_jvp(q, k, v, tq)
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "triton")
    o, to = attention_jvp(q, k, v, tq)  # CPU tensors: the switch between GPU kernels changes nothing here
    ref_o, ref_to = _reference_jvp(q, k, v, tq, None, None)
    assert_rel_close(o, ref_o, torch.float32, what="o")
    assert_rel_close(to, ref_to, torch.float32, what="to")


def test_forced_triton_rejects_unsupported(monkeypatch):
    monkeypatch.setenv("FACM_EXT_BACKEND", "triton")
    q, k, v, *_ = _inputs(1, 2, 9, 12, 100, torch.float16, "cpu")
    with pytest.raises(ValueError, match="q: head_dim 100 is not supported"):
        attention_jvp(q, k, v)
    q, k, v, *_ = _inputs(1, 2, 9, 12, 64, torch.float64, "cpu")
    with pytest.raises(ValueError, match="q: dtype torch.float64 is not supported"):
        attention_jvp(q, k, v)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, *_ = _inputs(1, 2, 9, 12, 64, torch.float16, "cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention_jvp(q, k, v)


# ------------------------------------------------------------------------------------------------------------ GPU
def _bounded(got, truth, same_dtype_math, dtype, what):
    """Our error <= the dtype's tolerance and <= 2x the math-path JVP's error in the same dtype."""
    err, math_err = rel_err(got, truth), rel_err(same_dtype_math, truth)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3e} > tolerance {REL_TOL[dtype]:.1e} ({dtype})"
    assert err <= 2 * math_err + 1e-6, f"{what}: relative error {err:.3e} > 2 x math-path error {math_err:.3e}"


def _check_against_math(o, to, inputs, dtype, *, key_lengths=None, zero_tangent=False):
    """Our (o, to) against the float64 reference, each within the bound of :func:`_bounded` (the math-path JVP in
    ``dtype`` sets it); ``zero_tangent``: every tangent input was None, so ``to`` must be exactly zero."""
    ref_o, ref_to = _reference_jvp(*inputs, key_lengths=key_lengths)
    math_o, math_to = _reference_jvp(*inputs, key_lengths=key_lengths, dtype=dtype)
    _bounded(o, ref_o, math_o, dtype, "o")
    if zero_tangent:
        assert torch.count_nonzero(to) == 0
    else:
        _bounded(to, ref_to, math_to, dtype, "to")


GPU_SHAPES = [(2, 3, 1, 17, 72), (1, 2, 17, 130, 128), (2, 2, 130, 130, 72), (1, 2, 257, 64, 64), (1, 2, 100, 77, 80),
              (1, 2, 129, 200, 96), (1, 1, 64, 64, 16)]


GPU_CASES = [(torch.bfloat16, shape) for shape in GPU_SHAPES] + [(torch.float16, shape) for shape in GPU_SHAPES[:3]]


@requires_cuda
@pytest.mark.parametrize("dtype,shape", GPU_CASES)
@pytest.mark.parametrize("tangent_set", ["all", "tq_only", "tk_tv", "tv_only", "none"])
def test_gpu_triton_forward(dtype, shape, tangent_set, monkeypatch):
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "triton")
    q, k, v, tq, tk, tv = _inputs(*shape, dtype, "cuda", TANGENT_SETS[tangent_set])
    assert attention_ops._forward_backend(q) == "triton"
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    _check_against_math(o, to, (q, k, v, tq, tk, tv), dtype, zero_tangent=tangent_set == "none")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [[1, 130], [0, 77], [129, 64]])
@pytest.mark.parametrize("kernel", ["triton", "cuda"])
def test_gpu_key_lengths_and_noncontiguous(dtype, lengths, kernel, monkeypatch):
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", kernel)
    q, k, v, tq, tk, tv = _inputs(2, 2, 45, 130, 72, dtype, "cuda")
    key_lengths = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    args = [noncontiguous(x) for x in (q, k, v, tq, tk, tv)]
    o, to = attention_jvp(*args, key_lengths=key_lengths)
    _check_against_math(o, to, (q, k, v, tq, tk, tv), dtype, key_lengths=key_lengths)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [80, 96])
@pytest.mark.parametrize("tangent_set", ["all", "tq_only", "tk_tv", "tv_only"])
def test_gpu_exact_head_split(dtype, head_dim, tangent_set, monkeypatch):
    # The opt-in two-dot head split (FACM_EXT_ATTN_HEAD_SPLIT=1), with key lengths and non-contiguous inputs.
    monkeypatch.setenv("FACM_EXT_ATTN_HEAD_SPLIT", "1")
    q, k, v, tq, tk, tv = _inputs(2, 2, 45, 130, head_dim, dtype, "cuda", TANGENT_SETS[tangent_set])
    key_lengths = torch.tensor([77, 130], device="cuda")
    o, to = attention_jvp(*[None if x is None else noncontiguous(x) for x in (q, k, v, tq, tk, tv)],
                          key_lengths=key_lengths)
    _check_against_math(o, to, (q, k, v, tq, tk, tv), dtype, key_lengths=key_lengths)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tangent_set", ["all", "tq_only", "tk_tv", "none"])
@pytest.mark.parametrize("shape,lengths", [((2, 3, 130, 130, 72), None), ((2, 2, 1, 17, 72), None),
                                           ((2, 2, 45, 130, 72), [77, 130]), ((1, 2, 64, 80, 80), None)])
def test_gpu_align_hints(dtype, tangent_set, shape, lengths, monkeypatch):
    # The opt-in FACM_EXT_ATTN_ALIGN_HINTS=1 path (16-byte row loads of 72/80-wide heads).
    from facm_ext.kernels import attention_jvp_triton

    monkeypatch.setenv("FACM_EXT_ATTN_ALIGN_HINTS", "1")
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "triton")
    q, k, v, tq, tk, tv = _inputs(*shape, dtype, "cuda", TANGENT_SETS[tangent_set])
    assert attention_jvp_triton._align_hints(q, k, v)
    key_lengths = None if lengths is None else torch.tensor(lengths, device="cuda")
    o, to = attention_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    _check_against_math(o, to, (q, k, v, tq, tk, tv), dtype, key_lengths=key_lengths,
                        zero_tangent=tangent_set == "none")


CUDA_KERNEL_SHAPES = [(2, 3, 1, 17, 72), (2, 2, 130, 130, 72), (1, 1, 64, 64, 72), (1, 2, 200, 1, 72),
                      (2, 1, 65, 129, 72), (1, 2, 257, 64, 64), (1, 2, 100, 77, 80), (1, 2, 129, 200, 96)]
CUDA_KERNEL_TANGENTS = {"all": (True, True, True), "tq_only": (True, False, False), "tk_tv": (False, True, True),
                        "tq_tv": (True, False, True), "tk_only": (False, True, False)}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CUDA_KERNEL_SHAPES)
@pytest.mark.parametrize("tangent_set", list(CUDA_KERNEL_TANGENTS))
def test_gpu_cuda_forward(dtype, shape, tangent_set, monkeypatch):
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "cuda")
    q, k, v, tq, tk, tv = _inputs(*shape, dtype, "cuda", CUDA_KERNEL_TANGENTS[tangent_set])
    assert attention_ops._forward_backend(q, tq, tk) == "cuda"
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    _check_against_math(o, to, (q, k, v, tq, tk, tv), dtype)


def _packed_views(*tensors):
    """[B, H, L, D] tensors as views of one [B, L, n, H, D] buffer (the layout a fused qkv projection gives):
    unit channel stride, strided rows, taken by the CUDA kernel without a copy."""
    batch, heads, length, head_dim = tensors[0].shape
    buf = torch.empty(batch, length, len(tensors), heads, head_dim, dtype=tensors[0].dtype, device=tensors[0].device)
    views = []
    for i, t in enumerate(tensors):
        view = buf[:, :, i].permute(0, 2, 1, 3)
        view.copy_(t)
        views.append(view)
    return views


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_strided_and_misaligned_operands(dtype, monkeypatch):
    # Packed-qkv views go to the kernel as they are; a misaligned or channel-strided operand is copied first.
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "cuda")
    q, k, v, tq, tk, tv = _inputs(2, 3, 77, 77, 72, dtype, "cuda")
    pq, pk, pv = _packed_views(q, k, v)
    ptq, ptk, ptv = _packed_views(tq, tk, tv)
    o, to = attention_jvp(pq, pk, pv, ptq, ptk, ptv)
    _check_against_math(o, to, (q, k, v, tq, tk, tv), dtype)
    o2, to2 = attention_jvp(misaligned(q), noncontiguous(k), v, tq, misaligned(tk), noncontiguous(tv))
    assert torch.equal(o2, o) and torch.equal(to2, to)


@requires_cuda
def test_gpu_cuda_kernel_choice(monkeypatch):
    q, k, v, tq, tk, tv = _inputs(1, 2, 33, 40, 72, torch.bfloat16, "cuda")
    assert attention_ops._forward_backend(q, tq, tk) == "cuda"  # the default for head_dim 72
    assert attention_ops._forward_backend(q, None, None) == "triton"  # no score tangent: Triton
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "triton")
    assert attention_ops._forward_backend(q, tq, tk) == "triton"
    monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", "cuda")
    q128, *_ = _inputs(1, 2, 33, 40, 128, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="q: head_dim 128 is not supported by the CUDA attention kernel"):
        attention_jvp(q128, q128, q128, q128)
    q32 = q.float()
    with pytest.raises(ValueError, match="q: dtype torch.float32 is not supported by the CUDA attention kernel"):
        attention_jvp(q32, q32, q32, q32)
    with pytest.raises(RuntimeError, match="attention_jvp_cuda: needs tq or tk"):
        torch.ops.facm_ext.attention_jvp_cuda(q, k, v, None, None, tv, None, 0.1)


@requires_cuda
def test_gpu_cuda_kernel_op_opcheck():
    # The compiled kernel op itself: schema, fake implementation (shapes, strides, dtypes) against the real one.
    if not attention_ops._extension.has_kernel(attention_ops._CUDA_KERNEL):
        pytest.skip("facm_ext._C has no CUDA attention kernel")
    kernel = getattr(torch.ops.facm_ext, attention_ops._CUDA_KERNEL).default
    q, k, v, tq, tk, tv = _inputs(2, 3, 33, 70, 72, torch.bfloat16, "cuda")
    lengths = torch.tensor([70, 9], device="cuda")
    torch.library.opcheck(kernel, (q, k, v, tq, tk, tv, None, 0.1))
    torch.library.opcheck(kernel, (q, k, v, tq, None, None, lengths, 0.1))


@requires_cuda
def test_gpu_fp32_and_unsupported_head_dim_use_the_math_path():
    q, k, v, tq, tk, tv = _inputs(1, 2, 33, 40, 72, torch.float32, "cuda")
    assert attention_ops._forward_backend(q) == "reference"
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv)
    assert_rel_close(o, ref_o, torch.float32, what="o")
    assert_rel_close(to, ref_to, torch.float32, what="to")
    q, k, v, tq, tk, tv = _inputs(1, 2, 33, 40, 100, torch.bfloat16, "cuda")
    assert attention_ops._forward_backend(q) == "reference"
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv)
    assert_rel_close(o, ref_o, torch.bfloat16, what="o")
    assert_rel_close(to, ref_to, torch.bfloat16, what="to")


def _check_gpu_backward(backend, dtype, shape, key_lengths, monkeypatch):
    monkeypatch.setenv("FACM_EXT_ATTN_BACKWARD", backend)
    q, k, v, tq, tk, tv = _inputs(*shape, dtype, "cuda")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, _ = attention_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad)
    primals64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(attention(*primals64, key_lengths=key_lengths), primals64, grad.double())
    primals_lo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    math_lo = torch.autograd.grad(attention(*primals_lo, key_lengths=key_lengths), primals_lo, grad)
    for g, w, m, name in zip(got, want, math_lo, "qkv"):
        _bounded(g, w, m, dtype, f"d{name} ({backend} backward)")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 130, 130, 72), (1, 2, 17, 200, 128), (1, 2, 257, 64, 64), (1, 2, 64, 96, 80)])
@pytest.mark.parametrize("backend", ["flash", "triton", "cudnn"])
def test_gpu_backward(backend, dtype, shape, monkeypatch):
    _check_gpu_backward(backend, dtype, shape, None, monkeypatch)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backward_key_lengths(dtype, monkeypatch):
    key_lengths = torch.tensor([0, 77, 130], device="cuda")
    _check_gpu_backward("triton", dtype, (3, 2, 45, 130, 72), key_lengths, monkeypatch)


@requires_cuda
def test_gpu_default_backward_choice():
    q = torch.empty(1, 1, 8, 72, device="cuda", dtype=torch.bfloat16)
    fused = "cudnn" if attention_ops._cudnn_ok() else "flash"
    assert attention_ops._backward_backend(q, False) == fused
    assert attention_ops._backward_backend(q, True) == "triton"
    q256 = torch.empty(1, 1, 8, 256, device="cuda", dtype=torch.bfloat16)
    assert attention_ops._backward_backend(q256, False) == "flash"


@requires_cuda
@pytest.mark.parametrize("shape", [(1, 16, 4096, 4096, 128), (16, 16, 1024, 1024, 72), (2, 16, 2048, 512, 128)])
def test_gpu_large(shape):
    dtype = torch.bfloat16
    tangents = (True, False, False) if shape[3] != shape[2] else (True, True, True)
    q, k, v, tq, tk, tv = _inputs(*shape, dtype, "cuda", tangents)
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    _check_against_math(o, to, (q, k, v, tq, tk, tv), dtype)


@requires_cuda
def test_gpu_large_backward():
    dtype = torch.bfloat16
    q, k, v, tq, tk, tv = _inputs(1, 16, 2048, 2048, 128, dtype, "cuda")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, _ = attention_jvp(q, k, v, tq, tk, tv)
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad)
    primals64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(attention(*primals64), primals64, grad.double())
    primals_lo = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    math_lo = torch.autograd.grad(attention(*primals_lo), primals_lo, grad)
    for g, w, m, name in zip(got, want, math_lo, "qkv"):
        _bounded(g, w, m, dtype, f"d{name}")


@requires_cuda
def test_gpu_torch_compile_fullgraph():
    q, k, v, tq, tk, tv = _inputs(2, 4, 64, 80, 72, torch.bfloat16, "cuda")
    q.requires_grad_()

    def step(q, k, v, tq, tk, tv):
        o, to = attention_jvp(q, k, v, tq, tk, tv, scale=0.1)
        return o.float().square().sum(), to

    loss, to = torch.compile(step, fullgraph=True)(q, k, v, tq, tk, tv)
    loss_eager, to_eager = step(q, k, v, tq, tk, tv)
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(to, to_eager)
    (g,) = torch.autograd.grad(loss, q)
    (g_eager,) = torch.autograd.grad(loss_eager, q)
    torch.testing.assert_close(g, g_eager)


@requires_cuda
def test_gpu_output_shapes_match_sdpa():
    q, k, v, *_ = _inputs(2, 4, 33, 50, 128, torch.bfloat16, "cuda", (False, False, False))
    o, _ = attention_jvp(q, k, v, scale=1 / math.sqrt(100.0))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(100.0))
    assert_rel_close(o, sdpa.double(), torch.bfloat16, what="o vs SDPA")
