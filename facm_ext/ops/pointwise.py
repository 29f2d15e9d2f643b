"""Pointwise JVP ops: gated residual, GELU, SiLU, SwiGLU. Each returns ``(primal_out, tangent_out)``.

Rules (docs jvp_math.md), all computed in fp32 (fp64 for fp64 inputs) and stored in the output dtype:
- ``gated_residual_jvp``: ``h = x + g y``, ``h' = x' + g' y + g y'``;
- ``gelu_jvp``: ``y = gelu(x)``, ``y' = gelu'(x) x'`` (tanh form: one tanh -- in the kernel one exp -- serves both);
- ``silu_jvp``: ``y = x s``, ``y' = s (1 + x (1 - s)) x'`` with ``s = sigmoid(x)``;
- ``swiglu_jvp``: ``h = silu(a) b``, ``h' = silu'(a) a' b + silu(a) b'``.

Backends (chosen at run time inside the custom ops ``torch.ops.facm_ext.<name>``):
- ``cuda``: the compiled kernels ``facm_ext::<name>_cuda`` (csrc/pointwise) for fp32/fp16/bf16 CUDA tensors. One
  pass, 16-byte vector loads when every pointer and stride is 16-byte aligned and C is a multiple of the vector
  width, element loads otherwise. Operands are read through their strides as [B, L, C] views, so split halves of
  a Linear output, [B, 1, C] / [B, C] gates and Wan's per-token gates sliced from [B, L, 6, C] are read in place.
- ``reference``: everything else (CPU, fp64, unsupported dtype mixes, ``FACM_EXT_BACKEND=reference``): the same
  formulas in plain PyTorch.

A None tangent is zero: its reads are skipped; when every tangent is None the tangent output is zeros.
Outputs are contiguous. Only the primal output is differentiable (backward in PyTorch math); the tangent output
never carries a graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from facm_ext import _extension
from facm_ext.ops._common import (
    _FLOAT_DTYPE_SET,
    jvp_custom_op,
    OpInfo,
    check_same_device,
    plain_tangent,
    check_same_dtype,
    check_tangent,
    check_tensor,
    register_op_info,
    use_cuda_kernel,
)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715

# (x, gate, y) dtype combinations the gated-residual kernel instantiates; mirrors gated_residual_supported() in
# csrc/pointwise/pointwise_jvp.cu. Others take the reference path.
_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
GATED_RESIDUAL_KERNEL_DTYPES = frozenset({
    (_F32, _F32, _F32), (_F16, _F16, _F16), (_BF16, _BF16, _BF16),  # one dtype
    (_F16, _F32, _F16), (_BF16, _F32, _BF16),  # fp32 gate
    (_F32, _F32, _F16), (_F32, _F16, _F16), (_F32, _F32, _BF16), (_F32, _BF16, _BF16),  # fp32 residual stream
})

_CUDA_WHEN = "fp32/fp16/bf16 CUDA tensors (compiled kernel, 16-byte vectors when aligned)"
_REFERENCE_WHEN = "CPU, fp64 or FACM_EXT_BACKEND=reference: the fused formulas in PyTorch, fp32 math"

register_op_info(OpInfo(
    name="gated_residual_jvp",
    backends={"cuda": _CUDA_WHEN + "; (x, gate, y) dtypes: one dtype, fp32 gate, or fp32 x with 16-bit y",
              "reference": _REFERENCE_WHEN + "; also other dtype mixes"},
    kernel="gated_residual_jvp_cuda",
    notes="gate [B, C] (per sample, broadcast over tokens), [B, 1, C] or per-token [B, L, C] strided views; "
          "mixed dtypes computed in fp32, outputs in x's dtype",
))
register_op_info(OpInfo(name="gelu_jvp", backends={"cuda": _CUDA_WHEN, "reference": _REFERENCE_WHEN},
                        kernel="gelu_jvp_cuda",
                        notes="tanh form: one exp serves primal and tangent (1 + tanh and 1 - tanh^2 without cancellation)"))
register_op_info(OpInfo(name="silu_jvp", backends={"cuda": _CUDA_WHEN, "reference": _REFERENCE_WHEN},
                        kernel="silu_jvp_cuda"))
register_op_info(OpInfo(name="swiglu_jvp", backends={"cuda": _CUDA_WHEN, "reference": _REFERENCE_WHEN},
                        kernel="swiglu_jvp_cuda",
                        notes="a and b may be strided views (the two halves of one Linear output)"))


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _empty_pair(like: torch.Tensor, dtype: Optional[torch.dtype] = None):
    dtype = dtype or like.dtype
    return like.new_empty(like.shape, dtype=dtype), like.new_empty(like.shape, dtype=dtype)  # contiguous


def _check_tangent_dtype(name: str, tangent, primal_name: str, primal: torch.Tensor) -> None:
    if tangent is not None and tangent.dtype != primal.dtype:
        raise ValueError(f"{name}: tangent dtype {tangent.dtype} differs from the dtype {primal.dtype} of its primal "
                         f"{primal_name}")


# ------------------------------------------------------------------------------------------------ derivative math
def _gelu_and_derivative(x: torch.Tensor, approximate: str):
    """(gelu(x), gelu'(x)) of an fp32/fp64 tensor."""
    if approximate == "tanh":
        x2 = x * x
        th = torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + _GELU_CUBIC * x2))
        half_one_plus = 0.5 * (1.0 + th)
        dy = half_one_plus + 0.5 * x * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x2)
        return x * half_one_plus, dy
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
    return x * cdf, cdf + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def _silu_and_derivative(x: torch.Tensor):
    """(silu(x), silu'(x)) of an fp32/fp64 tensor."""
    s = torch.sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s))


def _kernel_fakes_registered() -> None:
    """Fake implementations of the compiled kernel ops (outputs: contiguous, the first input's shape and dtype)."""
    def pair_like(first, *args, **kwargs):
        return _empty_pair(first)

    for name in ("gelu_jvp_cuda", "silu_jvp_cuda", "swiglu_jvp_cuda", "gated_residual_jvp_cuda"):
        torch.library.register_fake(f"facm_ext::{name}")(pair_like)


if _extension.has_kernel("gelu_jvp_cuda"):
    _kernel_fakes_registered()


# ------------------------------------------------------------------------------------------------------------ GELU
@jvp_custom_op("facm_ext::gelu_jvp")
def _gelu_jvp_op(x: torch.Tensor, tx: Optional[torch.Tensor], approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda_kernel("gelu_jvp_cuda", x, tx):
        return torch.ops.facm_ext.gelu_jvp_cuda(x, tx, approximate)
    y, dy = _gelu_and_derivative(x.to(_compute_dtype(x)), approximate)
    ty = dy * tx.to(dy.dtype) if tx is not None else torch.zeros_like(y)
    return y.to(x.dtype).contiguous(), ty.to(x.dtype).contiguous()


@_gelu_jvp_op.register_fake
def _(x, tx, approximate):
    return _empty_pair(x)


def _gelu_setup(ctx, inputs, output):
    x, _, approximate = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _gelu_backward(ctx, grad, _grad_tangent):
    (x,) = ctx.saved_tensors
    _, dy = _gelu_and_derivative(x.to(_compute_dtype(x)), ctx.approximate)
    return (grad.to(dy.dtype) * dy).to(x.dtype), None, None


_gelu_jvp_op.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def gelu_jvp(x: torch.Tensor, tx: Optional[torch.Tensor], approximate: str = "tanh"):
    """Primal and tangent of ``F.gelu(x, approximate=approximate)``.

    Args:
        x: any shape (at least 1-d), fp16/bf16/fp32/fp64, any strides.
        tx: tangent of x (x's shape and dtype) or None (zero).
        approximate: "tanh" (DiT, Wan) or "none" (exact erf form).
    Returns:
        (y, ty): x's shape and dtype, contiguous. y is differentiable w.r.t. x; ty carries no graph.
    """
    check_tensor("x", x, min_ndim=1)
    check_tangent("tx", tx, "x", x)
    _check_tangent_dtype("tx", tx, "x", x)
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")
    return _gelu_jvp_op(x, tx, approximate)


# ------------------------------------------------------------------------------------------------------------ SiLU
@jvp_custom_op("facm_ext::silu_jvp")
def _silu_jvp_op(x: torch.Tensor, tx: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda_kernel("silu_jvp_cuda", x, tx):
        return torch.ops.facm_ext.silu_jvp_cuda(x, tx)
    y, dy = _silu_and_derivative(x.to(_compute_dtype(x)))
    ty = dy * tx.to(dy.dtype) if tx is not None else torch.zeros_like(y)
    return y.to(x.dtype).contiguous(), ty.to(x.dtype).contiguous()


@_silu_jvp_op.register_fake
def _(x, tx):
    return _empty_pair(x)


def _silu_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(inputs[0])


def _silu_backward(ctx, grad, _grad_tangent):
    (x,) = ctx.saved_tensors
    _, dy = _silu_and_derivative(x.to(_compute_dtype(x)))
    return (grad.to(dy.dtype) * dy).to(x.dtype), None


_silu_jvp_op.register_autograd(_silu_backward, setup_context=_silu_setup)


def silu_jvp(x: torch.Tensor, tx: Optional[torch.Tensor]):
    """Primal and tangent of ``F.silu(x)``.

    Args:
        x: any shape (at least 1-d), fp16/bf16/fp32/fp64, any strides.
        tx: tangent of x (x's shape and dtype) or None (zero).
    Returns:
        (y, ty): x's shape and dtype, contiguous. y is differentiable w.r.t. x; ty carries no graph.
    """
    check_tensor("x", x, min_ndim=1)
    check_tangent("tx", tx, "x", x)
    _check_tangent_dtype("tx", tx, "x", x)
    return _silu_jvp_op(x, tx)


# ---------------------------------------------------------------------------------------------------------- SwiGLU
@jvp_custom_op("facm_ext::swiglu_jvp")
def _swiglu_jvp_op(a: torch.Tensor, ta: Optional[torch.Tensor], b: torch.Tensor,
                   tb: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda_kernel("swiglu_jvp_cuda", a, ta, b, tb):
        return torch.ops.facm_ext.swiglu_jvp_cuda(a, ta, b, tb)
    dtype = _compute_dtype(a)
    a_c, b_c = a.to(dtype), b.to(dtype)
    silu_a, dsilu_a = _silu_and_derivative(a_c)
    h = silu_a * b_c
    th = torch.zeros_like(h)
    if ta is not None:
        th = th + dsilu_a * ta.to(dtype) * b_c
    if tb is not None:
        th = th + silu_a * tb.to(dtype)
    return h.to(a.dtype).contiguous(), th.to(a.dtype).contiguous()


@_swiglu_jvp_op.register_fake
def _(a, ta, b, tb):
    return _empty_pair(a)


def _swiglu_setup(ctx, inputs, output):
    a, _, b, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(a, b)


def _swiglu_backward(ctx, grad, _grad_tangent):
    a, b = ctx.saved_tensors
    dtype = _compute_dtype(a)
    silu_a, dsilu_a = _silu_and_derivative(a.to(dtype))
    grad_c = grad.to(dtype)
    grad_a = (grad_c * b.to(dtype) * dsilu_a).to(a.dtype) if ctx.needs_input_grad[0] else None
    grad_b = (grad_c * silu_a).to(b.dtype) if ctx.needs_input_grad[2] else None
    return grad_a, None, grad_b, None


_swiglu_jvp_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu_jvp(a: torch.Tensor, ta: Optional[torch.Tensor], b: torch.Tensor, tb: Optional[torch.Tensor]):
    """Primal and tangent of ``F.silu(a) * b``.

    Args:
        a, b: same shape [..., C] (at least 1-d) and dtype (fp16/bf16/fp32/fp64), any strides -- e.g. the two
            halves ``h[..., :C]``, ``h[..., C:]`` of a [..., 2C] Linear output, read in place.
        ta, tb: their tangents (same shape and dtype) or None (zero).
    Returns:
        (h, th): [..., C] in a's dtype, contiguous. h is differentiable w.r.t. a and b; th carries no graph.
    """
    check_tensor("a", a, min_ndim=1)
    check_tensor("b", b, min_ndim=1)
    if b.shape != a.shape:
        raise ValueError(f"b: expected the shape {tuple(a.shape)} of a, got {tuple(b.shape)}")
    check_same_device("a", a, b=b)
    check_same_dtype("a", a, b=b)
    check_tangent("ta", ta, "a", a)
    check_tangent("tb", tb, "b", b)
    _check_tangent_dtype("ta", ta, "a", a)
    _check_tangent_dtype("tb", tb, "b", b)
    return _swiglu_jvp_op(a, ta, b, tb)


# -------------------------------------------------------------------------------------------------- gated residual
@jvp_custom_op("facm_ext::gated_residual_jvp")
def _gated_residual_jvp_op(x: torch.Tensor, tx: Optional[torch.Tensor], gate: torch.Tensor,
                           tgate: Optional[torch.Tensor], y: torch.Tensor,
                           ty: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if ((x.dtype, gate.dtype, y.dtype) in GATED_RESIDUAL_KERNEL_DTYPES
            and use_cuda_kernel("gated_residual_jvp_cuda", x, tx, gate, tgate, y, ty)):
        return torch.ops.facm_ext.gated_residual_jvp_cuda(x, tx, gate, tgate, y, ty)
    dtype = _compute_dtype(x, gate, y)
    g_c, y_c = gate.to(dtype), y.to(dtype)
    h = x.to(dtype) + g_c * y_c
    th = torch.zeros_like(h)
    if tx is not None:
        th = th + tx.to(dtype)
    if tgate is not None:
        th = th + tgate.to(dtype) * y_c
    if ty is not None:
        th = th + g_c * ty.to(dtype)
    return h.to(x.dtype).contiguous(), th.to(x.dtype).contiguous()


@_gated_residual_jvp_op.register_fake
def _(x, tx, gate, tgate, y, ty):
    return _empty_pair(x)


def _gated_residual_setup(ctx, inputs, output):
    x, _, gate, _, y, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gated_residual_backward(ctx, grad, _grad_tangent):
    gate, y = ctx.saved_tensors
    need_x, _, need_gate, _, need_y, _ = ctx.needs_input_grad
    dtype = _compute_dtype(gate, y, grad)
    grad_c = grad.to(dtype)
    grad_x = grad.to(ctx.x_dtype) if need_x else None
    grad_gate = (grad_c * y.to(dtype)).sum_to_size(gate.shape).to(gate.dtype) if need_gate else None
    grad_y = (grad_c * gate.to(dtype)).to(y.dtype) if need_y else None
    return grad_x, None, grad_gate, None, grad_y, None


_gated_residual_jvp_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


def _plain_gated_residual_args(x, tx, gate, tgate, y, ty) -> bool:
    """True exactly when gated_residual_jvp's checks up to the gate's shape pass: x, gate, y floating tensors of at
    least one dim on one device, y of x's shape, each tangent None or its primal's shape, dtype and device. Decided
    in one pass for the common case (once per gated residual of a transformed model); the checks themselves then
    run only to find and name what is wrong."""
    if not (isinstance(x, torch.Tensor) and isinstance(gate, torch.Tensor) and isinstance(y, torch.Tensor)):
        return False
    if x.dtype not in _FLOAT_DTYPE_SET or gate.dtype not in _FLOAT_DTYPE_SET or y.dtype not in _FLOAT_DTYPE_SET:
        return False
    shape, device = x.shape, x.device
    if not shape or gate.dim() < 1 or y.shape != shape or gate.device != device or y.device != device:
        return False
    for tangent, primal in ((tx, x), (tgate, gate), (ty, y)):
        if not plain_tangent(tangent, primal.shape, device) or (tangent is not None and tangent.dtype != primal.dtype):
            return False
    return True


def gated_residual_jvp(x: torch.Tensor, tx: Optional[torch.Tensor], gate: torch.Tensor,
                       tgate: Optional[torch.Tensor], y: torch.Tensor, ty: Optional[torch.Tensor]):
    """Primal and tangent of the gated residual ``x + gate * y``.

    Args:
        x: [B, L, C] residual stream (any shape [..., C] with a gate that broadcasts to it), fp16/bf16/fp32/fp64.
        tx: tangent of x or None (zero).
        gate: [B, C] (per sample, broadcast over the L tokens of a 3-d x, like DiT's ``gate.unsqueeze(1)``),
            [B, 1, C], or per token [B, L, C] -- strided views are read in place (Wan slices a [B, L, 6, C] fp32
            modulation tensor). Otherwise any shape that broadcasts to x by PyTorch's rules. Its dtype may differ
            from x's (e.g. fp32 gate with bf16 x).
        tgate: tangent of gate (gate's shape and dtype) or None (zero).
        y: branch output, x's shape; its dtype may differ from x's (Wan: fp32 x, bf16 y, fp32 gate).
        ty: tangent of y (y's shape and dtype) or None (zero).
    Returns:
        (h, th): x's shape and dtype, contiguous; computed in fp32 (fp64 if any input is fp64). h is
        differentiable w.r.t. x, gate and y; th carries no graph.
    """
    if not _plain_gated_residual_args(x, tx, gate, tgate, y, ty):
        check_tensor("x", x, min_ndim=1)
        check_tensor("gate", gate, min_ndim=1)
        check_tensor("y", y, min_ndim=1)
        if y.shape != x.shape:
            raise ValueError(f"y: expected the shape {tuple(x.shape)} of x, got {tuple(y.shape)}")
        check_same_device("x", x, gate=gate, y=y)
        check_tangent("tx", tx, "x", x)
        check_tangent("tgate", tgate, "gate", gate)
        check_tangent("ty", ty, "y", y)
        for name, tangent, primal_name, primal in (("tx", tx, "x", x), ("tgate", tgate, "gate", gate),
                                                   ("ty", ty, "y", y)):
            _check_tangent_dtype(name, tangent, primal_name, primal)
    if gate.dim() == 2 and x.dim() == 3:
        if gate.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"gate: a 2-d gate of a [B, L, C] x must be [B, C] = {(x.shape[0], x.shape[2])}, "
                             f"got {tuple(gate.shape)}")
        gate = gate.unsqueeze(1)
        tgate = tgate.unsqueeze(1) if tgate is not None else None
    elif gate.dim() > x.dim() or any(g not in (1, s) for g, s in zip(reversed(gate.shape), reversed(x.shape))):
        raise ValueError(f"gate: shape {tuple(gate.shape)} does not broadcast to the shape {tuple(x.shape)} of x "
                         f"(expected [B, C], [B, 1, C] or [B, L, C])")
    return _gated_residual_jvp_op(x, tx, gate, tgate, y, ty)
