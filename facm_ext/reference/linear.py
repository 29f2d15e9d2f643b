"""Plain-PyTorch reference of the linear layer (the primal function of :func:`facm_ext.ops.linear_jvp`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``.

    x: [..., K] float; weight: [N, K], same dtype; bias: [N] or None. Returns [..., N] in x's dtype.
    """
    return F.linear(x, weight, bias)
