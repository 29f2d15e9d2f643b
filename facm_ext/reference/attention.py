"""Plain-PyTorch reference of softmax attention (no JVP code).

Tests take ``torch.func.jvp`` (and autograd) of :func:`attention` in float64 and compare the fused op of
:mod:`facm_ext.ops.attention` against it; benchmarks time ``torch.func.jvp`` of it, eager and compiled, as the
"math path" alternative (what PyTorch offers: only the math SDPA backend supports forward-mode AD).
"""

from __future__ import annotations

import math

import torch


def key_padding_mask(key_lengths: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B] integer key lengths -> [B, 1, 1, num_keys] bool, True where the key is valid (index < length)."""
    positions = torch.arange(num_keys, device=key_lengths.device)
    return (positions[None, :] < key_lengths[:, None].to(positions.dtype)).view(-1, 1, 1, num_keys)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T, masked) v``, materializing the full score matrix.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D] (any float dtype, computed in it). scale defaults to 1/sqrt(D).
    key_lengths: optional [B] integer tensor; keys at positions >= key_lengths[b] are masked out. A query row whose
    keys are all masked (key length 0) outputs zeros (plain softmax would give NaN).
    Returns [B, H, Lq, D] in q's dtype.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if key_lengths is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    valid = key_padding_mask(key_lengths, k.shape[-2])
    scores = scores.masked_fill(~valid, float("-inf"))
    has_keys = valid.any(dim=-1, keepdim=True)
    # A row with no valid key would be softmax(-inf, ..., -inf) = NaN: give it zero scores, then zero weights.
    probs = torch.softmax(torch.where(has_keys, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(has_keys & valid, probs, torch.zeros_like(probs))
    return torch.matmul(probs, v)
