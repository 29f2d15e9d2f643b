"""Fused MLP JVP: stacked up-projection with the activation's primal and tangent in the GEMM epilogue, then the
stacked down-projection. The primal function is :func:`facm_ext.reference.mlp.mlp`.

Backends (chosen at run time inside the custom op ``torch.ops.facm_ext.mlp_jvp``):
- ``triton``: fp16/bf16 CUDA tensors. Up-projection: one dual-accumulator Triton GEMM over [x; x'] whose epilogue
  writes act(h) and act'(h) h' (SwiGLU: each program owns matching columns of the a and b halves, four fp32
  accumulators), so the pre-activation and its tangent never round-trip through memory; the primal
  pre-activation is stored only when the primal backward needs it. Down-projection: two cuBLAS GEMMs, like
  :func:`facm_ext.ops.linear_jvp` (measured faster than the dual GEMM there); the dual GEMM with
  ``FACM_EXT_BACKEND=triton``. ``FACM_EXT_MLP_UP=cublas`` replaces the fused up-projection by two cuBLAS GEMMs
  and a separate Triton activation-JVP pass (see :func:`up_mode`).
- ``reference``: everything else (CPU, fp32/fp64, ``FACM_EXT_BACKEND=reference``): F.linear + fp32 activation
  formulas + F.linear.

Gradients: the primal output is differentiable w.r.t. x, w1, b1, w2, b2. The saved tensors are the ones a plain
forward's autograd keeps (input, pre-activation, hidden); the backward is PyTorch math (cuBLAS GEMMs and the aten
activation backward kernels). The tangent output never carries a graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from facm_ext import _env
from facm_ext.ops._common import (
    jvp_custom_op,
    OpInfo,
    autocast_disabled,
    check_same_device,
    check_same_dtype,
    check_tangent,
    check_tensor,
    register_op_info,
    use_triton,
    zeros_tangent,
)
from facm_ext.ops.linear import LINEAR_DUAL_GEMM_BY_DEFAULT, TRITON_DTYPES, autocast_cast, use_dual_gemm
from facm_ext.reference.mlp import ACTIVATIONS

register_op_info(OpInfo(
    name="mlp_jvp",
    backends={
        "triton": "fp16/bf16 CUDA tensors: up-projection = dual GEMM with the GELU-tanh/SwiGLU JVP epilogue; "
                  "down-projection = 2 cuBLAS GEMMs (dual GEMM with FACM_EXT_BACKEND=triton)",
        "reference": "CPU, fp32/fp64, or FACM_EXT_BACKEND=reference: F.linear + activation formulas + F.linear",
    },
    notes="dual GEMM loads through TMA descriptors where the operands allow (FACM_EXT_DUAL_GEMM=pointer: never); "
          "FACM_EXT_MLP_UP=cublas: up-projection as 2 cuBLAS GEMMs + a Triton activation-JVP pass instead of the "
          "fused epilogue (measured 2-3% faster on H200, 1.2-2.2x the extra memory); primal backward in PyTorch",
))


def up_mode() -> str:
    """FACM_EXT_MLP_UP: 'fused' (default; the activation JVP in the dual GEMM's epilogue) or 'cublas' (two cuBLAS
    GEMMs, then a separate Triton activation-JVP pass: more memory traffic, cuBLAS GEMM speed).

    Measured on one H200 (bf16, no grad; benchmarks/test_bench_mlp.py): fused (TMA loads) 1.22 ms / 27.5 ms vs
    cublas 1.19 ms / 26.9 ms at the LightningDiT / Wan shapes, with extra peak memory 0.26 vs 0.56 GiB and
    2.3 vs 3.4 GiB. The fused path stays the default for its memory; the speed gap is within 3%."""
    mode = _env.get("FACM_EXT_MLP_UP", "fused").strip().lower() or "fused"
    if mode not in ("fused", "cublas"):
        raise ValueError(f"FACM_EXT_MLP_UP: expected 'fused' or 'cublas', got {mode!r}")
    return mode

_GELU_K = 0.7978845608028654  # sqrt(2 / pi)
_GELU_C = 0.044715


def _hidden_width(w1: torch.Tensor, activation: str) -> int:
    return w1.shape[0] // 2 if activation == "swiglu" else w1.shape[0]


def _check_mlp_args(x, tx, w1, b1, w2, b2, activation, *, autocast: bool) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    check_tensor("x", x, min_ndim=1)
    check_tangent("tx", tx, "x", x)
    check_tensor("w1", w1, ndim=2)
    if w1.shape[1] != x.shape[-1]:
        raise ValueError(f"w1: expected shape [N1, {x.shape[-1]}] (K = last dim of x), got {tuple(w1.shape)}")
    if activation == "swiglu" and w1.shape[0] % 2:
        raise ValueError(f"w1: swiglu needs the fused [2 H, K] weight (an even number of rows), "
                         f"got {tuple(w1.shape)}")
    if b1 is not None:
        check_tensor("b1", b1, ndim=1)
        if b1.shape[0] != w1.shape[0]:
            raise ValueError(f"b1: expected shape [{w1.shape[0]}] (rows of w1), got {tuple(b1.shape)}")
    hidden = _hidden_width(w1, activation)
    check_tensor("w2", w2, ndim=2)
    if w2.shape[1] != hidden:
        raise ValueError(f"w2: expected shape [K_out, {hidden}] (H = hidden width of w1 for {activation}), "
                         f"got {tuple(w2.shape)}")
    if b2 is not None:
        check_tensor("b2", b2, ndim=1)
        if b2.shape[0] != w2.shape[0]:
            raise ValueError(f"b2: expected shape [{w2.shape[0]}] (rows of w2), got {tuple(b2.shape)}")
    check_same_device("x", x, w1=w1, b1=b1, w2=w2, b2=b2)
    if not autocast:
        check_same_dtype("x", x, tx=tx, w1=w1, b1=b1, w2=w2, b2=b2)


# ---------------------------------------------------------------------------------------------- reference path
def _activation_jvp(pre: torch.Tensor, tpre: Optional[torch.Tensor], activation: str):
    """(act(pre), act'(pre) tpre) in fp32 math, stored in pre's dtype. pre, tpre: [M, N1]; outputs [M, H]."""
    dtype = pre.dtype
    u = pre.float() if dtype in (torch.float16, torch.bfloat16) else pre
    tu = None if tpre is None else tpre.to(u.dtype)
    if activation == "gelu_tanh":
        t = torch.tanh(_GELU_K * (u + _GELU_C * u * u * u))
        hidden = 0.5 * u * (1 + t)
        thidden = None
        if tu is not None:
            thidden = (0.5 * (1 + t) + 0.5 * u * (1 - t * t) * _GELU_K * (1 + 3 * _GELU_C * u * u)) * tu
    else:
        a, b = u.chunk(2, dim=-1)
        s = torch.sigmoid(a)
        hidden = a * s * b
        thidden = None
        if tu is not None:
            ta, tb = tu.chunk(2, dim=-1)
            thidden = s * (1 + a * (1 - s)) * ta * b + a * s * tb
    return hidden.to(dtype), None if thidden is None else thidden.to(dtype)


def _mlp_jvp_reference(x, tx, w1, b1, w2, b2, activation):
    pre = F.linear(x, w1, b1)
    tpre = None if tx is None else F.linear(tx, w1)
    hidden, thidden = _activation_jvp(pre, tpre, activation)
    y = F.linear(hidden, w2, b2)
    ty = zeros_tangent(y) if thidden is None else F.linear(thidden, w2)
    return y, ty, pre, hidden


# -------------------------------------------------------------------------------------------------------- the op
@jvp_custom_op("facm_ext::mlp_jvp")
def _mlp_jvp_op(x: torch.Tensor, tx: Optional[torch.Tensor], w1: torch.Tensor, b1: Optional[torch.Tensor],
                w2: torch.Tensor, b2: Optional[torch.Tensor], activation: str,
                save_for_backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [..., K_out], ty [..., K_out], pre [..., N1] or [0] when not saving, hidden [..., H]).

    save_for_backward: keep the primal pre-activation for the backward (else the backward recomputes it)."""
    lead = x.shape[:-1]
    with autocast_disabled(x.device.type):
        kernels = x.numel() > 0 and use_triton(x, tx, w1, b1, w2, b2, dtypes=TRITON_DTYPES)
        fused_up = x.numel() > 0 and use_dual_gemm(x, tx, w1, b1, w2, b2, by_default=up_mode() == "fused")
        if not (kernels or fused_up):
            y, ty, pre, hidden = _mlp_jvp_reference(x, tx, w1, b1, w2, b2, activation)
            return y, ty, pre if save_for_backward else x.new_empty(0), hidden
        from facm_ext.kernels.mlp_jvp_triton import act_jvp, dual_gemm

        x2 = x.reshape(-1, x.shape[-1])
        tx2 = None if tx is None else tx.reshape(-1, tx.shape[-1])
        if fused_up:
            hidden, thidden, pre = dual_gemm(x2, tx2, w1, b1, activation=activation, store_pre=save_for_backward)
        else:  # FACM_EXT_MLP_UP=cublas: cuBLAS GEMMs, then the activation JVP as a separate Triton pass
            pre = F.linear(x2, w1, b1)
            hidden, thidden = act_jvp(pre, None if tx2 is None else F.linear(tx2, w1), activation)
        if use_dual_gemm(hidden, thidden, w2, b2, by_default=LINEAR_DUAL_GEMM_BY_DEFAULT):
            y, ty, _ = dual_gemm(hidden, thidden, w2, b2, activation="none")
        else:
            y = F.linear(hidden, w2, b2)
            ty = None if thidden is None else F.linear(thidden, w2)
        y = y.view(*lead, y.shape[-1])
        ty = zeros_tangent(y) if ty is None else ty.view(*lead, y.shape[-1])
        hidden = hidden.view(*lead, hidden.shape[-1])
        pre = pre.view(*lead, pre.shape[-1]) if save_for_backward else x.new_empty(0)
        return y, ty, pre, hidden


@_mlp_jvp_op.register_fake
def _(x, tx, w1, b1, w2, b2, activation, save_for_backward):
    lead = x.shape[:-1]
    y = x.new_empty((*lead, w2.shape[0]))
    pre = x.new_empty((*lead, w1.shape[0])) if save_for_backward else x.new_empty(0)
    return y, x.new_empty((*lead, w2.shape[0])), pre, x.new_empty((*lead, w2.shape[1]))


def _setup_context(ctx, inputs, output):
    x, _, w1, b1, w2, b2, activation, save_for_backward = inputs
    _, ty, pre, hidden = output
    ctx.mark_non_differentiable(ty, pre, hidden)
    # Only y receives gradients: skip zero tensors for ty, pre and hidden (2 GB at the Wan shape).
    ctx.set_materialize_grads(False)
    ctx.activation = activation
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.pre_saved = save_for_backward
    ctx.save_for_backward(x, w1, b1, w2, pre, hidden)


def _backward(ctx, grad_y, _grad_ty, _grad_pre, _grad_hidden):
    if grad_y is None:
        return (None,) * 8
    need_x, _, need_w1, need_b1, need_w2, need_b2, _, _ = ctx.needs_input_grad
    x, w1, b1, w2, pre, hidden = ctx.saved_tensors
    grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    dx = dw1 = db1 = dw2 = db2 = None
    if need_w2:
        dw2 = grad_2d.t() @ hidden_2d
    if need_b2 and ctx.has_b2:
        db2 = grad_2d.sum(0)
    if need_x or need_w1 or need_b1:
        grad_hidden = grad_2d @ w2
        x_2d = x.reshape(-1, x.shape[-1])
        # Called without save_for_backward (only direct op calls do that): recompute the pre-activation.
        pre_2d = pre.reshape(-1, pre.shape[-1]) if ctx.pre_saved else F.linear(x_2d, w1, b1)
        if ctx.activation == "gelu_tanh":
            grad_pre = torch.ops.aten.gelu_backward(grad_hidden, pre_2d, approximate="tanh")
        else:
            a, b = pre_2d.chunk(2, dim=-1)
            # Both halves written in place into one [M, 2 H] gradient (no concatenation pass).
            grad_pre = torch.empty(pre_2d.shape, dtype=pre_2d.dtype, device=pre_2d.device)
            half = a.shape[-1]
            torch.ops.aten.silu_backward.grad_input(grad_hidden * b, a, grad_input=grad_pre[:, :half])
            torch.mul(grad_hidden, F.silu(a), out=grad_pre[:, half:])
        if need_w1:
            dw1 = grad_pre.t() @ x_2d
        if need_b1 and ctx.has_b1:
            db1 = grad_pre.sum(0)
        if need_x:
            dx = (grad_pre @ w1).view(x.shape)
    return dx, None, dw1, db1, dw2, db2, None, None


_mlp_jvp_op.register_autograd(_backward, setup_context=_setup_context)


def mlp_jvp(x: torch.Tensor, tx: Optional[torch.Tensor], w1: torch.Tensor, b1: Optional[torch.Tensor],
            w2: torch.Tensor, b2: Optional[torch.Tensor],
            activation: str = "gelu_tanh") -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent of the MLP ``fc2(act(fc1(x)))`` (see :func:`facm_ext.reference.mlp.mlp`).

    Args:
        x: [..., K] fp16/bf16/fp32/fp64, any leading dims, any strides.
        tx: tangent of x, [..., K] like x, or None (zero tangent).
        w1: [H, K] (gelu_tanh: timm fc1) or the fused [2 H, K] (swiglu: LightningDiT w12, halves (a, b) ->
            silu(a) * b); b1: [rows of w1] or None.
        w2: [K_out, H] (timm fc2 / LightningDiT w3); b2: [K_out] or None.
        activation: "gelu_tanh" | "swiglu".
        Under torch.autocast the arguments are cast as F.linear would cast them.
    Returns:
        (y, ty): [..., K_out] in x's dtype (the autocast dtype under autocast). y is differentiable w.r.t.
        x, w1, b1, w2, b2; ty carries no graph.
    """
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    _check_mlp_args(x, tx, w1, b1, w2, b2, activation, autocast=autocast)
    if autocast:
        x, tx, w1, b1, w2, b2 = autocast_cast(x.device.type, x, tx, w1, b1, w2, b2)
        check_same_dtype("x", x, tx=tx, w1=w1, b1=b1, w2=w2, b2=b2)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    y, ty, _, _ = _mlp_jvp_op(x, tx, w1, b1, w2, b2, activation, save)
    return y, ty
