"""Plain-PyTorch reference of rotary position embedding (no JVP code).

Two conventions, both ``out = x * cos + rotate(x) * sin`` with per-channel tables:
- interleaved (EVA / LightningDiT, and Wan's complex pairs): channels (2i, 2i+1) form a pair,
  ``rotate(x)[2i] = -x[2i+1]``, ``rotate(x)[2i+1] = x[2i]``;
- half-split (``rotate_half``, GPT-NeoX): channels (j, j + D/2) form a pair,
  ``rotate(x) = cat(-x[..., D/2:], x[..., :D/2])``.

Tables: ``[L, D]`` per channel (EVA builds them with every pair's angle repeated) or ``[L, D/2]`` per pair (one
angle per pair; Wan's complex ``freqs`` are ``cos + i sin`` of these). A per-pair table is expanded to per channel
(``repeat_interleave(2)`` for interleaved, ``cat([t, t])`` for half-split).
"""

from __future__ import annotations

import torch


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: cat(-x[..., D/2:], x[..., :D/2])."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def per_channel_table(table: torch.Tensor, head_dim: int, interleaved: bool) -> torch.Tensor:
    """[L, D] -> itself; [L, D/2] (one angle per pair) -> [L, D] per channel."""
    if table.shape[-1] == head_dim:
        return table
    if interleaved:
        return table.repeat_interleave(2, dim=-1)
    return torch.cat((table, table), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True,
         layout: str = "BHLD") -> torch.Tensor:
    """Rotary embedding of x.

    x: [B, H, L, D] (layout "BHLD") or [B, L, H, D] (layout "BLHD"), D even. cos, sin: [L, D] or [L, D/2].
    Returns x's shape in the promoted dtype of x and the tables.
    """
    head_dim = x.shape[-1]
    cos = per_channel_table(cos, head_dim, interleaved)
    sin = per_channel_table(sin, head_dim, interleaved)
    if layout == "BLHD":  # tables [L, D] -> [L, 1, D] so they broadcast over the heads
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rotate = rotate_interleaved if interleaved else rotate_half
    return x * cos + rotate(x) * sin


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float = 1e-6, interleaved: bool = True, layout: str = "BHLD") -> torch.Tensor:
    """RMSNorm over the last dim (``x / sqrt(mean(x^2) + eps) * weight``), then :func:`rope`: an attention
    layer's per-head qk-norm followed by its rotary embedding. Shapes as :func:`rope`; weight: [D] or None."""
    from facm_ext.reference.norms import rms_norm

    return rope(rms_norm(x, weight, eps), cos, sin, interleaved=interleaved, layout=layout)
