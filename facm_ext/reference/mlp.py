"""Plain-PyTorch references of the transformer MLPs (the primal functions of :func:`facm_ext.ops.mlp_jvp`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu_tanh", "swiglu")


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
        activation: str = "gelu_tanh") -> torch.Tensor:
    """Two-layer MLP as in the official models.

    - ``"gelu_tanh"``: timm ``Mlp`` (DiT, Wan): ``fc2(gelu_tanh(fc1(x)))``; w1 [H, K], b1 [H], w2 [K_out, H].
    - ``"swiglu"``: LightningDiT ``SwiGLUFFN``: ``x12 = w12(x); x1, x2 = x12.chunk(2, -1); w3(silu(x1) * x2)``;
      w1 = w12 [2 H, K] (rows [0, H) give x1, rows [H, 2 H) give x2), b1 [2 H], w2 = w3 [K_out, H].

    x: [..., K] float; weights and biases in x's dtype (biases may be None). Returns [..., K_out].
    """
    if activation == "gelu_tanh":
        hidden = F.gelu(F.linear(x, w1, b1), approximate="tanh")
    elif activation == "swiglu":
        x1, x2 = F.linear(x, w1, b1).chunk(2, dim=-1)
        hidden = F.silu(x1) * x2
    else:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return F.linear(hidden, w2, b2)
