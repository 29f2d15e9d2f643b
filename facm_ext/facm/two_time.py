"""A second time input for MeanFlow-style objectives: the FACM reference code's ``auxiliary_time_cond`` option
(an ``r_embedder`` whose embedding is added to the conditioning vector), as a wrapper around an unmodified
:class:`facm_ext.models.LightningDiT`."""

from __future__ import annotations

import copy

import torch
from torch import nn


class TwoTimeModel(nn.Module):
    """``forward(x [B, C, H, W], t [B], y [B] long, r [B] or None) -> [B, C, H, W]``: the wrapped network with
    conditioning ``c = t_embedder(t) + y_embedder(y) + r_embedder(r)``; ``r = None`` means r = 1 (the consistency
    end time, as the reference sampler feeds), so :func:`facm_ext.facm.sample` works unchanged.

    ``model`` must expose ``embed(x, t, y) -> (tokens, c)``, ``blocks``, ``feat_rope`` and ``head(tokens, c)``
    (LightningDiT does). The new ``r_embedder`` is a copy of ``model.t_embedder`` initialised as officially
    (first layer N(0, 0.02), last layer zero), so the wrapper starts out equal to the wrapped model.
    State-dict keys: ``model.*`` and ``r_embedder.*``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        missing = [name for name in ("embed", "blocks", "head", "t_embedder") if not hasattr(model, name)]
        if missing:
            raise ValueError(f"model: expected a LightningDiT-like module with embed/blocks/head/t_embedder; "
                             f"{type(model).__name__} lacks {', '.join(missing)}")
        self.model = model
        self.r_embedder = copy.deepcopy(model.t_embedder)
        nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.r_embedder.mlp[0].bias)
        nn.init.zeros_(self.r_embedder.mlp[2].weight)
        nn.init.zeros_(self.r_embedder.mlp[2].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None = None):
        if r is None:
            r = torch.ones_like(t)
        tokens, c = self.model.embed(x, t, y)
        c = c + self.r_embedder(r)
        rope = getattr(self.model, "feat_rope", None)
        for block in self.model.blocks:
            tokens = block(tokens, c, rope)
        return self.model.head(tokens, c)
