"""Plain-PyTorch references of the norm-family primal functions (no JVP code).

Tests take ``torch.func.jvp`` of these in float64 and compare the fused ops of :mod:`facm_ext.ops.norms` against
it; benchmarks time ``torch.func.jvp`` and ``torch.compile`` of them as the alternatives to beat. Every function
computes in the dtype it is given (PyTorch type promotion between x and the modulation); the fused ops compute in
fp32 and return x's dtype.
"""

from __future__ import annotations

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias`` (biased variance).

    x: [..., C]; weight, bias: [C] or None. Returns x's shape.
    """
    mean = x.mean(dim=-1, keepdim=True)
    centered = x - mean
    var = centered.square().mean(dim=-1, keepdim=True)
    out = centered * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``.

    x: [..., C] (per-head qk-norm: [B, L, H, head_dim]; Wan: [B, L, 5120]); weight: [C] or None. Returns x's shape.
    """
    out = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out


def _tokenwise(mod: torch.Tensor) -> torch.Tensor:
    # [B, C] modulation applies to every token of x [B, L, C] (DiT's ``shift.unsqueeze(1)``).
    return mod.unsqueeze(1) if mod.dim() == 2 else mod


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``.

    x: [B, L, C]. shift, scale: [B, C] (broadcast over the L tokens), or 3-D tensors that broadcast to [B, L, C]
    ([B, 1, C], per-token [B, L, C], possibly strided views such as Wan's slices of a [B, L, 6, C] tensor).
    Returns [B, L, C].
    """
    return x * (1 + _tokenwise(scale)) + _tokenwise(shift)


def adaln(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm: str = "layer",
          weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``modulate(norm(x) * weight, shift, scale)`` with norm ``"layer"`` (LayerNorm, no bias) or ``"rms"``.

    x: [B, L, C]; shift, scale as in :func:`modulate`; weight: [C] or None. Returns [B, L, C].
    """
    if norm == "layer":
        normed = layer_norm(x, weight, None, eps)
    elif norm == "rms":
        normed = rms_norm(x, weight, eps)
    else:
        raise ValueError(f"norm: expected 'layer' or 'rms', got {norm!r}")
    return modulate(normed, shift, scale)
