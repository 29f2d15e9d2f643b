"""Fused RMSNorm + rotary embedding JVP: the qk-norm -> RoPE step of an attention layer in one pass.

Per row (the D channels of one batch, head and position), with ``r = rsqrt(mean(x^2) + eps)``:

    a   = x r w                                   out  = R(l) a
    a'  = (r x' - x r^3 mean(x x')) w             out' = R(l) a'

``R(l)`` is the rotation of :func:`facm_ext.ops.rope_jvp` (same layouts, tables and pair conventions). The norm's
result is rotated in fp32 and rounded once, to x's dtype: what an attention layer under autocast computes when its
fp32-weight norm widens q and k to fp32, RoPE rotates them in fp32 and SDPA narrows them back (the transform uses
this op exactly there; see facm_ext/jvp/_blocks.py). Unfused, the same step is a norm, a rotation and four casts
per tensor, each a round trip through memory.

Backends (chosen at run time inside the custom op ``torch.ops.facm_ext.rms_norm_rope_jvp``):
- ``cuda``: ``facm_ext::rms_norm_rope_jvp_cuda`` (csrc/rope/rms_norm_rope_jvp.cu) for fp32/fp16/bf16 CUDA x with
  D <= 256: one warp per row, x read in place through its strides (unit channel stride).
- ``reference``: everything else (CPU, fp64, D > 256, ``FACM_EXT_BACKEND=reference``): the same formulas in
  PyTorch.
Only the primal output is differentiable (w.r.t. x, weight, cos and sin); the tangent output carries no graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from facm_ext import _extension
from facm_ext.ops._common import (
    OpInfo,
    check_same_device,
    check_tensor,
    jvp_custom_op,
    register_op_info,
    use_cuda_kernel,
)
from facm_ext.ops.rope import _compute_dtype, _rotate, check_rope_arguments, rope_vjp

# Head dims the CUDA kernel holds in registers (one warp per row); larger rows take the reference path.
MAX_KERNEL_HEAD_DIM = 256

register_op_info(OpInfo(
    name="rms_norm_rope_jvp",
    backends={"cuda": f"fp32/fp16/bf16 CUDA x, head_dim <= {MAX_KERNEL_HEAD_DIM} (compiled kernel; weight and "
                      "tables read as fp32)",
              "reference": f"CPU, fp64, head_dim > {MAX_KERNEL_HEAD_DIM} or FACM_EXT_BACKEND=reference: the "
                           "formulas in PyTorch"},
    kernel="rms_norm_rope_jvp_cuda",
    notes="x [B, H, L, D] or [B, L, H, D]; RMSNorm over D with an optional [D] weight, then RoPE",
))


def _rstd_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_fakes_registered() -> None:
    @torch.library.register_fake("facm_ext::rms_norm_rope_jvp_cuda")
    def _(x, tx, weight, eps, cos, sin, interleaved, layout):
        return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


if _extension.has_kernel("rms_norm_rope_jvp_cuda"):
    _kernel_fakes_registered()


def _forward_reference(x, tx, weight, eps: float, cos, sin, interleaved: bool, layout: str):
    dtype = _compute_dtype(x, cos, sin, weight)
    xw = x.to(dtype)
    rstd = torch.rsqrt(xw.square().mean(-1, keepdim=True) + eps)
    a = xw * rstd
    if tx is not None:
        tw = tx.to(dtype)
        ta = tw * rstd - xw * rstd.pow(3) * (xw * tw).mean(-1, keepdim=True)
    if weight is not None:
        w = weight.to(dtype)
        a = a * w
        if tx is not None:
            ta = ta * w
    out = _rotate(a, cos, sin, interleaved, layout, dtype).to(x.dtype).contiguous()
    if tx is None:
        tout = torch.zeros_like(x, memory_format=torch.contiguous_format)
    else:
        tout = _rotate(ta, cos, sin, interleaved, layout, dtype).to(x.dtype).contiguous()
    return out, tout, rstd.squeeze(-1).to(_rstd_dtype(x)).contiguous()


@jvp_custom_op("facm_ext::rms_norm_rope_jvp")
def _rms_norm_rope_op(x: torch.Tensor, tx: Optional[torch.Tensor], weight: Optional[torch.Tensor], eps: float,
                      cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                      layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.shape[-1] <= MAX_KERNEL_HEAD_DIM and use_cuda_kernel("rms_norm_rope_jvp_cuda", x, tx):
        w = None if weight is None else weight.float().contiguous()
        return torch.ops.facm_ext.rms_norm_rope_jvp_cuda(x, tx, w, eps, cos.float(), sin.float(), interleaved,
                                                         layout)
    return _forward_reference(x, tx, weight, eps, cos, sin, interleaved, layout)


@_rms_norm_rope_op.register_fake
def _(x, tx, weight, eps, cos, sin, interleaved, layout):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x))


def _setup(ctx, inputs, output):
    x, _, weight, _, cos, sin, interleaved, layout = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, cos, sin, output[2])
    ctx.interleaved, ctx.layout = interleaved, layout


def _backward(ctx, grad, _grad_tangent, _grad_rstd):
    """Through the rotation (R(l)^T, table gradients) with a = x r w recomputed, then through the norm:
    dw = sum(da n), dx = r (da w - n mean(da w n)) with n = x r."""
    x, weight, cos, sin, rstd = ctx.saved_tensors
    need_x, _, need_weight, _, need_cos, need_sin, _, _ = ctx.needs_input_grad
    dtype = _compute_dtype(x, cos, sin, weight)
    n = x.to(dtype) * rstd.to(dtype).unsqueeze(-1)
    a = n if weight is None else n * weight.to(dtype)
    grad_a, grad_cos, grad_sin = rope_vjp(grad, a, cos, sin, ctx.interleaved, ctx.layout,
                                          need_x=need_x or need_weight, need_cos=need_cos, need_sin=need_sin)
    grad_x = grad_weight = None
    if need_weight:
        grad_weight = (grad_a * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
    if need_x:
        grad_n = grad_a if weight is None else grad_a * weight.to(dtype)
        grad_x = (rstd.to(dtype).unsqueeze(-1) * (grad_n - n * (grad_n * n).mean(-1, keepdim=True))).to(x.dtype)
    return grad_x, None, grad_weight, None, grad_cos, grad_sin, None, None


_rms_norm_rope_op.register_autograd(_backward, setup_context=_setup)


def rms_norm_rope_jvp(x: torch.Tensor, tx: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                      cos: torch.Tensor, sin: torch.Tensor, *, eps: float = 1e-6, interleaved: bool = True,
                      layout: Optional[str] = None):
    """Primal and tangent of ``rope(rms_norm(x, weight, eps), cos, sin)`` (see the module docstring).

    Args:
        x: [B, H, L, D] or [B, L, H, D] (see ``layout``), D even; fp16/bf16/fp32/fp64; any strides (a unit
            last-dim stride is read in place).
        tx: tangent of x (x's shape and dtype) or None (zero).
        weight: [D] norm weight (any float dtype; fp32 expected) or None.
        cos, sin: [L, D] (per channel) or [L, D/2] (per pair), same shape, any float dtype (fp32 expected).
        eps: added to mean(x^2), >= 0.
        interleaved: True for adjacent pairs (2i, 2i+1); False for the half-split (rotate_half) form.
        layout: "BHLD", "BLHD" or None (inferred from the table length; required when dims 1 and 2 both equal L).
    Returns:
        (out, tout): x's shape, dtype and layout, contiguous, computed in fp32 (fp64 for fp64 inputs) and rounded
        once. out is differentiable w.r.t. x, weight, cos and sin; tout carries no graph.
    """
    layout = check_rope_arguments(x, tx, cos, sin, layout)
    if weight is not None:
        check_tensor("weight", weight, ndim=1)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight: expected [{x.shape[-1]}] (x's head_dim), got {tuple(weight.shape)}")
        check_same_device("x", x, weight=weight)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < math.inf:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    out, tout, _ = _rms_norm_rope_op(x, tx, weight, float(eps), cos, sin, bool(interleaved), layout)
    return out, tout
