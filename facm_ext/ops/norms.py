"""Norm-family fused JVP ops: LayerNorm, RMSNorm, adaLN modulation, and norm + modulation fused in one pass.

Public functions (each returns ``(primal_out, tangent_out)``; every tangent argument may be None, meaning zero):

- ``layer_norm_jvp(x, tx, weight=None, bias=None, eps=1e-6)``: LayerNorm over the last dim of x [..., C].
- ``rms_norm_jvp(x, tx, weight=None, eps=1e-6)``: RMSNorm over the last dim of x [..., C] (qk-norm per head:
  x [B, L, H, head_dim], possibly a strided view of a fused qkv tensor; Wan: x [B, L, 5120]).
- ``modulate_jvp(x, tx, shift, tshift, scale, tscale)``: ``x * (1 + scale) + shift`` for x [B, L, C].
- ``adaln_jvp(x, tx, shift, tshift, scale, tscale, norm="layer"|"rms", weight=None, eps=1e-6)``:
  ``modulate(norm(x) * weight, shift, scale)`` in one pass.

Shapes: shift and scale are [B, C] (applied to every token, like DiT's ``shift.unsqueeze(1)``) or 3-D tensors
that broadcast to x [B, L, C]: [B, 1, C], or per-token [B, L, C] in any strides (Wan slices a [B, L, 6, C] fp32
tensor: stride 6C over L). Tangents have their primal's shape. weight and bias are [C].

Dtype rule: math in fp32 (float64 inputs: float64 math on the plain-PyTorch path); both outputs in x's dtype.
x may be fp32 / fp16 / bf16 (float64 on the PyTorch path). Tangents are cast to their primal's dtype. The
modulation may be in x's dtype or in another float dtype (Wan: bf16 x with fp32 modulation): when the four
modulation tensors do not all have x's dtype they are read as fp32. weight and bias are read as fp32.

Backends: the CUDA kernel ``torch.ops.facm_ext.norm_modulate_jvp_cuda`` (csrc/norms) for CUDA tensors of kernel
dtypes with C <= 8192; otherwise the fused formulas in plain PyTorch (the CPU path, float64, larger C). Inputs
whose last dim is not contiguous are copied first (the kernel reads rows as contiguous channel vectors).
Inside the kernel, fp16/bf16 rows of more than 128 aligned 16-byte vectors (C > 1024) are staged in shared memory
(cp.async); FACM_EXT_NORMS_ROW_STAGING=registers keeps them in registers instead (A/B comparisons). Modulation
without a norm (modulate_jvp) runs an elementwise kernel instead.

Autograd: the primal output is differentiable w.r.t. x, weight, bias, shift and scale (backward in PyTorch math
from the saved per-row mean / rstd); the tangent output carries no graph (stop-gradient, as consistency training
needs) and nothing is differentiated through the tangent inputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from facm_ext import _extension
from facm_ext.ops import _common

KERNEL = "norm_modulate_jvp_cuda"
# Rows are held in registers; beyond this many channels the kernel is not used (the PyTorch path is).
KERNEL_MAX_CHANNELS = 8192
_NORM_CODES = {"none": 0, "layer": 1, "rms": 2}

__all__ = ["layer_norm_jvp", "rms_norm_jvp", "modulate_jvp", "adaln_jvp"]


# ------------------------------------------------------------------------------------------------------- op info
_WHEN_CUDA = f"CUDA fp32/fp16/bf16 inputs, C <= {KERNEL_MAX_CHANNELS}"
_WHEN_REFERENCE = f"CPU, float64, or C > {KERNEL_MAX_CHANNELS}: fused formulas in plain PyTorch"
_DTYPE_NOTE = "fp32 math, outputs in x.dtype; backward in PyTorch math from saved mean/rstd"
for _name, _note in (
        ("layer_norm_jvp", "over the last dim; " + _DTYPE_NOTE),
        ("rms_norm_jvp", "over the last dim (qk-norm views need no copy when rows collapse to 2 strides); "
                         + _DTYPE_NOTE),
        ("modulate_jvp", "[B,C] or per-token strided [B,L,C] modulation, fp32 modulation with bf16/fp16 x ok; "
                         + _DTYPE_NOTE),
        ("adaln_jvp", "norm + modulate in one pass (layer or rms, optional weight); " + _DTYPE_NOTE)):
    _common.register_op_info(_common.OpInfo(
        name=_name, backends={"cuda": _WHEN_CUDA, "reference": _WHEN_REFERENCE}, kernel=KERNEL, notes=_note))


# ---------------------------------------------------------------------------------------------------- validation
def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_x(x, *, three_d: bool) -> None:
    if three_d:
        _common.check_tensor("x", x, ndim=3)
    else:
        _common.check_tensor("x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x: the normalized (last) dim must not be empty, got shape {tuple(x.shape)}")


def _check_channel_vector(name: str, value, x: Tensor) -> None:
    if value is None:
        return
    _common.check_tensor(name, value, ndim=1)
    if value.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: expected shape ({x.shape[-1]},) (the last dim of x), got {tuple(value.shape)}")
    _common.check_same_device("x", x, **{name: value})


def _check_modulation(name: str, value, x: Tensor) -> None:
    """[B, C], or 3-D broadcasting to x [B, L, C]."""
    _common.check_tensor(name, value, ndim=(2, 3))
    _common.check_same_device("x", x, **{name: value})
    if value.dim() == 2:
        if tuple(value.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"{name}: a 2-D modulation must be [B, C] = {(x.shape[0], x.shape[2])} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(value.shape)}")
    else:
        _common.check_broadcastable(name, value, "x", x.shape)


# One-pass forms of the checks above for their common case, decided without the helper calls and argument dicts
# of the checks (which then run only to find and name what is wrong): these run once per norm of a transformed
# model. Each is True exactly when the checks it stands for pass.
def _plain_x(x, *, three_d: bool) -> bool:
    """_check_x passes."""
    if not (isinstance(x, Tensor) and x.dtype in _common._FLOAT_DTYPE_SET):
        return False
    shape = x.shape
    return (len(shape) == 3 if three_d else len(shape) >= 1) and shape[-1] != 0


def _plain_channel_vector(value, x: Tensor) -> bool:
    """_check_channel_vector passes (x already checked)."""
    return value is None or (isinstance(value, Tensor) and value.dtype in _common._FLOAT_DTYPE_SET
                             and value.dim() == 1 and value.shape[0] == x.shape[-1] and value.device == x.device)


def _plain_modulated_args(x, tx, shift, tshift, scale, tscale) -> bool:
    """_check_modulated_args passes."""
    if not _plain_x(x, three_d=True):
        return False
    shape, device = x.shape, x.device
    if not _common.plain_tangent(tx, shape, device):
        return False
    for mod, tangent in ((shift, tshift), (scale, tscale)):
        if not (isinstance(mod, Tensor) and mod.dtype in _common._FLOAT_DTYPE_SET and mod.device == device):
            return False
        mod_shape = mod.shape
        if len(mod_shape) == 2:
            if mod_shape[0] != shape[0] or mod_shape[1] != shape[2]:
                return False
        elif len(mod_shape) != 3 or any(size != 1 and size != shape[i] for i, size in enumerate(mod_shape)):
            return False
        if not _common.plain_tangent(tangent, mod_shape, device):
            return False
    return True


def _check_norm(norm) -> None:
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm: expected 'layer' or 'rms', got {norm!r}")


# ------------------------------------------------------------------------------------------ plain-PyTorch path
def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tokenwise(mod: Tensor) -> Tensor:
    return mod.unsqueeze(1) if mod.dim() == 2 else mod


def _stats_shape(x: Tensor) -> tuple:
    return tuple(x.shape[:-1]) + (1,)


def _forward_reference(norm: int, x: Tensor, tx, weight, bias, shift, tshift, scale, tscale, eps: float,
                       out_dtype: Optional[torch.dtype] = None):
    """The fused formulas (docs/jvp_math.md) in fp32 (float64 for float64 x). Returns (y, ty, mean, rstd): y, ty
    contiguous in ``out_dtype`` (default x's dtype); mean [rows] (LayerNorm) or [0]; rstd [rows] (LayerNorm,
    RMSNorm) or [0]."""
    cd = _compute_dtype(x)
    rows = x.numel() // x.shape[-1]
    xc = x.to(cd)
    tc = tx.to(cd) if tx is not None else None
    mean = torch.empty(0, dtype=cd, device=x.device)  # two tensors: custom ops may not return aliases
    rstd = torch.empty(0, dtype=cd, device=x.device)
    if norm == 1:
        mean_k = xc.mean(dim=-1, keepdim=True)
        centered = xc - mean_k
        rstd_k = torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
        n = centered * rstd_k
        if tc is not None:
            tc = rstd_k * (tc - tc.mean(dim=-1, keepdim=True) - n * (n * tc).mean(dim=-1, keepdim=True))
        mean, rstd = mean_k.reshape(rows).contiguous(), rstd_k.reshape(rows).contiguous()
    elif norm == 2:
        rstd_k = torch.rsqrt(xc.square().mean(dim=-1, keepdim=True) + eps)
        n = xc * rstd_k
        if tc is not None:
            tc = rstd_k * (tc - n * (n * tc).mean(dim=-1, keepdim=True))
        rstd = rstd_k.reshape(rows).contiguous()
    else:
        n = xc
    a, at = n, tc
    if weight is not None:
        w = weight.to(cd)
        a = a * w
        at = at * w if at is not None else None
    if bias is not None:
        a = a + bias.to(cd)
    y, ty = a, at
    if scale is not None:
        gain = 1 + _tokenwise(scale).to(cd)
        y = y * gain
        ty = ty * gain if ty is not None else None
        if tscale is not None:
            term = a * _tokenwise(tscale).to(cd)
            ty = term if ty is None else ty + term
    if shift is not None:
        y = y + _tokenwise(shift).to(cd)
        if tshift is not None:
            term = _tokenwise(tshift).to(cd).expand(y.shape)
            ty = term if ty is None else ty + term
    out_dtype = out_dtype or x.dtype
    y = y.to(out_dtype).contiguous()
    ty = torch.zeros_like(y) if ty is None else ty.to(out_dtype).contiguous()
    if ty.shape != y.shape:  # only tangents that broadcast (a [B, C] tshift alone): materialize x's shape
        ty = ty.expand(y.shape).contiguous()
    return y, ty, mean, rstd


# --------------------------------------------------------------------------------------------------- CUDA path
_kernel_fake_registered = False


def register_kernel_fake() -> bool:
    """Register the fake (meta) implementation of torch.ops.facm_ext.norm_modulate_jvp_cuda once, when the
    compiled kernel exists. Returns whether the kernel op exists."""
    global _kernel_fake_registered
    if not _extension.has_kernel(KERNEL):
        return False
    if not _kernel_fake_registered:
        _kernel_fake_registered = True

        @torch.library.register_fake(f"facm_ext::{KERNEL}")
        def _kernel_fake(x, tx, weight, bias, shift, tshift, scale, tscale, norm, eps, out_dtype=None):
            rows = x.shape[0] * x.shape[1]
            y = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
            ty = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
            mean = x.new_empty((rows if norm == 1 else 0,), dtype=torch.float32)
            rstd = x.new_empty((rows if norm != 0 else 0,), dtype=torch.float32)
            return y, ty, mean, rstd

    return True


def _rows_shape(x: Tensor) -> Optional[tuple[int, int, int]]:
    """A [B', L', C] shape that x (last dim contiguous) can be viewed as: its leading dims merged into at most two
    strided dims; None when they cannot be (three or more strided dims: the caller copies x)."""
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    c = x.shape[-1]
    if len(merged) == 0:
        return 1, 1, c
    if len(merged) == 1:
        return 1, merged[0][0], c
    if len(merged) == 2:
        return merged[0][0], merged[1][0], c
    return None


def _channels_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _view3(t: Tensor, shape3: tuple[int, int, int]) -> Tensor:
    """t as a [B', L', C] view of the shape ``shape3`` (x's), or a contiguous copy viewed so where its strides
    cannot express that shape (e.g. a tangent laid out unlike x). Decided from the strides: a failed ``view`` raises
    a RuntimeError whose construction costs more host time than the norm kernel's launch."""
    t = _channels_contiguous(t)
    if not t.is_contiguous() and _rows_shape(t) != shape3:
        t = t.contiguous()
    return t.view(shape3)


def _kernel_eligible(x: Tensor, *others) -> bool:
    return x.shape[-1] <= KERNEL_MAX_CHANNELS and _common.use_cuda_kernel(KERNEL, x, *others)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # t.to(dtype) returns t itself when the dtype already matches; the comparison skips the call's host time (this
    # runs for up to seven operands per norm call, the common case being no cast at all).
    return t if t.dtype == dtype else t.to(dtype)


def _fp32_vector(t: Optional[Tensor]) -> Optional[Tensor]:
    """weight / bias as the kernel reads them: fp32, contiguous (itself when it is already)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def _forward_kernel(norm: int, x: Tensor, tx, weight, bias, shift, tshift, scale, tscale, eps: float,
                    out_dtype: Optional[torch.dtype] = None):
    """The CUDA kernel on [B', L', C] views; same outputs as :func:`_forward_reference` (stats in fp32)."""
    if not _kernel_fake_registered:
        register_kernel_fake()
    x = _channels_contiguous(x)
    if x.dim() == 3:
        # Already [B', L', C]: x and its tangent go in as they are (a view of the same shape is the same operand),
        # and the outputs come back in x's shape.
        shape3 = tuple(x.shape)
        x3 = x
        tx3 = None if tx is None else _channels_contiguous(_cast(tx, x.dtype))
    else:
        shape3 = _rows_shape(x)
        if shape3 is None:  # three or more strided leading dims: the kernel takes two
            x = x.contiguous()
            shape3 = (1, x.numel() // x.shape[-1], x.shape[-1])
        x3 = x.view(shape3)
        tx3 = None if tx is None else _view3(_cast(tx, x.dtype), shape3)
    if shift is None and tshift is None and scale is None and tscale is None:
        mods3 = (None, None, None, None)
    else:
        mods = (shift, tshift, scale, tscale)
        mod_dtype = x.dtype
        if any(m is not None and m.dtype != x.dtype for m in mods):
            mod_dtype = torch.float32
        mods3 = [None if m is None else _channels_contiguous(_cast(_tokenwise(m), mod_dtype)).expand(shape3)
                 for m in mods]
    # The kernel op writes out_dtype itself (directly where it can, else by a cast after the kernel).
    y, ty, mean, rstd = torch.ops.facm_ext.norm_modulate_jvp_cuda(
        x3, tx3, _fp32_vector(weight), _fp32_vector(bias), *mods3, norm, eps, out_dtype=out_dtype)
    if x3 is x:
        return y, ty, mean, rstd
    return y.view(x.shape), ty.view(x.shape), mean, rstd


def _forward(norm: int, x: Tensor, tx, weight, bias, shift, tshift, scale, tscale, eps: float,
             out_dtype: Optional[torch.dtype] = None):
    if _kernel_eligible(x, tx, weight, bias, shift, tshift, scale, tscale):
        return _forward_kernel(norm, x, tx, weight, bias, shift, tshift, scale, tscale, eps, out_dtype)
    return _forward_reference(norm, x, tx, weight, bias, shift, tshift, scale, tscale, eps, out_dtype)


def backend_for(x: Tensor, *others) -> str:
    """'cuda' or 'reference': the path the ops take for these tensors (tests assert the kernel really runs)."""
    return "cuda" if _kernel_eligible(x, *others) else "reference"


def _fake_forward(norm: int, x: Tensor, out_dtype: Optional[torch.dtype] = None):
    rows = x.numel() // x.shape[-1]
    stat = _compute_dtype(x)
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    ty = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    mean = x.new_empty((rows if norm == 1 else 0,), dtype=stat)
    rstd = x.new_empty((rows if norm != 0 else 0,), dtype=stat)
    return y, ty, mean, rstd


# -------------------------------------------------------------------------------------------------------- backward
def _reduce_to(grad: Tensor, mod: Tensor) -> Tensor:
    """Sum a [B, L, C] gradient down to the modulation's own shape ([B, C] or a 3-D broadcast shape)."""
    if mod.dim() == 2:
        return grad.sum(dim=1)
    return grad.sum_to_size(mod.shape)


def _backward(ctx, grad_y: Tensor):
    """Gradients of the primal output w.r.t. (x, weight, bias, shift, scale), or None where not needed."""
    x, weight, bias, shift, scale, mean, rstd = ctx.saved_tensors
    norm = ctx.norm
    need = ctx.input_needs
    cd = _compute_dtype(x)
    g = grad_y.to(cd)
    xc = x.to(cd)
    if norm == 1:
        n = (xc - mean.view(_stats_shape(x))) * rstd.view(_stats_shape(x))
    elif norm == 2:
        n = xc * rstd.view(_stats_shape(x))
    else:
        n = xc
    grads = dict.fromkeys(("x", "weight", "bias", "shift", "scale"))
    if shift is not None and need["shift"]:
        grads["shift"] = _reduce_to(g, shift).to(shift.dtype)
    if scale is not None:
        if need["scale"]:
            a = n * weight.to(cd) if weight is not None else n
            a = a + bias.to(cd) if bias is not None else a
            grads["scale"] = _reduce_to(g * a, scale).to(scale.dtype)
        g = g * (1 + _tokenwise(scale).to(cd))
    lead = tuple(range(x.dim() - 1))
    if weight is not None and need["weight"]:
        grads["weight"] = (g * n).sum(dim=lead).to(weight.dtype)
    if bias is not None and need["bias"]:
        grads["bias"] = g.sum(dim=lead).to(bias.dtype)
    if need["x"]:
        if weight is not None:
            g = g * weight.to(cd)
        if norm == 1:
            r = rstd.view(_stats_shape(x))
            gx = r * (g - g.mean(dim=-1, keepdim=True) - n * (g * n).mean(dim=-1, keepdim=True))
        elif norm == 2:
            gx = rstd.view(_stats_shape(x)) * (g - n * (g * n).mean(dim=-1, keepdim=True))
        else:
            gx = g
        grads["x"] = gx.to(x.dtype)
    return grads


def _save(ctx, norm: int, x, weight, bias, shift, scale, output, needs: dict) -> None:
    _, ty, mean, rstd = output
    ctx.mark_non_differentiable(ty, mean, rstd)
    ctx.norm = norm
    ctx.input_needs = needs
    ctx.save_for_backward(x, weight, bias, shift, scale, mean, rstd)


# ------------------------------------------------------------------------------------------------ custom ops
Pair4 = tuple[Tensor, Tensor, Tensor, Tensor]


@_common.jvp_custom_op("facm_ext::layer_norm_jvp")
def _layer_norm_op(x: Tensor, tx: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> Pair4:
    return _forward(1, x, tx, weight, bias, None, None, None, None, eps)


@_layer_norm_op.register_fake
def _(x, tx, weight, bias, eps):
    return _fake_forward(1, x)


def _layer_norm_setup(ctx, inputs, output):
    x, tx, weight, bias, eps = inputs
    _save(ctx, 1, x, weight, bias, None, None, output, {"x": x.requires_grad, "weight": weight is not None and
          weight.requires_grad, "bias": bias is not None and bias.requires_grad, "shift": False, "scale": False})


def _layer_norm_backward(ctx, grad_y, grad_ty, grad_mean, grad_rstd):
    g = _backward(ctx, grad_y)
    return g["x"], None, g["weight"], g["bias"], None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


@_common.jvp_custom_op("facm_ext::rms_norm_jvp")
def _rms_norm_op(x: Tensor, tx: Optional[Tensor], weight: Optional[Tensor], eps: float) -> Pair4:
    return _forward(2, x, tx, weight, None, None, None, None, None, eps)


@_rms_norm_op.register_fake
def _(x, tx, weight, eps):
    return _fake_forward(2, x)


def _rms_norm_setup(ctx, inputs, output):
    x, tx, weight, eps = inputs
    _save(ctx, 2, x, weight, None, None, None, output, {"x": x.requires_grad, "weight": weight is not None and
          weight.requires_grad, "bias": False, "shift": False, "scale": False})


def _rms_norm_backward(ctx, grad_y, grad_ty, grad_mean, grad_rstd):
    g = _backward(ctx, grad_y)
    return g["x"], None, g["weight"], None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


@_common.jvp_custom_op("facm_ext::modulate_jvp")
def _modulate_op(x: Tensor, tx: Optional[Tensor], shift: Tensor, tshift: Optional[Tensor], scale: Tensor,
                 tscale: Optional[Tensor]) -> Pair4:
    return _forward(0, x, tx, None, None, shift, tshift, scale, tscale, 0.0)


@_modulate_op.register_fake
def _(x, tx, shift, tshift, scale, tscale):
    return _fake_forward(0, x)


def _modulate_setup(ctx, inputs, output):
    x, tx, shift, tshift, scale, tscale = inputs
    _save(ctx, 0, x, None, None, shift, scale, output, {"x": x.requires_grad, "weight": False, "bias": False,
          "shift": shift.requires_grad, "scale": scale.requires_grad})


def _modulate_backward(ctx, grad_y, grad_ty, grad_mean, grad_rstd):
    g = _backward(ctx, grad_y)
    return g["x"], None, g["shift"], None, g["scale"], None


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


@_common.jvp_custom_op("facm_ext::adaln_jvp")
def _adaln_op(x: Tensor, tx: Optional[Tensor], shift: Tensor, tshift: Optional[Tensor], scale: Tensor,
              tscale: Optional[Tensor], weight: Optional[Tensor], norm: str, eps: float,
              out_dtype: Optional[torch.dtype] = None) -> Pair4:
    return _forward(_NORM_CODES[norm], x, tx, weight, None, shift, tshift, scale, tscale, eps, out_dtype)


@_adaln_op.register_fake
def _(x, tx, shift, tshift, scale, tscale, weight, norm, eps, out_dtype=None):
    return _fake_forward(_NORM_CODES[norm], x, out_dtype)


def _adaln_setup(ctx, inputs, output):
    x, tx, shift, tshift, scale, tscale, weight, norm = inputs[:8]
    _save(ctx, _NORM_CODES[norm], x, weight, None, shift, scale, output, {
        "x": x.requires_grad, "weight": weight is not None and weight.requires_grad, "bias": False,
        "shift": shift.requires_grad, "scale": scale.requires_grad})


def _adaln_backward(ctx, grad_y, grad_ty, grad_mean, grad_rstd):
    g = _backward(ctx, grad_y)
    return g["x"], None, g["shift"], None, g["scale"], None, g["weight"], None, None, None


_adaln_op.register_autograd(_adaln_backward, setup_context=_adaln_setup)


# ---------------------------------------------------------------------------------------------- public functions
def layer_norm_jvp(x: Tensor, tx: Optional[Tensor], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim and its JVP: ``y = (x - mean) * rstd * weight + bias``.

    x: [..., C] fp32/fp16/bf16/fp64; tx: x's shape or None; weight, bias: [C] or None. Returns (y, ty), both
    [..., C] contiguous in x's dtype. The tangent of weight/bias is zero (parameters are constants of the JVP).
    """
    if not (_plain_x(x, three_d=False) and _common.plain_tangent(tx, x.shape, x.device)
            and _plain_channel_vector(weight, x) and _plain_channel_vector(bias, x)):
        _check_x(x, three_d=False)
        _common.check_tangent("tx", tx, "x", x)
        _check_channel_vector("weight", weight, x)
        _check_channel_vector("bias", bias, x)
    y, ty, _, _ = _layer_norm_op(x, tx, weight, bias, _check_eps(eps))
    return y, ty


def rms_norm_jvp(x: Tensor, tx: Optional[Tensor], weight: Optional[Tensor] = None,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim and its JVP: ``y = x * rstd * weight``, ``rstd = (mean(x^2) + eps)^-1/2``.

    x: [..., C] (qk-norm: [B, L, H, head_dim]) fp32/fp16/bf16/fp64; tx: x's shape or None; weight: [C] or None.
    Returns (y, ty), both [..., C] contiguous in x's dtype.
    """
    if not (_plain_x(x, three_d=False) and _common.plain_tangent(tx, x.shape, x.device)
            and _plain_channel_vector(weight, x)):
        _check_x(x, three_d=False)
        _common.check_tangent("tx", tx, "x", x)
        _check_channel_vector("weight", weight, x)
    y, ty, _, _ = _rms_norm_op(x, tx, weight, _check_eps(eps))
    return y, ty


def _check_modulated_args(x, tx, shift, tshift, scale, tscale) -> None:
    """ValueError naming the argument unless x is [B, L, C] with modulation broadcasting to it, tangents matching."""
    _check_x(x, three_d=True)
    _common.check_tangent("tx", tx, "x", x)
    _check_modulation("shift", shift, x)
    _check_modulation("scale", scale, x)
    _common.check_tangent("tshift", tshift, "shift", shift)
    _common.check_tangent("tscale", tscale, "scale", scale)


def modulate_jvp(x: Tensor, tx: Optional[Tensor], shift: Tensor, tshift: Optional[Tensor], scale: Tensor,
                 tscale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """adaLN modulation and its JVP: ``y = x * (1 + scale) + shift``, ``y' = x' (1 + scale) + x scale' + shift'``.

    x: [B, L, C]; shift, scale: [B, C] (broadcast over tokens) or 3-D broadcasting to [B, L, C] (per-token strided
    views included); each tangent None or its primal's shape. Returns (y, ty): [B, L, C] contiguous, x's dtype.
    """
    if not _plain_modulated_args(x, tx, shift, tshift, scale, tscale):
        _check_modulated_args(x, tx, shift, tshift, scale, tscale)
    y, ty, _, _ = _modulate_op(x, tx, shift, tshift, scale, tscale)
    return y, ty


def adaln_jvp(x: Tensor, tx: Optional[Tensor], shift: Tensor, tshift: Optional[Tensor], scale: Tensor,
              tscale: Optional[Tensor], norm: str = "layer", weight: Optional[Tensor] = None,
              eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Norm (``"layer"``: LayerNorm without bias, ``"rms"``: RMSNorm) times weight, then adaLN modulation, and the
    JVP of the whole, in one pass: ``y = norm(x) * weight * (1 + scale) + shift``.

    x: [B, L, C]; shift, scale: [B, C] or 3-D broadcasting to [B, L, C] (Wan: per-token fp32 strided views);
    tangents None or their primal's shape; weight: [C] or None. out_dtype: the outputs' dtype (default x's): the
    fp32 result is rounded once to it. For fp32 x and a bf16/fp16 out_dtype (the input of a 16-bit linear under
    autocast, or Wan's ``.to(dtype)``) the kernel writes it directly where it stages rows in shared memory (C of
    LightningDiT and Wan), else the op casts after it. Returns (y, ty): [B, L, C] contiguous, out_dtype.
    """
    _check_norm(norm)
    if not (_plain_modulated_args(x, tx, shift, tshift, scale, tscale) and _plain_channel_vector(weight, x)):
        _check_modulated_args(x, tx, shift, tshift, scale, tscale)
        _check_channel_vector("weight", weight, x)
    if out_dtype is not None and out_dtype not in _common.FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected None or one of {', '.join(map(str, _common.FLOAT_DTYPES))}, "
                         f"got {out_dtype!r}")
    y, ty, _, _ = _adaln_op(x, tx, shift, tshift, scale, tscale, weight, norm, _check_eps(eps),
                            None if out_dtype == x.dtype else out_dtype)
    return y, ty
