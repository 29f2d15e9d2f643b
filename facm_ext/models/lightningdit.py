"""LightningDiT (hustvl/LightningDiT, ``models/lightningdit.py``) in plain PyTorch: the FACM teacher and student.

LightningDiT-XL/1 on VA-VAE latents [B, 32, 16, 16]: patch 1 -> 256 tokens, hidden 1152, 28 blocks, 16 heads of
72 channels. Each block: RMSNorm (learned weight, float32 statistics) -> adaLN modulate -> attention (fused qkv
with bias, per-head qk RMSNorm(72), 2D RoPE, SDPA) -> gated residual; RMSNorm -> modulate -> SwiGLU FFN
(w12: 1152 -> 2*3072, silu(a) * b, w3: 3072 -> 1152) -> gated residual. adaLN-Zero with 6 vectors per block.

Parameter and buffer names match the official code, so an official checkpoint loads with ``load_state_dict``
(see :func:`facm_ext.models.checkpoints.load_lightningdit_checkpoint`). Differences from the official module, on
purpose: no ``torch.compile`` decorators, no activation checkpointing flag, no label dropout inside forward (the
caller passes ``y == num_classes`` for the null class), the label table always has ``num_classes + 1`` rows, and
``pos_embed`` is a (persistent) buffer instead of a frozen Parameter (same state-dict key). ``wo_shift`` is not
supported (the released models do not use it).

No JVP code here: facm_ext.jvp recognizes these modules and functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import (
    FeedForwardGELU,
    ImageDiTMixin,
    RMSNorm,
    basic_init_,
    modulate,
    silu_linear,
    unpatchify,
)


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation: channels (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...). x [..., D], D even."""
    pairs = x.unflatten(-1, (-1, 2))
    x_even, x_odd = pairs.unbind(-1)
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def rope_2d_tables(
    head_dim: int, grid_size: int, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-style 2D RoPE tables (LightningDiT's ``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)``).

    Returns (cos, sin), each [grid_size**2, head_dim] float32, tokens in row-major (h, w) order. Channels
    [0, head_dim/2) rotate with the row index h, channels [head_dim/2, head_dim) with the column index w; within
    each half, pair i = channels (2i, 2i+1) uses frequency theta^(-2i / (head_dim/2)) (each angle repeated twice,
    interleaved).
    """
    if head_dim % 4:
        raise ValueError(f"head_dim: expected a multiple of 4 for 2D interleaved RoPE, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64, device=device) / half)  # [half/2]
    positions = torch.arange(grid_size, dtype=torch.float64, device=device)
    angles = (positions[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [grid, half]
    rows = angles[:, None, :].expand(grid_size, grid_size, half)
    cols = angles[None, :, :].expand(grid_size, grid_size, half)
    table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    return table.cos().to(torch.float32), table.sin().to(torch.float32)


class VisionRotaryEmbedding2D(nn.Module):
    """2D rotary embedding with fixed tables (official attribute ``feat_rope``; buffers ``freqs_cos``,
    ``freqs_sin``, each [grid_size**2, head_dim]).

    forward(x [B, H, L, head_dim], L = grid_size**2) -> same shape: ``x * cos + rotate_half_interleaved(x) * sin``.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.grid_size = grid_size
        self.theta = theta
        cos, sin = rope_2d_tables(head_dim, grid_size, theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def reset_tables(self) -> None:
        """Recompute the tables in place (after ``to_empty`` from the meta device)."""
        cos, sin = rope_2d_tables(self.head_dim, self.grid_size, self.theta, device=self.freqs_cos.device)
        with torch.no_grad():
            self.freqs_cos.copy_(cos)
            self.freqs_sin.copy_(sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.freqs_cos + rotate_half_interleaved(x) * self.freqs_sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, grid_size={self.grid_size}, theta={self.theta}"


class Attention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` (with bias) -> optional per-head ``q_norm``/``k_norm`` -> optional
    RoPE -> ``F.scaled_dot_product_attention`` -> ``proj``.

    forward(x [B, L, dim], rope: VisionRotaryEmbedding2D | None) -> [B, L, dim]. q/k/v are [B, heads, L, head_dim].
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            # Official: RMSNorm(head_dim) with use_rmsnorm, else nn.LayerNorm(head_dim) (affine, eps 1e-5).
            self.q_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if use_rmsnorm else nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = nn.Identity()
            self.k_norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN: ``w12`` (in -> 2*hidden) -> chunk (a, b) -> silu(a) * b -> ``w3`` (hidden -> in).

    forward(x [..., in_features]) -> [..., in_features].
    """

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=True)
        self.w3 = nn.Linear(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """The official rule ``int(2/3 * int(hidden * mlp_ratio))``: 1152, ratio 4 -> 3072 (w12 out = 6144)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class LightningDiTBlock(nn.Module):
    """One LightningDiT block (adaLN-Zero, 6 modulation vectors: shift/scale/gate for attention and FFN).

    forward(x [B, L, hidden], c [B, hidden], feat_rope: VisionRotaryEmbedding2D | None) -> [B, L, hidden].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_qknorm: bool = False,
        use_swiglu: bool = False,
        use_rmsnorm: bool = False,
    ):
        super().__init__()
        if use_rmsnorm:
            self.norm1 = RMSNorm(hidden_size)
            self.norm2 = RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, swiglu_hidden_size(hidden_size, mlp_ratio))
        else:
            self.mlp = FeedForwardGELU(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = silu_linear(hidden_size, 6 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope: nn.Module | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """``norm_final`` -> modulate (shift, scale from ``adaLN_modulation``) -> ``linear`` to patch pixels.

    forward(x [B, L, hidden], c [B, hidden]) -> [B, L, patch_size**2 * out_channels].
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = False):
        super().__init__()
        if use_rmsnorm:
            self.norm_final = RMSNorm(hidden_size)
        else:
            self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = silu_linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(ImageDiTMixin, nn.Module):
    """LightningDiT: class-conditional latent diffusion transformer.

    forward(x [B, in_channels, input_size, input_size] float, t [B] float (raw, no x1000), y [B] long in
    [0, num_classes], num_classes = null class) -> [B, in_channels, input_size, input_size] (with
    ``learn_sigma`` the network predicts 2*in_channels channels and, as officially, forward returns the first
    half). ``model.blocks`` is the nn.ModuleList of :class:`LightningDiTBlock`, each called as
    ``block(x, c, model.feat_rope)``.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        use_qknorm: bool = True,
        use_rope: bool = True,
        use_swiglu: bool = True,
        use_rmsnorm: bool = True,
        learn_sigma: bool = False,
    ):
        super().__init__()
        self.build_embedding(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                             hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes,
                             learn_sigma=learn_sigma)
        self.use_rope = use_rope
        self.feat_rope = VisionRotaryEmbedding2D(hidden_size // num_heads, self.grid_size) if use_rope else None
        self.blocks = nn.ModuleList(
            [
                LightningDiTBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    use_qknorm=use_qknorm,
                    use_swiglu=use_swiglu,
                    use_rmsnorm=use_rmsnorm,
                )
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)
        self.initialize_weights()

    def reset_buffers(self) -> None:
        """Recompute the fixed buffers (position embedding, RoPE tables), e.g. after ``to_empty`` from meta."""
        self.reset_pos_embed()
        if self.feat_rope is not None:
            self.feat_rope.reset_tables()

    def initialize_weights(self) -> None:
        """The official initialization: Xavier Linear/patch weights, N(0, 0.02) label table and time MLP, and
        adaLN-Zero (every modulation head and the final linear zero), so a fresh model outputs exactly zero."""
        self.apply(basic_init_)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.reset_buffers()
        self.init_embedders_and_zero_heads()

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(tokens [B, L, hidden], c [B, hidden]) -> output [B, in_channels, H, W]; the part after the blocks."""
        grid = self.grid_size
        out = unpatchify(self.final_layer(tokens, c), self.patch_size, self.out_channels, grid, grid)
        if self.learn_sigma:
            out, _ = out.chunk(2, dim=1)
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c, self.feat_rope)
        return self.head(tokens, c)


def LightningDiT_XL_1(**kwargs) -> LightningDiT:
    """LightningDiT-XL/1: depth 28, hidden 1152, 16 heads (head_dim 72), patch 1; ~675M parameters."""
    return LightningDiT(depth=28, hidden_size=1152, patch_size=1, num_heads=16, **kwargs)


def LightningDiT_XL_2(**kwargs) -> LightningDiT:
    """LightningDiT-XL/2: as XL/1 with patch 2."""
    return LightningDiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def LightningDiT_B_1(**kwargs) -> LightningDiT:
    """LightningDiT-B/1: depth 12, hidden 768, 12 heads (head_dim 64), patch 1."""
    return LightningDiT(depth=12, hidden_size=768, patch_size=1, num_heads=12, **kwargs)
