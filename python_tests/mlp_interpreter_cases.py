"""The Triton dual GEMM (linear_jvp and mlp_jvp kernels) run by Triton's CPU interpreter, at small odd shapes in
fp32/fp16 (the interpreter returns garbage for bf16 dots), against torch.func.jvp / autograd of the references in
float64: through the ops (wiring, views, the saved pre-activation used by the backward) and directly (flags).

Not collected by itself (no test_ prefix): test_mlp_interpreter.py runs this module in a subprocess with
TRITON_INTERPRET=1 and FACM_EXT_BACKEND=triton, so the flag never leaks into GPU tests of the same session.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close, noncontiguous
from facm_ext.ops import linear as linear_ops
from facm_ext.ops import linear_jvp, mlp_jvp
from facm_ext.reference.linear import linear
from facm_ext.reference.mlp import mlp

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or
                                os.environ.get("FACM_EXT_BACKEND") != "triton",
                                reason="run by test_mlp_interpreter.py with TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.float16]


def _rand(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).to(dtype)


def _mlp_params(k, hidden, k_out, activation, dtype, bias=True):
    n1 = 2 * hidden if activation == "swiglu" else hidden
    w1 = _rand(n1, k, dtype=dtype, scale=k ** -0.5)
    w2 = _rand(k_out, hidden, dtype=dtype, scale=hidden ** -0.5)
    b1 = _rand(n1, dtype=dtype) if bias else None
    b2 = _rand(k_out, dtype=dtype) if bias else None
    return w1, b1, w2, b2


def _as64(*tensors):
    return tuple(None if t is None else t.double() for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", [((37,), 45, 23), ((2, 9), 72, 70), ((3,), 32, 33), ((1,), 17, 5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tangent", [True, False])
def test_interpreter_linear_jvp(dtype, lead, k, n, bias, tangent):
    assert linear_ops.use_dual_gemm(torch.empty(1, dtype=dtype), by_default=False)
    x, w = _rand(*lead, k, dtype=dtype), _rand(n, k, dtype=dtype, scale=k ** -0.5)
    tx = _rand(*lead, k, dtype=dtype) if tangent else None
    b = _rand(n, dtype=dtype) if bias else None
    y, ty = linear_jvp(x, tx, w, b)
    x64, w64, b64 = _as64(x, w, b)
    t64 = torch.zeros_like(x64) if tx is None else tx.double()
    ref_y, ref_ty = torch.func.jvp(lambda z: linear(z, w64, b64), (x64,), (t64,))
    assert y.dtype == dtype and ty.dtype == dtype
    assert_rel_close(y, ref_y, dtype, what="y")
    if tangent:
        assert_rel_close(ty, ref_ty, dtype, what="ty")
    else:
        assert torch.count_nonzero(ty) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreter_linear_strided(dtype):
    x, tx = _rand(3, 11, 40, dtype=dtype), _rand(3, 11, 40, dtype=dtype)
    w, b = _rand(21, 40, dtype=dtype, scale=0.2), _rand(21, dtype=dtype)
    y, ty = linear_jvp(noncontiguous(x), noncontiguous(tx), w.t().contiguous().t(), b)
    x64, w64, b64 = _as64(x, w, b)
    ref_y, ref_ty = torch.func.jvp(lambda z: linear(z, w64, b64), (x64,), (tx.double(),))
    assert_rel_close(y, ref_y, dtype, what="y")
    assert_rel_close(ty, ref_ty, dtype, what="ty")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("lead,k,hidden,k_out", [((37,), 45, 23, 19), ((2, 9), 72, 40, 72), ((5,), 16, 64, 33)])
@pytest.mark.parametrize("tangent", [True, False])
def test_interpreter_mlp_jvp(dtype, activation, lead, k, hidden, k_out, tangent):
    w1, b1, w2, b2 = _mlp_params(k, hidden, k_out, activation, dtype)
    x = _rand(*lead, k, dtype=dtype)
    tx = _rand(*lead, k, dtype=dtype) if tangent else None
    y, ty = mlp_jvp(x, tx, w1, b1, w2, b2, activation=activation)
    p64 = _as64(w1, b1, w2, b2)
    x64 = x.double()
    t64 = torch.zeros_like(x64) if tx is None else tx.double()
    ref_y, ref_ty = torch.func.jvp(lambda z: mlp(z, *p64, activation), (x64,), (t64,))
    assert_rel_close(y, ref_y, dtype, what="y")
    if tangent:
        assert_rel_close(ty, ref_ty, dtype, what="ty")
    else:
        assert torch.count_nonzero(ty) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_interpreter_mlp_backward_uses_kernel_pre_activation(dtype, activation, bias):
    w1, b1, w2, b2 = _mlp_params(24, 20, 17, activation, dtype, bias=bias)
    x, tx = _rand(3, 13, 24, dtype=dtype), _rand(3, 13, 24, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2) if t is not None]
    xs, w1s, w2s = leaves[0], leaves[1], leaves[3 if bias else 2]
    b1s, b2s = (leaves[2], leaves[4]) if bias else (None, None)
    y, ty = mlp_jvp(noncontiguous(xs), tx, w1s, b1s, w2s, b2s, activation=activation)
    assert not ty.requires_grad
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    l64 = dict(zip(["x", "w1", "b1", "w2", "b2"] if bias else ["x", "w1", "w2"], leaves64))
    ref = mlp(l64["x"], l64["w1"], l64.get("b1"), l64["w2"], l64.get("b2"), activation)
    want = torch.autograd.grad(ref, leaves64, grad_out.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_rel_close(g, w, dtype, what="grad", factor=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("loader", ["tma", "pointer"])
def test_interpreter_dual_gemm_store_pre(dtype, activation, loader, monkeypatch):
    from facm_ext.kernels.mlp_jvp_triton import dual_gemm

    monkeypatch.setenv("FACM_EXT_DUAL_GEMM", loader)

    m, k, n_w = 41, 56, 46  # K * 2 bytes is a multiple of 16: fp16 qualifies for TMA
    x, tx = _rand(m, k, dtype=dtype), _rand(m, k, dtype=dtype)
    w, b = _rand(n_w, k, dtype=dtype, scale=k ** -0.5), _rand(n_w, dtype=dtype)
    out, tout, pre = dual_gemm(x, tx, w, b, activation=activation, store_pre=True)
    pre64 = F.linear(x.double(), w.double(), b.double())
    assert_rel_close(pre, pre64, dtype, what="pre")
    out0, tout0, pre0 = dual_gemm(x, None, w, None, activation=activation)
    assert tout0 is None and pre0 is None
    assert out0.shape == out.shape



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("tangent", [True, False])
def test_interpreter_act_jvp_pass(dtype, activation, tangent):
    """The separate activation-JVP pass (FACM_EXT_MLP_UP=cublas), on a strided pre-activation."""
    from facm_ext.kernels.mlp_jvp_triton import act_jvp

    n1 = 46 if activation == "swiglu" else 23
    pre = noncontiguous(_rand(37, n1, dtype=dtype)).t().contiguous().t()  # column-major rows
    tpre = _rand(37, n1, dtype=dtype) if tangent else None
    out, tout = act_jvp(pre, tpre, activation)
    if activation == "gelu_tanh":
        fn = lambda z: F.gelu(z, approximate="tanh")  # noqa: E731
    else:
        fn = lambda z: F.silu(z.chunk(2, dim=-1)[0]) * z.chunk(2, dim=-1)[1]  # noqa: E731
    t64 = torch.zeros_like(pre, dtype=torch.float64) if tpre is None else tpre.double()
    ref, tref = torch.func.jvp(fn, (pre.double(),), (t64,))
    assert_rel_close(out, ref, dtype, what="act")
    if tangent:
        assert_rel_close(tout, tref, dtype, what="tangent")
    else:
        assert tout is None


@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("tangent", [True, False])
def test_interpreter_dual_gemm_tma_descriptors(activation, tangent, monkeypatch):
    """FACM_EXT_DUAL_GEMM=tma (the default; fp16: descriptors need 16-bit types): rows, columns and K tails out of
    bounds."""
    from facm_ext.kernels import mlp_jvp_triton as kernels

    monkeypatch.setenv("FACM_EXT_DUAL_GEMM", "tma")
    m, k, n_w = 37, 48, 2 * 40
    x, tx = _rand(m, k, dtype=torch.float16), _rand(m, k, dtype=torch.float16) if tangent else None
    w, b = _rand(n_w, k, dtype=torch.float16, scale=k ** -0.5), _rand(n_w, dtype=torch.float16)
    assert kernels._tma_compatible(x, w[: n_w // 2], w[n_w // 2:])
    out, tout, pre = kernels.dual_gemm(x, tx, w, b, activation=activation, store_pre=True)
    pre64 = F.linear(x.double(), w.double(), b.double())
    tpre64 = F.linear(tx.double(), w.double()) if tangent else torch.zeros_like(pre64)
    if activation == "none":
        ref, tref = pre64, tpre64
    elif activation == "gelu_tanh":
        ref, tref = torch.func.jvp(lambda z: F.gelu(z, approximate="tanh"), (pre64,), (tpre64,))
    else:
        ref, tref = torch.func.jvp(lambda z: F.silu(z.chunk(2, dim=-1)[0]) * z.chunk(2, dim=-1)[1], (pre64,),
                                   (tpre64,))
    assert_rel_close(pre, pre64, torch.float16, what="pre")
    assert_rel_close(out, ref, torch.float16, what="out")
    if tangent:
        assert_rel_close(tout, tref, torch.float16, what="tout")
    else:
        assert tout is None
