"""Linear-layer JVP: ``y = x W^T + b`` and ``y' = x' W^T`` from one GEMM over the stacked rows ``[x; x']``.

Backends (chosen at run time inside the custom op ``torch.ops.facm_ext.linear_jvp``):
- ``triton`` (``FACM_EXT_BACKEND=triton``, fp16/bf16 CUDA tensors): one Triton GEMM whose programs compute the same
  row tile of x and x' with two fp32 accumulators sharing every W tile load, so W is read once; the bias goes into
  the primal epilogue only, and primal and tangent are written to two separate outputs (no concatenation, no split
  copies).
- ``reference`` (default, and CPU, fp32/fp64): two ``F.linear`` calls. On CUDA that is two cuBLAS GEMMs, which
  measured 1.05-1.24x faster than the Triton dual GEMM on an H200 at the LightningDiT and Wan shapes (see
  LINEAR_DUAL_GEMM_BY_DEFAULT); reading W twice costs little next to the GEMMs. fp32 on CUDA stays on cuBLAS in any
  case because a Triton fp32 dot is either TF32 (not fp32-accurate) or slow.

Autocast: the public function casts like ``F.linear`` under ``torch.autocast`` (every fp16/bf16/fp32 argument to the
autocast dtype of x's device) before calling the custom op, and the op body runs with autocast disabled, so the
fake implementation and the real one agree on dtypes.

Gradients: only the primal output is differentiable (dx, dW, db); the tangent output never carries a graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from facm_ext import _env
from facm_ext.ops._common import (
    _FLOAT_DTYPE_SET,
    jvp_custom_op,
    OpInfo,
    autocast_disabled,
    plain_tangent,
    _forced_backend,
    check_same_device,
    check_same_dtype,
    check_tangent,
    check_tensor,
    register_op_info,
    use_triton,
    zeros_tangent,
)

TRITON_DTYPES = (torch.float16, torch.bfloat16)


# Measured on one H200 (torch 2.11, Triton 3.6, bf16, benchmarks/test_bench_linear.py): two cuBLAS GEMMs beat the
# Triton dual GEMM at the LightningDiT and Wan MLP shapes -- by 1.05-1.24x with TMA loads (0.64 vs 0.80 ms at
# M=16384, 1152->6144; 13.4 vs 14.0 ms at M=32760, 5120->13824; 12.9 vs 14.6 ms at 13824->5120) and 1.24-1.37x
# with pointer loads -- so the plain linear JVP uses cuBLAS by default and the dual GEMM only when
# FACM_EXT_BACKEND=triton. The dual GEMM's epilogue is what mlp_jvp fuses the activation into.
LINEAR_DUAL_GEMM_BY_DEFAULT = False


def use_dual_gemm(*tensors: Optional[torch.Tensor], by_default: bool) -> bool:
    """Whether the Triton dual GEMM runs for these tensors.

    fp16/bf16 CUDA tensors: when ``by_default`` or FACM_EXT_BACKEND=triton (never when another backend is forced).
    fp32/fp16 CPU tensors under TRITON_INTERPRET=1 with FACM_EXT_BACKEND=triton: yes (the interpreter tests).
    """
    forced = _forced_backend()
    if forced is None and not by_default:
        return False
    if use_triton(*tensors, dtypes=TRITON_DTYPES):
        return True
    live = [t for t in tensors if t is not None]
    return (_env.get("TRITON_INTERPRET", "0") == "1" and forced == "triton" and bool(live)
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16) for t in live))


register_op_info(OpInfo(
    name="linear_jvp",
    backends={
        "triton": "FACM_EXT_BACKEND=triton with fp16/bf16 CUDA tensors: one stacked dual-accumulator GEMM, bias in "
                  "the primal epilogue",
        "reference": "default: two F.linear calls (cuBLAS on CUDA, measured faster than the dual GEMM on H200)",
    },
    notes="fp32 on CUDA uses cuBLAS (exact fp32) rather than a TF32 Triton dot; under torch.autocast the "
          "arguments are cast as F.linear would be",
))


# ------------------------------------------------------------------------------------------------------- autocast
def autocast_cast(device_type: str, *tensors: Optional[torch.Tensor]) -> tuple:
    """Cast like an autocast 'lower precision' op (F.linear): fp16/bf16/fp32 tensors go to the autocast dtype of
    ``device_type`` when autocast is enabled there; None and float64 tensors pass unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    target = torch.get_autocast_dtype(device_type)
    # .to() of a tensor already in the target dtype returns it; skipping the call saves its host time (x and tx
    # arrive cast: the previous layer ran under autocast too).
    return tuple(t.to(target) if t is not None and t.dtype != target
                 and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t for t in tensors)


# ------------------------------------------------------------------------------------------------------ validation
def check_linear_args(x, tx, weight, bias, *, x_name="x", tx_name="tx", weight_name="weight", bias_name="bias",
                      autocast: bool = False) -> None:
    """ValueError naming the offending argument unless the arguments form a valid ``F.linear`` (+ tangent)."""
    if not autocast and _plain_linear_args(x, tx, weight, bias):
        return
    check_tensor(x_name, x, min_ndim=1)
    check_tangent(tx_name, tx, x_name, x)
    check_tensor(weight_name, weight, ndim=2)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{weight_name}: expected shape [N, {x.shape[-1]}] (K = last dim of {x_name}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias_name, bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name}: expected shape [{weight.shape[0]}] (N = rows of {weight_name}), "
                             f"got {tuple(bias.shape)}")
    check_same_device(x_name, x, **{weight_name: weight, bias_name: bias})
    if not autocast:
        check_same_dtype(x_name, x, **{tx_name: tx, weight_name: weight, bias_name: bias})


def _plain_linear_args(x, tx, weight, bias) -> bool:
    """True when the checks of :func:`check_linear_args` without autocast all pass: every tensor of x's floating
    dtype and device, the shapes of an F.linear. The common case, decided in one pass without the helper calls and
    argument dicts of the checks (which then run only to find and name what is wrong): this runs once per linear
    layer of a transformed model."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    dtype, shape = x.dtype, x.shape
    if (dtype not in _FLOAT_DTYPE_SET or weight.dtype != dtype or weight.dim() != 2 or not shape
            or weight.shape[1] != shape[-1]):
        return False
    device = x.device
    if weight.device != device:
        return False
    if not plain_tangent(tx, shape, device) or (tx is not None and tx.dtype != dtype):
        return False
    return bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == dtype and bias.dim() == 1
                            and bias.shape[0] == weight.shape[0] and bias.device == device)


# -------------------------------------------------------------------------------------------------------- the op
def _linear_jvp_reference(x, tx, weight, bias):
    y = F.linear(x, weight, bias)
    ty = F.linear(tx, weight) if tx is not None else zeros_tangent(y)
    return y, ty


@jvp_custom_op("facm_ext::linear_jvp")
def _linear_jvp_op(x: torch.Tensor, tx: Optional[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast_disabled(x.device.type):
        if x.numel() > 0 and use_dual_gemm(x, tx, weight, bias, by_default=LINEAR_DUAL_GEMM_BY_DEFAULT):
            from facm_ext.kernels.mlp_jvp_triton import dual_gemm

            lead = x.shape[:-1]
            out, tout, _ = dual_gemm(x.reshape(-1, x.shape[-1]),
                                     None if tx is None else tx.reshape(-1, tx.shape[-1]),
                                     weight, bias, activation="none")
            y = out.view(*lead, out.shape[-1])
            ty = tout.view(*lead, out.shape[-1]) if tout is not None else zeros_tangent(y)
            return y, ty
        return _linear_jvp_reference(x, tx, weight, bias)


@_linear_jvp_op.register_fake
def _(x, tx, weight, bias):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


def _setup_context(ctx, inputs, output):
    x, _, weight, bias = inputs
    ctx.mark_non_differentiable(output[1])
    # The tangent output never receives a gradient: do not allocate a zero tensor for it.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y, _grad_ty):
    if grad_y is None:
        return None, None, None, None
    x, weight = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad
    grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
    dx = dw = db = None
    if need_x:
        dx = (grad_2d @ weight).view(x.shape)
    if need_w:
        dw = grad_2d.t() @ x.reshape(-1, x.shape[-1])
    if need_b and ctx.has_bias:
        db = grad_2d.sum(0)
    return dx, None, dw, db


_linear_jvp_op.register_autograd(_backward, setup_context=_setup_context)


def linear_jvp(x: torch.Tensor, tx: Optional[torch.Tensor], weight: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Primal and tangent of ``F.linear``: ``(x W^T + b, x' W^T)``.

    Args:
        x: [..., K] fp16/bf16/fp32/fp64, any leading dims, any strides.
        tx: tangent of x, [..., K] like x, or None (zero tangent).
        weight: [N, K], x's dtype (or any float dtype under torch.autocast); no tangent (parameters are constant).
        bias: [N] or None; enters the primal only.
    Returns:
        (y, ty): both [..., N] in x's dtype (the autocast dtype under autocast). y is differentiable w.r.t. x,
        weight and bias; ty carries no graph.
    """
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    check_linear_args(x, tx, weight, bias, autocast=autocast)
    if autocast:
        x, tx, weight, bias = autocast_cast(x.device.type, x, tx, weight, bias)
        check_same_dtype("x", x, tx=tx, weight=weight, bias=bias)
    return _linear_jvp_op(x, tx, weight, bias)
