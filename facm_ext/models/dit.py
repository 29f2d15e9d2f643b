"""DiT (facebookresearch/DiT, ``models.py``) in plain PyTorch, with the official parameter names.

DiT-XL/2 on SD-VAE latents [B, 4, 32, 32]: patch 2 -> 256 tokens, hidden 1152, 28 blocks, 16 heads of 72
channels. Each block: LayerNorm (no affine, eps 1e-6) -> adaLN modulate -> attention (fused qkv with bias, SDPA,
no qk-norm, no RoPE) -> gated residual; LayerNorm -> modulate -> GELU(tanh) MLP (fc1 1152 -> 4608, fc2) -> gated
residual. adaLN-Zero with 6 vectors per block; fixed 2D sin-cos position embedding.

Differences from the official module, on purpose: no label dropout inside forward (pass ``y == num_classes`` for
the null class), the label table always has ``num_classes + 1`` rows, ``learn_sigma`` defaults to False (the
released DiT-XL-2 checkpoints use ``learn_sigma=True``: construct with it to load them), ``pos_embed`` is a
persistent buffer instead of a frozen Parameter (same state-dict key), and the timm ``Attention``/``Mlp``/
``PatchEmbed`` are replaced by local modules with the same attribute names (no timm dependency).
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import (
    FeedForwardGELU,
    ImageDiTMixin,
    basic_init_,
    modulate,
    silu_linear,
    unpatchify,
)
from .lightningdit import Attention


class DiTBlock(nn.Module):
    """One DiT block with adaLN-Zero conditioning.

    forward(x [B, L, hidden], c [B, hidden]) -> [B, L, hidden].
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=False)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForwardGELU(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = silu_linear(hidden_size, 6 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiTFinalLayer(nn.Module):
    """``norm_final`` (LayerNorm, no affine) -> modulate -> ``linear`` to patch pixels.

    forward(x [B, L, hidden], c [B, hidden]) -> [B, L, patch_size**2 * out_channels].
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = silu_linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(ImageDiTMixin, nn.Module):
    """DiT: class-conditional latent diffusion transformer.

    forward(x [B, in_channels, input_size, input_size] float, t [B] float (raw, no x1000), y [B] long in
    [0, num_classes], num_classes = null class) -> [B, out_channels, input_size, input_size], out_channels =
    2 * in_channels with ``learn_sigma`` (as officially, both halves are returned), else in_channels.
    ``model.blocks`` is the nn.ModuleList of :class:`DiTBlock`, each called as ``block(x, c)``.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
    ):
        super().__init__()
        self.build_embedding(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                             hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes,
                             learn_sigma=learn_sigma)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = DiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def reset_buffers(self) -> None:
        """Recompute the fixed position embedding (e.g. after ``to_empty`` from the meta device)."""
        self.reset_pos_embed()

    def initialize_weights(self) -> None:
        """The official initialization (Xavier Linear/patch weights, N(0, 0.02) label table and time MLP,
        adaLN-Zero: modulation heads and the final linear zero, so a fresh model outputs exactly zero)."""
        self.apply(basic_init_)
        self.reset_buffers()
        self.init_embedders_and_zero_heads()

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(tokens [B, L, hidden], c [B, hidden]) -> [B, out_channels, H, W]; the part after the blocks."""
        grid = self.grid_size
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.out_channels, grid, grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.head(tokens, c)


def DiT_XL_2(**kwargs) -> DiT:
    """DiT-XL/2: depth 28, hidden 1152, 16 heads (head_dim 72), patch 2; ~675M parameters."""
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def DiT_B_2(**kwargs) -> DiT:
    """DiT-B/2: depth 12, hidden 768, 12 heads (head_dim 64), patch 2."""
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
