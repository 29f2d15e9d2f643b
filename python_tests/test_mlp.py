"""mlp_jvp against torch.func.jvp (and autograd) of facm_ext.reference.mlp.mlp in float64.

CPU: the reference path in every float dtype, both activations, odd sizes, non-contiguous views, None tangents,
primal gradients (with and without the saved pre-activation), autocast, validation, opcheck, torch.compile.
GPU (requires_cuda): the fused Triton path (fp16/bf16) and the reference path (fp32), gradients, autocast, and
the official module layouts (timm Mlp, LightningDiT SwiGLUFFN half order). Kernel under the CPU interpreter:
test_mlp_interpreter.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close, noncontiguous, requires_cuda
from facm_ext.ops import _common, mlp_jvp
from facm_ext.ops import linear as linear_ops
from facm_ext.reference.mlp import mlp

ACTIVATIONS = ["gelu_tanh", "swiglu"]
PARAM_NAMES = ("w1", "b1", "w2", "b2")


def _inputs(lead, k, hidden, k_out, activation, dtype, device, *, bias=True, tangent=True):
    gen = torch.Generator(device="cpu").manual_seed(7 * k + 3 * hidden + k_out + (activation == "swiglu"))

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    n1 = 2 * hidden if activation == "swiglu" else hidden
    x = rand(*lead, k)
    tx = rand(*lead, k) if tangent else None
    params = (rand(n1, k, scale=k ** -0.5), rand(n1) if bias else None,
              rand(k_out, hidden, scale=hidden ** -0.5), rand(k_out) if bias else None)
    return x, tx, params


def _reference_jvp(x, tx, params, activation):
    p64 = tuple(None if p is None else p.double() for p in params)
    x64 = x.double()
    t64 = torch.zeros_like(x64) if tx is None else tx.double()
    return torch.func.jvp(lambda z: mlp(z, *p64, activation), (x64,), (t64,))


def _grads_vs_float64(x, tx, params, activation, dtype, *, factor=1.0):
    """Primal gradients of mlp_jvp against autograd of the reference in float64 (same rounded inputs)."""
    names = ["x"] + [n for n, p in zip(PARAM_NAMES, params) if p is not None]
    leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params if p is not None]
    by_name = dict(zip(names, leaves))
    y, ty = mlp_jvp(by_name["x"], tx, *(by_name.get(n) for n in PARAM_NAMES), activation=activation)
    assert y.requires_grad and not ty.requires_grad and ty.grad_fn is None
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    by_name64 = dict(zip(names, leaves64))
    ref = mlp(by_name64["x"], *(by_name64.get(n) for n in PARAM_NAMES), activation)
    want = torch.autograd.grad(ref, leaves64, grad_out.double())
    for name, g, w in zip(names, got, want):
        assert g.dtype == dtype, name
        assert_rel_close(g, w, dtype, what=f"grad of {name}", factor=factor)


# ------------------------------------------------------------------------------------------------------- CPU path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k,hidden,k_out", [((2, 5), 72, 37, 72), ((3,), 1152, 96, 1152), ((9,), 13, 1152, 5)])
@pytest.mark.parametrize("tangent", [True, False])
def test_reference_path_matches_jvp(dtype, activation, lead, k, hidden, k_out, tangent):
    x, tx, params = _inputs(lead, k, hidden, k_out, activation, dtype, "cpu", tangent=tangent)
    y, ty = mlp_jvp(x, tx, *params, activation=activation)
    ref_y, ref_ty = _reference_jvp(x, tx, params, activation)
    assert y.dtype == dtype and ty.dtype == dtype and y.shape == (*lead, k_out)
    assert_rel_close(y, ref_y, dtype, what="y")
    if tangent:
        assert_rel_close(ty, ref_ty, dtype, what="ty")
    else:
        assert torch.count_nonzero(ty) == 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_noncontiguous_and_no_bias(activation):
    x, tx, params = _inputs((3, 4), 24, 17, 11, activation, torch.float64, "cpu", bias=False)
    w1, _, w2, _ = params
    y, ty = mlp_jvp(noncontiguous(x), noncontiguous(tx), w1.t().contiguous().t(), None, noncontiguous(w2), None,
                    activation=activation)
    ref_y, ref_ty = _reference_jvp(x, tx, params, activation)
    assert_rel_close(y, ref_y, torch.float64, what="y")
    assert_rel_close(ty, ref_ty, torch.float64, what="ty")


def test_swiglu_half_order_matches_lightningdit():
    """LightningDiT SwiGLUFFN: x1, x2 = w12(x).chunk(2, -1); w3(silu(x1) * x2) -- the first half is gated by silu."""
    x, tx, (w12, b12, w3, b3) = _inputs((4,), 10, 6, 8, "swiglu", torch.float64, "cpu")
    x12 = F.linear(x, w12, b12)
    want = F.linear(F.silu(x12[..., :6]) * x12[..., 6:], w3, b3)
    y, _ = mlp_jvp(x, tx, w12, b12, w3, b3, activation="swiglu")
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    swapped = torch.cat([w12[6:], w12[:6]])
    y_swapped, _ = mlp_jvp(x, tx, swapped, torch.cat([b12[6:], b12[:6]]), w3, b3, activation="swiglu")
    assert not torch.allclose(y_swapped, want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_primal_gradients_match_autograd(activation, bias):
    x, tx, params = _inputs((2, 3), 12, 10, 9, activation, torch.float64, "cpu", bias=bias)
    _grads_vs_float64(x, tx, params, activation, torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_without_saved_pre_activation(activation):
    """A direct op call with save_for_backward=False recomputes the pre-activation in the backward."""
    x, tx, params = _inputs((6,), 8, 5, 7, activation, torch.float64, "cpu")
    leaves = [x.clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
    y, _, pre, _ = torch.ops.facm_ext.mlp_jvp(leaves[0], tx, *leaves[1:], activation, False)
    assert pre.numel() == 0
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad_out)
    want = torch.autograd.grad(mlp(*leaves, activation), leaves, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_no_pre_activation_kept_without_grad():
    x, tx, params = _inputs((6,), 8, 5, 7, "gelu_tanh", torch.float64, "cpu")
    y, ty = mlp_jvp(x, tx, *params)
    assert not y.requires_grad and not ty.requires_grad


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_autocast_casts_like_f_linear(activation):
    x, tx, params = _inputs((4, 3), 16, 8, 16, activation, torch.float32, "cpu")
    w1 = params[0].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ty = mlp_jvp(x, tx, w1, *params[1:], activation=activation)
        want = mlp(x, w1, *params[1:], activation)
    assert y.dtype == want.dtype == torch.bfloat16 and ty.dtype == torch.bfloat16
    assert_rel_close(y, want, torch.bfloat16, what="y vs the reference under autocast")
    params16 = tuple(p.bfloat16() for p in params)
    assert_rel_close(ty, _reference_jvp(x.bfloat16(), tx.bfloat16(), params16, activation)[1], torch.bfloat16,
                     what="ty")
    y.float().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32


@pytest.mark.parametrize("case,name", [
    ("activation", "activation"), ("x_not_tensor", "x"), ("w1_k", "w1"), ("w1_odd_swiglu", "w1"),
    ("b1_shape", "b1"), ("w2_hidden", "w2"), ("b2_shape", "b2"), ("tx_shape", "tx"), ("w2_dtype", "w2"),
    ("w1_1d", "w1"),
])
def test_bad_arguments_raise_value_error(case, name):
    activation = "swiglu"
    x, tx, (w1, b1, w2, b2) = _inputs((3,), 8, 6, 5, activation, torch.float32, "cpu")
    args = {"x": x, "tx": tx, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "activation": activation}
    if case == "activation":
        args["activation"] = "relu"
    elif case == "x_not_tensor":
        args["x"] = 1.0
    elif case == "w1_k":
        args["w1"] = w1[:, :7]
    elif case == "w1_odd_swiglu":
        args["w1"], args["b1"] = w1[:11], b1[:11]
    elif case == "b1_shape":
        args["b1"] = b1[:5]
    elif case == "w2_hidden":
        args["w2"] = torch.randn(5, 12)  # the gelu hidden width, not the swiglu one
    elif case == "b2_shape":
        args["b2"] = b2[:3]
    elif case == "tx_shape":
        args["tx"] = tx[:1]
    elif case == "w2_dtype":
        args["w2"] = w2.double()
    elif case == "w1_1d":
        args["w1"] = w1[0]
    with pytest.raises(ValueError, match=rf"^{name}:"):
        mlp_jvp(**args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck(activation):
    x, tx, params = _inputs((2, 3), 8, 5, 7, activation, torch.float64, "cpu")
    args = (x.requires_grad_(), tx, *(p.requires_grad_() for p in params))
    torch.library.opcheck(torch.ops.facm_ext.mlp_jvp.default, (*args, activation, True))
    torch.library.opcheck(torch.ops.facm_ext.mlp_jvp.default, (x, None, params[0], None, params[2], None,
                                                                activation, False))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_compile_fullgraph(activation):
    x, tx, params = _inputs((2, 3), 8, 5, 7, activation, torch.float64, "cpu")
    w1 = params[0].clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, ta, *p: mlp_jvp(a, ta, *p, activation=activation), backend="aot_eager",
                             fullgraph=True)
    y, ty = compiled(x, tx, w1, *params[1:])
    ref_y, ref_ty = _reference_jvp(x, tx, params, activation)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(ty, ref_ty)
    assert not ty.requires_grad
    (g,) = torch.autograd.grad(y.sum(), (w1,))
    (want,) = torch.autograd.grad(mlp(x, w1, *params[1:], activation).sum(), (w1,))
    torch.testing.assert_close(g, want)


def test_op_info_registered():
    assert set(_common.OP_REGISTRY["mlp_jvp"].backends) == {"triton", "reference"}


# ------------------------------------------------------------------------------------------------------- GPU path
GPU_SHAPES = [((37,), 72, 40, 72), ((2, 33), 1152, 96, 1152), ((3, 7), 100, 333, 50), ((129,), 256, 3072, 64)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k,hidden,k_out", GPU_SHAPES)
@pytest.mark.parametrize("tangent", [True, False])
def test_gpu_matches_jvp(dtype, activation, lead, k, hidden, k_out, tangent):
    x, tx, params = _inputs(lead, k, hidden, k_out, activation, dtype, "cuda", tangent=tangent)
    if dtype != torch.float32 and _common._forced_backend() is None:
        assert linear_ops.use_dual_gemm(x, tx, *params, by_default=True)
    y, ty = mlp_jvp(x, tx, *params, activation=activation)
    ref_y, ref_ty = _reference_jvp(x, tx, params, activation)
    assert y.dtype == dtype and ty.dtype == dtype and y.is_cuda
    # two roundings to the storage dtype (hidden, output) instead of one
    assert_rel_close(y, ref_y, dtype, what="y", factor=2.0)
    if tangent:
        assert_rel_close(ty, ref_ty, dtype, what="ty", factor=2.0)
    else:
        assert torch.count_nonzero(ty) == 0


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_noncontiguous_no_bias(dtype, activation):
    x, tx, params = _inputs((3, 41), 72, 40, 72, activation, dtype, "cuda", bias=False)
    w1, _, w2, _ = params
    y, ty = mlp_jvp(noncontiguous(x), noncontiguous(tx), w1.t().contiguous().t(), None, w2, None,
                    activation=activation)
    ref_y, ref_ty = _reference_jvp(x, tx, params, activation)
    assert_rel_close(y, ref_y, dtype, what="y", factor=2.0)
    assert_rel_close(ty, ref_ty, dtype, what="ty", factor=2.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_primal_gradients(dtype, activation):
    x, tx, params = _inputs((2, 45), 72, 80, 72, activation, dtype, "cuda")
    _grads_vs_float64(x, tx, params, activation, dtype, factor=2.0)


@requires_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_autocast_fp32_params(activation):
    x, tx, params = _inputs((4, 37), 72, 96, 72, activation, torch.float32, "cuda")
    w1 = params[0].clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, ty = mlp_jvp(x, tx, w1, *params[1:], activation=activation)
        want = mlp(x, w1, *params[1:], activation)
    assert y.dtype == want.dtype == torch.bfloat16 and ty.dtype == torch.bfloat16
    assert_rel_close(y, want, torch.bfloat16, what="y vs the reference under autocast", factor=2.0)
    params16 = tuple(p.bfloat16() for p in params)
    ref_ty = _reference_jvp(x.bfloat16(), tx.bfloat16(), params16, activation)[1]
    assert_rel_close(ty, ref_ty, torch.bfloat16, what="ty", factor=2.0)
    y.float().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_torch_compile_fullgraph(activation):
    x, tx, params = _inputs((2, 40), 72, 64, 72, activation, torch.bfloat16, "cuda")
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, ta, *p: mlp_jvp(a, ta, *p, activation=activation), fullgraph=True)
    y, ty = compiled(x, tx, *params)
    ref_y, ref_ty = _reference_jvp(x, tx, params, activation)
    assert_rel_close(y, ref_y, torch.bfloat16, what="y", factor=2.0)
    assert_rel_close(ty, ref_ty, torch.bfloat16, what="ty", factor=2.0)


# FACM_EXT_BACKEND=triton: the down-projection on the dual GEMM too; FACM_EXT_MLP_UP=cublas: cuBLAS up-projection
# followed by the separate Triton activation-JVP pass; FACM_EXT_DUAL_GEMM=pointer: pointer loads instead of the
# default TMA descriptors.
GPU_VARIANTS = {
    "triton_down": [("FACM_EXT_BACKEND", "triton")],
    "cublas_up": [("FACM_EXT_MLP_UP", "cublas")],
    "pointer": [("FACM_EXT_DUAL_GEMM", "pointer")],
    "pointer_triton_down": [("FACM_EXT_DUAL_GEMM", "pointer"), ("FACM_EXT_BACKEND", "triton")],
}


@requires_cuda
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k,hidden,k_out", [((37,), 72, 40, 72), ((3, 7), 100, 333, 50), ((2, 99), 1152, 96, 64)])
def test_gpu_variants_match_jvp(variant, dtype, activation, lead, k, hidden, k_out, monkeypatch):
    for var, value in GPU_VARIANTS[variant]:
        monkeypatch.setenv(var, value)
    x, tx, params = _inputs(lead, k, hidden, k_out, activation, dtype, "cuda")
    y, ty = mlp_jvp(x, tx, *params, activation=activation)
    ref_y, ref_ty = _reference_jvp(x, tx, params, activation)
    assert_rel_close(y, ref_y, dtype, what="y", factor=2.0)
    assert_rel_close(ty, ref_ty, dtype, what="ty", factor=2.0)
    y0, ty0 = mlp_jvp(x, None, *params, activation=activation)
    assert_rel_close(y0, ref_y, dtype, what="y (no tangent)", factor=2.0)
    assert torch.count_nonzero(ty0) == 0


@requires_cuda
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_variants_primal_gradients(variant, activation, monkeypatch):
    for var, value in GPU_VARIANTS[variant]:
        monkeypatch.setenv(var, value)
    x, tx, params = _inputs((2, 45), 72, 80, 72, activation, torch.bfloat16, "cuda")
    _grads_vs_float64(x, tx, params, activation, torch.bfloat16, factor=2.0)
