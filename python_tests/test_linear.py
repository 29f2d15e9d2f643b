"""linear_jvp against torch.func.jvp (and autograd) of facm_ext.reference.linear.linear in float64.

CPU: the reference path in every float dtype, odd sizes, non-contiguous views, None tangents, 1-D inputs, primal
gradients, autocast casting, validation, opcheck, torch.compile(fullgraph=True).
GPU (requires_cuda): the Triton dual GEMM (fp16/bf16) and the cuBLAS path (fp32), including the K tail, strided
inputs, gradients and CUDA autocast. The kernel under Triton's CPU interpreter: test_mlp_interpreter.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close, noncontiguous, requires_cuda
from facm_ext.ops import _common, linear_jvp
from facm_ext.ops import linear as linear_ops
from facm_ext.reference.linear import linear


def _inputs(lead, k, n, dtype, device, *, bias=True, tangent=True, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed + 31 * k + n)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    x = rand(*lead, k)
    tx = rand(*lead, k) if tangent else None
    weight = rand(n, k, scale=k ** -0.5)
    b = rand(n) if bias else None
    return x, tx, weight, b


def _reference_jvp(x, tx, weight, bias):
    """torch.func.jvp of the reference in float64 (the ground truth); a None tangent is zero."""
    x64, w64 = x.double(), weight.double()
    b64 = None if bias is None else bias.double()
    t64 = torch.zeros_like(x64) if tx is None else tx.double()
    return torch.func.jvp(lambda z: linear(z, w64, b64), (x64,), (t64,))


# ------------------------------------------------------------------------------------------------------- CPU path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n", [((2, 5), 72, 37), ((3,), 1152, 72), ((7,), 13, 1152), ((1, 2, 3), 9, 5120)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_path_matches_jvp(dtype, lead, k, n, bias):
    x, tx, weight, b = _inputs(lead, k, n, dtype, "cpu", bias=bias)
    y, ty = linear_jvp(x, tx, weight, b)
    ref_y, ref_ty = _reference_jvp(x, tx, weight, b)
    assert y.dtype == dtype and ty.dtype == dtype
    assert_rel_close(y, ref_y, dtype, what="y")
    assert_rel_close(ty, ref_ty, dtype, what="ty")


def test_bias_only_on_primal():
    x, tx, weight, b = _inputs((4,), 8, 6, torch.float64, "cpu")
    b = b + 100.0
    y, ty = linear_jvp(x, tx, weight, b)
    torch.testing.assert_close(ty, tx @ weight.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, x @ weight.t() + b, rtol=1e-12, atol=1e-12)


def test_noncontiguous_inputs():
    x, tx, weight, b = _inputs((3, 4), 72, 29, torch.float64, "cpu")
    weight_view = weight.t().contiguous().t()  # transposed strides
    y, ty = linear_jvp(noncontiguous(x), noncontiguous(tx), weight_view, noncontiguous(b))
    ref_y, ref_ty = _reference_jvp(x, tx, weight, b)
    assert_rel_close(y, ref_y, torch.float64, what="y")
    assert_rel_close(ty, ref_ty, torch.float64, what="ty")


def test_none_tangent_gives_zeros():
    x, _, weight, b = _inputs((2, 3), 10, 7, torch.float32, "cpu", tangent=False)
    y, ty = linear_jvp(x, None, weight, b)
    assert ty.shape == y.shape and ty.dtype == y.dtype
    assert torch.count_nonzero(ty) == 0
    assert_rel_close(y, _reference_jvp(x, None, weight, b)[0], torch.float32, what="y")


def test_one_dim_and_empty_inputs():
    x, tx, weight, b = _inputs((), 11, 5, torch.float64, "cpu")
    y, ty = linear_jvp(x, tx, weight, b)
    ref_y, ref_ty = _reference_jvp(x, tx, weight, b)
    assert y.shape == (5,)
    assert_rel_close(y, ref_y, torch.float64, what="y")
    assert_rel_close(ty, ref_ty, torch.float64, what="ty")
    x0, tx0, weight, b = _inputs((0, 3), 11, 5, torch.float64, "cpu")
    y0, ty0 = linear_jvp(x0, tx0, weight, b)
    assert y0.shape == (0, 3, 5) and ty0.shape == (0, 3, 5)


@pytest.mark.parametrize("bias", [True, False])
def test_primal_gradients_match_autograd(bias):
    x, tx, weight, b = _inputs((2, 3), 12, 9, torch.float64, "cpu", bias=bias)
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    xs, ws = leaves[0], leaves[1]
    bs = leaves[2] if bias else None
    y, ty = linear_jvp(xs, tx, ws, bs)
    assert y.requires_grad and not ty.requires_grad and ty.grad_fn is None
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad_out)
    want = torch.autograd.grad(linear(xs, ws, bs), leaves, grad_out)
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")


def test_gradient_only_for_weight():
    x, tx, weight, b = _inputs((5,), 6, 4, torch.float64, "cpu")
    w = weight.clone().requires_grad_()
    y, _ = linear_jvp(x, tx, w, b)
    (gw,) = torch.autograd.grad(y.square().sum(), (w,))
    (want,) = torch.autograd.grad(linear(x, w, b).square().sum(), (w,))
    torch.testing.assert_close(gw, want)


def test_cpu_autocast_casts_like_f_linear():
    x, tx, weight, b = _inputs((4, 3), 16, 8, torch.float32, "cpu")
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ty = linear_jvp(x, tx, w, b)
        want = F.linear(x, w, b)
    assert y.dtype == want.dtype == torch.bfloat16 and ty.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)
    ref_ty = F.linear(tx.bfloat16(), weight.bfloat16())
    torch.testing.assert_close(ty, ref_ty)
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


def test_autocast_with_float64_input_is_rejected_like_f_linear():
    x, tx, weight, b = _inputs((4,), 16, 8, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="weight"):
            linear_jvp(x.double(), tx.double(), weight, b)


@pytest.mark.parametrize("case,name", [
    ("x_not_tensor", "x"), ("weight_k", "weight"), ("weight_3d", "weight"), ("bias_shape", "bias"),
    ("bias_2d", "bias"), ("tx_shape", "tx"), ("weight_dtype", "weight"), ("tx_dtype", "tx"), ("x_int", "x"),
])
def test_bad_arguments_raise_value_error(case, name):
    x, tx, weight, b = _inputs((3,), 8, 5, torch.float32, "cpu")
    args = {"x": x, "tx": tx, "weight": weight, "bias": b}
    if case == "x_not_tensor":
        args["x"] = x.tolist()
    elif case == "weight_k":
        args["weight"] = weight[:, :7]
    elif case == "weight_3d":
        args["weight"] = weight[None]
    elif case == "bias_shape":
        args["bias"] = b[:4]
    elif case == "bias_2d":
        args["bias"] = b[None]
    elif case == "tx_shape":
        args["tx"] = tx[:2]
    elif case == "weight_dtype":
        args["weight"] = weight.double()
    elif case == "tx_dtype":
        args["tx"] = tx.half()
    elif case == "x_int":
        args["x"] = x.long()
    with pytest.raises(ValueError, match=rf"^{name}:"):
        linear_jvp(**args)


@pytest.mark.parametrize("with_tangent", [True, False])
def test_opcheck(with_tangent):
    x, tx, weight, b = _inputs((2, 3), 8, 5, torch.float64, "cpu", tangent=with_tangent)
    args = (x.requires_grad_(), tx, weight.requires_grad_(), b.requires_grad_())
    torch.library.opcheck(torch.ops.facm_ext.linear_jvp.default, args)
    torch.library.opcheck(torch.ops.facm_ext.linear_jvp.default, (x, tx, weight, None))


def test_torch_compile_fullgraph():
    x, tx, weight, b = _inputs((2, 3), 8, 5, torch.float64, "cpu")
    w = weight.clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, ta, ww, bb: linear_jvp(a, ta, ww, bb), backend="aot_eager", fullgraph=True)
    y, ty = compiled(x, tx, w, b)
    ref_y, ref_ty = _reference_jvp(x, tx, weight, b)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(ty, ref_ty)
    assert not ty.requires_grad
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    (want,) = torch.autograd.grad(linear(x, w, b).sum(), (w,))
    torch.testing.assert_close(gw, want)


def test_op_info_registered():
    info = _common.OP_REGISTRY["linear_jvp"]
    assert set(info.backends) == {"triton", "reference"}


# ------------------------------------------------------------------------------------------------------- GPU path
GPU_SHAPES = [((37,), 72, 1152), ((2, 19), 1152, 72), ((5, 7), 100, 333), ((3,), 1152, 5120), ((4, 64), 256, 256)]


def _set_backend(backend, monkeypatch):
    """default (cuBLAS) | triton (the dual GEMM, TMA loads where allowed) | triton_pointer (pointer loads)."""
    if backend != "default":
        monkeypatch.setenv("FACM_EXT_BACKEND", "triton")
    if backend == "triton_pointer":
        monkeypatch.setenv("FACM_EXT_DUAL_GEMM", "pointer")


@requires_cuda
@pytest.mark.parametrize("backend", ["default", "triton", "triton_pointer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,k,n", GPU_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_matches_jvp(backend, dtype, lead, k, n, bias, monkeypatch):
    if backend != "default" and dtype == torch.float32:
        pytest.skip("fp32 stays on cuBLAS")
    _set_backend(backend, monkeypatch)
    x, tx, weight, b = _inputs(lead, k, n, dtype, "cuda", bias=bias)
    expect_dual_gemm = backend != "default" or (linear_ops.LINEAR_DUAL_GEMM_BY_DEFAULT and dtype != torch.float32)
    assert linear_ops.use_dual_gemm(x, tx, weight, b, by_default=linear_ops.LINEAR_DUAL_GEMM_BY_DEFAULT) == \
        expect_dual_gemm
    y, ty = linear_jvp(x, tx, weight, b)
    ref_y, ref_ty = _reference_jvp(x, tx, weight, b)
    assert y.dtype == dtype and ty.dtype == dtype and y.is_cuda
    assert_rel_close(y, ref_y, dtype, what="y")
    assert_rel_close(ty, ref_ty, dtype, what="ty")


@requires_cuda
@pytest.mark.parametrize("backend", ["default", "triton", "triton_pointer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_noncontiguous_and_none_tangent(backend, dtype, monkeypatch):
    _set_backend(backend, monkeypatch)
    x, tx, weight, b = _inputs((3, 41), 72, 1152, dtype, "cuda")
    y, ty = linear_jvp(noncontiguous(x), noncontiguous(tx), weight.t().contiguous().t(), b)
    ref_y, ref_ty = _reference_jvp(x, tx, weight, b)
    assert_rel_close(y, ref_y, dtype, what="y (strided)")
    assert_rel_close(ty, ref_ty, dtype, what="ty (strided)")
    y0, ty0 = linear_jvp(x, None, weight, b)
    assert_rel_close(y0, ref_y, dtype, what="y (no tangent)")
    assert torch.count_nonzero(ty0) == 0


@requires_cuda
@pytest.mark.parametrize("backend", ["default", "triton", "triton_pointer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_primal_gradients(backend, dtype, monkeypatch):
    _set_backend(backend, monkeypatch)
    x, tx, weight, b = _inputs((2, 33), 72, 160, dtype, "cuda")
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    y, ty = linear_jvp(leaves[0], tx, leaves[1], leaves[2])
    assert not ty.requires_grad
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(linear(*leaves64), leaves64, grad_out.double())
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert g.dtype == dtype
        assert_rel_close(g, w, dtype, what=f"grad of {name}")


@requires_cuda
def test_gpu_autocast_fp32_params():
    x, tx, weight, b = _inputs((4, 37), 72, 1152, torch.float32, "cuda")
    w = weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, ty = linear_jvp(x, tx, w, b)
        want = F.linear(x, w, b)
    assert y.dtype == want.dtype == torch.bfloat16 and ty.dtype == torch.bfloat16
    assert_rel_close(y, want, torch.bfloat16, what="y vs F.linear under autocast")
    ref_y, ref_ty = _reference_jvp(x.bfloat16(), tx.bfloat16(), weight.bfloat16(), b.bfloat16())
    assert_rel_close(ty, ref_ty, torch.bfloat16, what="ty")
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@requires_cuda
def test_gpu_torch_compile_fullgraph():
    x, tx, weight, b = _inputs((2, 40), 72, 96, torch.bfloat16, "cuda")
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, ta, ww, bb: linear_jvp(a, ta, ww, bb), fullgraph=True)
    y, ty = compiled(x, tx, weight, b)
    ref_y, ref_ty = _reference_jvp(x, tx, weight, b)
    assert_rel_close(y, ref_y, torch.bfloat16, what="y")
    assert_rel_close(ty, ref_ty, torch.bfloat16, what="ty")
