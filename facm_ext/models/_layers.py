"""Layers shared by the reference DiTs (DiT, LightningDiT): patch embedding, timestep and label embedders, the
adaLN modulation, fixed 2D sin-cos position embeddings and the RMSNorm module.

Plain PyTorch, no JVP code: the forward-mode transform (facm_ext.jvp) recognizes these modules and functions.
Attribute names follow the official repositories (facebookresearch/DiT, hustvl/LightningDiT), so their state
dicts load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample vectors broadcast over tokens.

    x: [B, L, C]; shift, scale: [B, C] (same dtype as x). Returns [B, L, C].
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight, normalized in float32 (as LightningDiT's Llama-style RMSNorm).

    forward(x [..., dim] any float dtype) -> [..., dim]: ``(x / sqrt(mean(x^2) + eps)).to(x.dtype) * weight``.
    The statistics are computed in float32 (float64 for float64 input) so bf16/fp16 inputs do not lose precision
    in the reduction.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 (float64 stays float64, so float64 references are exact).
        x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class PatchEmbed(nn.Module):
    """Image/latent to patch tokens (timm ``PatchEmbed`` layout: ``proj`` is a Conv2d with kernel = stride = patch).

    forward(x [B, in_channels, H, W]) -> [B, (H/p)*(W/p), embed_dim], tokens in row-major (h, w) order.
    """

    def __init__(self, img_size: int, patch_size: int, in_channels: int, embed_dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size: expected a multiple of patch_size={patch_size}, got {img_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (``frequency_embedding_size`` of them, max period 10000) -> 2-layer SiLU MLP.

    forward(t [B] float, fed raw: no x1000 rescaling) -> [B, hidden_size] in the MLP's weight dtype.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t [B] float -> [B, dim] float32 (float64 for float64 t) features ``[cos(t * f_i), sin(t * f_i)]``,
        f_i = max_period^(-i/half)."""
        half = dim // 2
        # float32 as officially; float64 times stay float64 so float64 references are exact.
        compute_dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=compute_dtype, device=t.device) / half)
        args = t[:, None].to(compute_dtype) * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # The features are float32; casting to the weights' dtype lets a bf16 model run without autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label embedding table with ``num_classes + 1`` rows; row ``num_classes`` is the null (CFG) class.

    forward(labels [B] long, values in [0, num_classes]) -> [B, hidden_size]. Deterministic: label dropout for
    classifier-free guidance is the caller's job (replace labels by ``num_classes``), so that repeated calls (for
    instance the primal and tangent passes of a JVP) see the same labels.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style 1D sin-cos embedding. positions [M] float64 -> [M, embed_dim] float64 ``[sin(p w), cos(p w)]``."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim: expected an even number, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1, 1).to(torch.float64) * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of DiT/LightningDiT -> [grid_size**2, embed_dim] float32.

    Token (h, w) (row-major) gets ``[emb_1d(w), emb_1d(h)]``: the first half of the channels encodes the column,
    the second half the row, exactly as the official ``get_2d_sincos_pos_embed`` (its meshgrid puts w first).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim: expected a multiple of 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_cols = sincos_1d(embed_dim // 2, cols.reshape(-1))
    emb_rows = sincos_1d(embed_dim // 2, rows.reshape(-1))
    return torch.cat([emb_cols, emb_rows], dim=1).to(torch.float32)


class FeedForwardGELU(nn.Module):
    """timm ``Mlp`` layout: ``fc1`` -> GELU(tanh) ``act`` -> ``fc2`` (no dropout).

    forward(x [..., in_features]) -> [..., in_features].
    """

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Patch tokens back to an image: x [B, grid_h*grid_w, p*p*channels] (per-token layout (p, q, c)) ->
    [B, channels, grid_h*p, grid_w*p]."""
    batch = x.shape[0]
    p = patch_size
    x = x.reshape(batch, grid_h, grid_w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, grid_h * p, grid_w * p)


def basic_init_(module: nn.Module) -> None:
    """The official DiT init for every Linear: Xavier-uniform weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def silu_linear(hidden_size: int, out_features: int) -> nn.Sequential:
    """The adaLN modulation head: ``adaLN_modulation = Sequential(SiLU, Linear(hidden, out))`` (index 1 = Linear)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, out_features, bias=True))


__all__ = [
    "FeedForwardGELU",
    "LabelEmbedder",
    "PatchEmbed",
    "RMSNorm",
    "TimestepEmbedder",
    "basic_init_",
    "modulate",
    "silu_linear",
    "sincos_2d_pos_embed",
    "unpatchify",
]


class ImageDiTMixin:
    """What DiT and LightningDiT share around their blocks: the input embedding and the official initialization of
    the embedders and adaLN-Zero heads. The class needs ``x_embedder`` (:class:`PatchEmbed`), ``t_embedder``,
    ``y_embedder``, ``pos_embed``, ``blocks`` (each with ``adaLN_modulation``), ``final_layer`` (with
    ``adaLN_modulation`` and ``linear``), ``in_channels`` and ``input_size``."""

    def build_embedding(self, *, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                        num_heads: int, num_classes: int, learn_sigma: bool) -> None:
        """The configuration attributes, the patch / time / label embedders and the fixed position embedding."""
        if hidden_size % num_heads:
            raise ValueError(f"num_heads: expected a divisor of hidden_size={hidden_size}, got {num_heads}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.grid_size = self.x_embedder.grid_size[0]
        self.register_buffer("pos_embed", sincos_2d_pos_embed(hidden_size, self.grid_size).unsqueeze(0))

    def reset_pos_embed(self) -> None:
        """Recompute the fixed position embedding (e.g. after ``to_empty`` from the meta device)."""
        with torch.no_grad():
            pos = sincos_2d_pos_embed(self.hidden_size, self.grid_size, device=self.pos_embed.device)
            self.pos_embed.copy_(pos.unsqueeze(0))

    def init_embedders_and_zero_heads(self) -> None:
        """Xavier patch weights, N(0, 0.02) label table and time MLP; every modulation head and the final linear
        zero (adaLN-Zero), so a fresh model outputs exactly zero."""
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs -> (tokens [B, L, hidden], conditioning c [B, hidden]); the part of forward before the blocks."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.x_embedder.img_size:
            raise ValueError(
                f"x: expected [B, {self.in_channels}, {self.input_size}, {self.input_size}], got {tuple(x.shape)}"
            )
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t: expected [B={x.shape[0]}], got {tuple(t.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected [B={x.shape[0]}] class labels, got {tuple(y.shape)}")
        # Inputs are cast to the weights' dtype, so a bf16 model runs without autocast.
        tokens = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, c
