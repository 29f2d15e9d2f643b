"""Fused function rules: torch functions the transform sends to facm_ext.ops.

| function                              | op                | fused when                                              |
|---------------------------------------|-------------------|---------------------------------------------------------|
| F.linear                              | linear_jvp        | the input carries a tangent, weight/bias do not         |
| F.scaled_dot_product_attention        | attention_jvp     | 4-D, dropout_p == 0, not causal, no GQA; attn_mask None |
|                                       |                   | or a boolean key-prefix mask (-> key_lengths; 1 sync)   |
| F.layer_norm                          | layer_norm_jvp    | normalized over the last dim only, weight/bias constant |
| F.rms_norm                            | rms_norm_jvp      | normalized over the last dim only, weight constant      |
| F.gelu                                | gelu_jvp          | always                                                  |
| F.silu                                | silu_jvp          | not inplace                                             |

Anything else, and every case above whose op is missing or rejects the arguments (ValueError), falls back to
PyTorch's own forward-mode rule for that op; the report says which and why. SDPA falls back with the math
backend for the tangent (the only SDPA backend with a forward-mode rule) and the default backend for the primal.

Dtypes: F.linear and SDPA follow torch.autocast like the plain functions (the op casts, or the rule casts before
calling it). The norms compute in fp32 and return the input's dtype (PyTorch under autocast would return fp32
for a bf16 LayerNorm; the values agree to the output rounding); parameters of another dtype are cast to the
input's dtype first, with autograd, so their gradients still reach the fp32 master weights.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._dual import (
    FUSED_FUNCTION_RULES,
    STATE,
    DisableTorchFunctionSubclass,
    fallback,
    plain,
    record_fused,
    split_dual,
    tangent_of,
    wrap_op_result,
)

_OP_CACHE: dict[str, tuple[Optional[Callable], Optional[str]]] = {}


def get_op(name: str) -> tuple[Optional[Callable], Optional[str]]:
    """(facm_ext.ops.<name>, None), or (None, why it is unavailable). Looked up once per process."""
    cached = _OP_CACHE.get(name)
    if cached is not None:
        return cached
    try:
        ops = importlib.import_module("facm_ext.ops")
        result = (getattr(ops, name), None)
    except (ImportError, AttributeError) as exc:
        result = (None, f"op unavailable ({type(exc).__name__}: {exc})")
    _OP_CACHE[name] = result
    return result


def call_op(name: str, what: str, *args, **kwargs):
    """Run facm_ext.ops.<name>; returns (primal, tangent) or (None, reason) when the op is missing or rejected the
    arguments (ValueError: an unsupported case for that op, which the fallback handles correctly)."""
    op, why = _OP_CACHE.get(name) or get_op(name)
    if op is None:
        return None, why
    try:
        result = op(*args, **kwargs)
    except ValueError as exc:
        return None, f"{name} rejected the arguments: {exc}"
    # The report's key is built only when a report is being kept (this runs once per fused op).
    if STATE.report is not None:
        record_fused(f"{what} -> {name}")
    return result, None


def _bind(args: tuple, kwargs: dict, names: tuple, defaults: tuple) -> list:
    """Positional-or-keyword arguments of a function as a list in ``names`` order (defaults for the tail)."""
    missing = len(names) - len(args)
    if not kwargs and 0 <= missing <= len(defaults):
        # All given positionally (the common call): the tail is the last `missing` defaults.
        return [*args, *defaults[len(defaults) - missing:]]
    values = list(args) + [None] * (len(names) - len(args))
    first_default = len(names) - len(defaults)
    for i, name in enumerate(names):
        if i >= len(args):
            values[i] = kwargs[name] if name in kwargs else (
                defaults[i - first_default] if i >= first_default else None)
    return values


def autocast_lower_precision(device_type: str, *tensors):
    """Cast like an autocast lower-precision op (F.linear, SDPA): fp16/bf16/fp32 tensors to the autocast dtype
    when autocast is enabled on ``device_type``; None and float64 unchanged. Differentiable casts."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    target = torch.get_autocast_dtype(device_type)
    return tuple(t.to(target) if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
                 and t.dtype != target else t for t in tensors)


def _like(param, x: torch.Tensor):
    """A parameter (plain tensor or None) cast to x's dtype (differentiably) when it differs."""
    param = plain(param)
    if param is None or param.dtype == x.dtype:
        return param
    return param.to(x.dtype)


# -------------------------------------------------------------------------------------------------------- rules
def _linear_rule(args, kwargs):
    x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"), (None,))
    if tangent_of(x) is None or tangent_of(weight) is not None or tangent_of(bias) is not None:
        return fallback(F.linear, args, kwargs)
    x_p, x_t = split_dual(x)
    result, why = call_op("linear_jvp", "F.linear", x_p, x_t, plain(weight), plain(bias))
    if result is None:
        return fallback(F.linear, args, kwargs, reason=why)
    return wrap_op_result(*result)


def _math_sdpa_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _sdpa_fallback(args, kwargs, reason=None):
    return fallback(F.scaled_dot_product_attention, args, kwargs, tangent_context=_math_sdpa_backend,
                    reason=reason)


def _key_lengths_of_mask(mask, batch: int, keys: int):
    """[B] int64 valid-key counts when ``mask`` is a boolean [B or 1, 1, 1, Lk] mask that keeps a nonempty prefix
    of the keys of every sample (the key-padding mask of variable-length self-attention); else None.
    Checking the prefix form costs one device synchronization."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != keys or mask.shape[0] not in (1, batch):
        return None
    rows = mask.reshape(mask.shape[0], keys)
    lengths = rows.sum(-1)
    prefix = torch.arange(keys, device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, rows) or not bool((lengths > 0).all()):
        return None
    return lengths.expand(batch).contiguous()


def _sdpa_rule(args, kwargs):
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = _bind(
        args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        (None, 0.0, False, None, False))
    tq, tk, tv = tangent_of(q), tangent_of(k), tangent_of(v)
    if tq is None and tk is None and tv is None:
        return _sdpa_fallback(args, kwargs)
    if dropout_p != 0.0 or is_causal or enable_gqa:
        return _sdpa_fallback(args, kwargs, reason="dropout/is_causal/enable_gqa not fused")
    # Shapes read with the subclass's torch-function handling off: on a dual, each read would be a dispatch.
    with DisableTorchFunctionSubclass():
        four_d = q.dim() == 4 and k.dim() == 4 and v.dim() == 4
        batch, keys = (q.shape[0], k.shape[-2]) if four_d else (None, None)
    if not four_d:
        return _sdpa_fallback(args, kwargs, reason="only 4-D [B, H, L, D] inputs are fused")
    key_lengths = None
    if attn_mask is not None:
        key_lengths = _key_lengths_of_mask(plain(attn_mask), batch, keys)
        if key_lengths is None:
            return _sdpa_fallback(args, kwargs, reason="attn_mask other than a boolean key-prefix mask not fused")
    result, why = sdpa_pairs(plain(q), plain(k), plain(v), tq, tk, tv, scale=scale, key_lengths=key_lengths)
    if result is None:
        return _sdpa_fallback(args, kwargs, reason=why)
    return wrap_op_result(*result)


def sdpa_pairs(qp, kp, vp, tq, tk, tv, *, scale=None, key_lengths=None):
    """attention_jvp on primals and tangents, cast as SDPA casts under autocast: ((o, to), None) or (None, why)."""
    qp, kp, vp, tq, tk, tv = autocast_lower_precision(qp.device.type, qp, kp, vp, tq, tk, tv)
    return call_op("attention_jvp", "F.scaled_dot_product_attention", qp, kp, vp, tq, tk, tv, scale=scale,
                   key_lengths=key_lengths)


def _layer_norm_rule(args, kwargs):
    x, normalized_shape, weight, bias, eps = _bind(
        args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))
    if tangent_of(x) is None:
        return fallback(F.layer_norm, args, kwargs)
    if tangent_of(weight) is not None or tangent_of(bias) is not None:
        return fallback(F.layer_norm, args, kwargs, reason="weight/bias carry a tangent")
    x_p, x_t = split_dual(x)
    if len(tuple(normalized_shape)) != 1 or tuple(normalized_shape)[0] != x_p.shape[-1]:
        return fallback(F.layer_norm, args, kwargs, reason="only normalization over the last dim is fused")
    result, why = call_op("layer_norm_jvp", "F.layer_norm", x_p, x_t, _like(weight, x_p), _like(bias, x_p),
                          eps=eps)
    if result is None:
        return fallback(F.layer_norm, args, kwargs, reason=why)
    return wrap_op_result(*result)


def _rms_norm_rule(args, kwargs):
    x, normalized_shape, weight, eps = _bind(args, kwargs, ("input", "normalized_shape", "weight", "eps"),
                                             (None, None))
    if tangent_of(x) is None:
        return fallback(F.rms_norm, args, kwargs)
    if tangent_of(weight) is not None:
        return fallback(F.rms_norm, args, kwargs, reason="weight carries a tangent")
    x_p, x_t = split_dual(x)
    if len(tuple(normalized_shape)) != 1 or tuple(normalized_shape)[0] != x_p.shape[-1]:
        return fallback(F.rms_norm, args, kwargs, reason="only normalization over the last dim is fused")
    if eps is None:
        eps = torch.finfo(x_p.dtype).eps
    result, why = call_op("rms_norm_jvp", "F.rms_norm", x_p, x_t, _like(weight, x_p), eps=eps)
    if result is None:
        return fallback(F.rms_norm, args, kwargs, reason=why)
    return wrap_op_result(*result)


def _gelu_rule(args, kwargs):
    x, approximate = _bind(args, kwargs, ("input", "approximate"), ("none",))
    if tangent_of(x) is None:
        return fallback(F.gelu, args, kwargs)
    x_p, x_t = split_dual(x)
    result, why = call_op("gelu_jvp", "F.gelu", x_p, x_t, approximate=approximate)
    if result is None:
        return fallback(F.gelu, args, kwargs, reason=why)
    return wrap_op_result(*result)


def _silu_rule(args, kwargs):
    x, inplace = _bind(args, kwargs, ("input", "inplace"), (False,))
    if tangent_of(x) is None or inplace:
        return fallback(F.silu, args, kwargs)
    x_p, x_t = split_dual(x)
    result, why = call_op("silu_jvp", "F.silu", x_p, x_t)
    if result is None:
        return fallback(F.silu, args, kwargs, reason=why)
    return wrap_op_result(*result)


FUSED_FUNCTION_RULES.update({
    F.linear: _linear_rule,
    F.scaled_dot_product_attention: _sdpa_rule,
    F.layer_norm: _layer_norm_rule,
    F.gelu: _gelu_rule,
    F.silu: _silu_rule,
})
if hasattr(F, "rms_norm"):
    FUSED_FUNCTION_RULES[F.rms_norm] = _rms_norm_rule

__all__ = ["autocast_lower_precision", "call_op", "get_op", "sdpa_pairs"]
