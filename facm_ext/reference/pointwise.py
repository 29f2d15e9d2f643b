"""Plain-PyTorch references of the pointwise primal functions (no JVP code).

Tests take ``torch.func.jvp`` of these in float64 and compare the fused ops of :mod:`facm_ext.ops.pointwise`
against it; benchmarks time ``torch.func.jvp`` and ``torch.compile`` of them as the alternatives to beat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``.

    x, y: [B, L, C] (any float dtype). gate: [B, C] (broadcast over the L tokens, as DiT's ``gate.unsqueeze(1)``),
    [B, 1, C] or per-token [B, L, C]. Any other shape that broadcasts to x is used as is.
    Returns [B, L, C] in the promoted dtype of the inputs (PyTorch's type promotion).
    """
    if gate.dim() == 2 and x.dim() == 3:
        gate = gate.unsqueeze(1)
    return x + gate * y


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU, tanh approximation (``approximate="tanh"``) or exact erf form (``"none"``). x: any shape."""
    return F.gelu(x, approximate=approximate)


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``. x: any shape."""
    return F.silu(x)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``. a, b: same shape [..., C] (LightningDiT: the two halves of a [..., 2C] Linear output)."""
    return F.silu(a) * b
