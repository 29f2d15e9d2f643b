"""Wan 2.2 text-to-video transformer (Wan-Video/Wan2.2, ``wan/modules/model.py``) in plain PyTorch.

A block (:class:`WanBlock`, official name ``WanAttentionBlock``): LayerNorm (no affine, eps 1e-6, float32) ->
per-token modulation -> self-attention (q/k/v/o Linear, RMSNorm over all ``dim`` channels on q and k before the
head split, 3D RoPE on complex (interleaved) pairs, key-length masking of padded tail tokens) -> gated residual;
LayerNorm with affine (``norm3``) -> cross-attention to the text context (K, V from the context only) -> ungated
residual; LayerNorm -> modulation -> FFN (Linear, GELU(tanh), Linear) -> gated residual. The modulation is per
token and float32: ``e [B, L, 6, dim]`` plus the block's ``modulation [1, 6, dim]``, chunked into six strided
[B, L, dim] views (token stride 6*dim). The residual stream is float32; the Linear layers run in the weights'
dtype (inputs are cast to it, which is what the official autocast does).

Interface (chosen for this package; the official forward takes lists of differently sized videos):
``WanModel.forward(x [B, in_dim, F, H, W], t [B] or per-token [B, L], context [B, text_len, text_dim],
seq_len=None, context_lens=None) -> [B, out_dim, F, H, W]``: one latent size per batch; ``seq_len`` pads the
token sequence with zero tokens up to that length (as the official ``seq_len``), and the padded tail is masked
out as keys of self-attention (the padded tokens get identity RoPE, as officially). Blocks work on tokens:
``block(x, e, seq_lens, rope_cos, rope_sin, context, context_lens)``; :meth:`WanModel.prepare` returns the block
arguments so a runtime can drive ``model.blocks`` itself.

Parameter names match the official module, so its state dict loads with ``load_state_dict`` (the official RoPE
``freqs`` is not a buffer there and is recomputed here per forward, so there are no extra keys).

No JVP code here: facm_ext.jvp recognizes these modules and functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import RMSNorm
from .lightningdit import rotate_half_interleaved

#: Wan 2.2 A14B (each of the two text-to-video experts): 40 blocks, dim 5120, 40 heads of 128, FFN 13824.
Wan22_A14B_config = dict(
    patch_size=(1, 2, 2),
    text_len=512,
    in_dim=16,
    dim=5120,
    ffn_dim=13824,
    freq_dim=256,
    text_dim=4096,
    out_dim=16,
    num_heads=40,
    num_layers=40,
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
)


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (float64 references stay exact)."""
    return torch.promote_types(dtype, torch.float32)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (float64 for float64 input) and cast back to the input dtype (official
    ``WanLayerNorm``).

    forward(x [..., dim]) -> [..., dim] in x's dtype. No affine by default (``norm3`` has one).
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(_wide_dtype(x.dtype))
        # The affine parameters join the float32 computation (bf16 weights would otherwise mismatch the input).
        weight = None if self.weight is None else self.weight.to(wide.dtype)
        bias = None if self.bias is None else self.bias.to(wide.dtype)
        return F.layer_norm(wide, self.normalized_shape, weight, bias, self.eps).type_as(x)


class InterleavedRoPE(nn.Module):
    """Rotary embedding on interleaved (complex) pairs with caller-supplied tables; no parameters.

    forward(x [B, H, L, D], cos [L, D], sin [L, D]) -> [B, H, L, D] in x's dtype, computed in at least float32:
    ``x * cos + rotate_half_interleaved(x) * sin`` (pair (a, b) -> (a cos - b sin, b cos + a sin), i.e. the complex
    product ``(a + ib) * e^{i angle}`` of the official ``rope_apply``).
    """

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        wide = x.to(_wide_dtype(x.dtype))
        return (wide * cos + rotate_half_interleaved(wide) * sin).type_as(x)


class KeyLengthAttention(nn.Module):
    """Scaled dot-product attention where keys at index >= ``key_lengths[b]`` are ignored; no parameters.

    forward(q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, D], key_lengths [B] long or None (all keys valid))
    -> [B, H, Lq, D]. Every ``key_lengths[b]`` must be >= 1 (a row with no valid key has no softmax).
    """

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if key_lengths is None:
            return F.scaled_dot_product_attention(q, k, v)
        valid = torch.arange(k.shape[-2], device=k.device)[None, :] < key_lengths.to(k.device)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])


def wan_rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (frames, height, width) for a head: 128 -> (22, 21, 21), as official Wan."""
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even number, got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def wan_rope_tables(
    head_dim: int, grid: tuple[int, int, int], seq_len: int | None = None, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan 3D RoPE tables for a (frames, height, width) token grid -> (cos, sin), each [seq_len, head_dim] float32.

    Tokens are in (f, h, w) row-major order. Pair i = channels (2i, 2i+1); the first ``split[0]`` pairs rotate with
    the frame index, the next ``split[1]`` with the row, the last ``split[2]`` with the column; pair j of an axis
    with n pairs has frequency theta^(-j / n). Tokens past f*h*w (padding up to ``seq_len``) get cos 1, sin 0.
    """
    frames, height, width = grid
    grid_tokens = frames * height * width
    seq_len = grid_tokens if seq_len is None else seq_len
    if seq_len < grid_tokens:
        raise ValueError(f"seq_len: expected >= {grid_tokens} tokens of the grid {grid}, got {seq_len}")
    angles_per_axis = []
    for size, pairs in zip(grid, wan_rope_pair_split(head_dim)):
        freqs = 1.0 / theta ** (torch.arange(pairs, dtype=torch.float64, device=device) / pairs)
        angles_per_axis.append(torch.arange(size, dtype=torch.float64, device=device)[:, None] * freqs[None])
    angle_f, angle_h, angle_w = angles_per_axis
    angles = torch.cat(
        [
            angle_f[:, None, None, :].expand(frames, height, width, -1),
            angle_h[None, :, None, :].expand(frames, height, width, -1),
            angle_w[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(grid_tokens, head_dim // 2)
    angles = angles.repeat_interleave(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if seq_len > grid_tokens:
        pad = seq_len - grid_tokens
        cos = torch.cat([cos, cos.new_ones(pad, head_dim)])
        sin = torch.cat([sin, sin.new_zeros(pad, head_dim)])
    return cos.to(torch.float32), sin.to(torch.float32)


class WanSelfAttention(nn.Module):
    """Self-attention: ``q``/``k``/``v``/``o`` Linear, ``norm_q``/``norm_k`` RMSNorm over all ``dim`` channels
    (before the head split), interleaved 3D RoPE, key-length masking.

    forward(x [B, L, dim], seq_lens [B] long | None, rope_cos [L, head_dim] | None, rope_sin [L, head_dim] | None)
    -> [B, L, dim] in the weights' dtype.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim}, got {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.rope = InterleavedRoPE()
        self.attention = KeyLengthAttention()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, dim] -> [B, heads, L, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        seq_lens: torch.Tensor | None,
        rope_cos: torch.Tensor | None,
        rope_sin: torch.Tensor | None,
    ) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(x)))
        v = self._heads(self.v(x))
        if rope_cos is not None:
            q = self.rope(q, rope_cos, rope_sin)
            k = self.rope(k, rope_cos, rope_sin)
        out = self.attention(q, k, v, seq_lens)
        return self.o(out.transpose(1, 2).flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Cross-attention: queries from the video tokens, keys and values from the text context (no RoPE).

    forward(x [B, L, dim], context [B, Lc, dim], context_lens [B] long | None) -> [B, L, dim].
    """

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_lens: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        out = self.attention(q, k, v, context_lens)
        return self.o(out.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    """One Wan 2.2 transformer block (official ``WanAttentionBlock``).

    forward(x [B, L, dim] float32 residual stream, e [B, L, 6, dim] float32 per-token modulation, seq_lens [B]
    long | None (valid self-attention keys per sample), rope_cos/rope_sin [L, head_dim] float32 | None,
    context [B, Lc, dim], context_lens [B] long | None) -> [B, L, dim] float32.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        seq_lens: torch.Tensor | None,
        rope_cos: torch.Tensor | None,
        rope_sin: torch.Tensor | None,
        context: torch.Tensor,
        context_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        compute_dtype = self.self_attn.q.weight.dtype
        # Six [B, L, 1, dim] chunks of one [B, L, 6, dim] tensor; squeeze(2) leaves strided [B, L, dim] views.
        mods = [m.squeeze(2) for m in (self.modulation.unsqueeze(0) + e).chunk(6, dim=2)]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
        y = self.self_attn((self.norm1(x) * (1 + scale_sa) + shift_sa).to(compute_dtype), seq_lens, rope_cos, rope_sin)
        x = x + y * gate_sa
        x = x + self.cross_attn(self.norm3(x).to(compute_dtype), context, context_lens)
        y = self.ffn((self.norm2(x) * (1 + scale_ff) + shift_ff).to(compute_dtype))
        return x + y * gate_ff


#: The official class name.
WanAttentionBlock = WanBlock


class WanHead(nn.Module):
    """Output head (official ``Head``): LayerNorm -> per-token modulation (2 vectors) -> Linear to patch voxels.

    forward(x [B, L, dim] float32, e [B, L, dim] float32) -> [B, L, prod(patch_size) * out_dim].
    """

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = tuple(patch_size)
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = [m.squeeze(2) for m in (self.modulation.unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)]
        return self.head((self.norm(x) * (1 + scale) + shift).to(self.head.weight.dtype))


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's time features: position [N] -> [N, dim] float64 ``[cos(p w_i), sin(p w_i)]``, w_i = 10000^(-i/half)."""
    if dim % 2:
        raise ValueError(f"dim: expected an even number, got {dim}")
    half = dim // 2
    position = position.to(torch.float64)
    exponents = torch.arange(half, device=position.device).to(position).div(half)
    sinusoid = torch.outer(position, torch.pow(10000, -exponents))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class WanModel(nn.Module):
    """Wan 2.2 text-to-video diffusion transformer (see the module docstring for the interface).

    forward(x [B, in_dim, F, H, W] latents, t [B] or [B, L] float (raw timesteps, per token if 2D; L = padded
    token count), context [B, text_len, text_dim] text embeddings (zero-padded as officially),
    seq_len: int | None, context_lens [B] long | None) -> [B, out_dim, F, H, W] in the head's dtype.
    ``model.blocks`` is the nn.ModuleList of :class:`WanBlock`.
    """

    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        text_len: int = 512,
        in_dim: int = 16,
        dim: int = 2048,
        ffn_dim: int = 8192,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 16,
        num_layers: int = 32,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"num_heads: expected a divisor of dim={dim} leaving an even head_dim, got {num_heads}")
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_layers = num_layers
        self.eps = eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            [WanBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps) for _ in range(num_layers)]
        )
        self.head = WanHead(dim, out_dim, self.patch_size, eps)
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialization: Xavier Linear/patch weights with zero biases, N(0, 0.02) text and time
        embedding weights, zero output Linear weight. (The modulation tables keep their randn/sqrt(dim) init.)"""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for module in list(self.text_embedding.modules()) + list(self.time_embedding.modules()):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def grid_of(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Token grid (frames, height, width) of latents x [B, in_dim, F, H, W]."""
        return tuple(size // p for size, p in zip(x.shape[2:], self.patch_size))

    def prepare(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        seq_len: int | None = None,
        context_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Everything before the blocks -> (tokens [B, L, dim] float32, e [B, L, dim] float32 (for the head),
        block_kwargs: dict(e [B, L, 6, dim] float32, seq_lens, rope_cos, rope_sin, context [B, Lc, dim],
        context_lens)). ``seq_lens`` is None when there is no padding."""
        if x.dim() != 5 or x.shape[1] != self.in_dim or any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(
                f"x: expected [B, {self.in_dim}, F, H, W] with (F, H, W) divisible by {self.patch_size}, "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != self.text_dim:
            raise ValueError(f"context: expected [B={batch}, Lc, {self.text_dim}], got {tuple(context.shape)}")
        grid = self.grid_of(x)
        grid_tokens = math.prod(grid)
        seq_len = grid_tokens if seq_len is None else int(seq_len)
        if seq_len < grid_tokens:
            raise ValueError(f"seq_len: expected >= {grid_tokens} (the latent's token count), got {seq_len}")
        if t.dim() == 1 and t.shape[0] == batch:
            t = t[:, None].expand(batch, seq_len)
        elif not (t.dim() == 2 and tuple(t.shape) == (batch, seq_len)):
            raise ValueError(f"t: expected [B={batch}] or per-token [B, {seq_len}], got {tuple(t.shape)}")

        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = tokens.to(_wide_dtype(tokens.dtype))
        seq_lens = None
        if seq_len > grid_tokens:
            tokens = F.pad(tokens, (0, 0, 0, seq_len - grid_tokens))
            seq_lens = torch.full((batch,), grid_tokens, dtype=torch.long, device=x.device)

        time_dtype = self.time_embedding[0].weight.dtype
        features = sinusoidal_embedding_1d(self.freq_dim, t.flatten()).unflatten(0, (batch, seq_len))
        e = self.time_embedding(features.to(time_dtype))
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        e, e0 = e.to(_wide_dtype(e.dtype)), e0.to(_wide_dtype(e0.dtype))

        context = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        rope_cos, rope_sin = wan_rope_tables(self.head_dim, grid, seq_len, device=x.device)
        block_kwargs = dict(
            e=e0, seq_lens=seq_lens, rope_cos=rope_cos, rope_sin=rope_sin, context=context, context_lens=context_lens
        )
        return tokens, e, block_kwargs

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens [B, >= f*h*w, prod(patch) * out_dim] -> [B, out_dim, f*pt, h*ph, w*pw] (padding dropped)."""
        batch = tokens.shape[0]
        frames, height, width = grid
        pt, ph, pw = self.patch_size
        u = tokens[:, : frames * height * width].reshape(batch, frames, height, width, pt, ph, pw, self.out_dim)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(batch, self.out_dim, frames * pt, height * ph, width * pw)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        seq_len: int | None = None,
        context_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens, e, block_kwargs = self.prepare(x, t, context, seq_len, context_lens)
        for block in self.blocks:
            tokens = block(tokens, **block_kwargs)
        return self.unpatchify(self.head(tokens, e), self.grid_of(x))


def wan_small(**overrides) -> WanModel:
    """A tiny Wan for tests: 2 blocks, dim 64, 2 heads of 32 (RoPE pairs 6/5/5), FFN 128, 8 text tokens of 32."""
    cfg = dict(
        patch_size=(1, 2, 2),
        text_len=8,
        in_dim=4,
        dim=64,
        ffn_dim=128,
        freq_dim=32,
        text_dim=32,
        out_dim=4,
        num_heads=2,
        num_layers=2,
    )
    cfg.update(overrides)
    return WanModel(**cfg)
