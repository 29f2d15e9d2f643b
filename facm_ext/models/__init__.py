"""Reference diffusion transformers in plain PyTorch (no JVP code), with the official parameter names.

- :class:`LightningDiT` / :func:`LightningDiT_XL_1` (hustvl/LightningDiT): the FACM teacher and student.
- :class:`DiT` / :func:`DiT_XL_2` (facebookresearch/DiT).
- :class:`WanModel` / :class:`WanBlock` (Wan-Video/Wan2.2): per-token fp32 modulation, 3D RoPE, cross-attention,
  key-length masking; :func:`wan_small` (tests) and ``Wan22_A14B_config`` (full-size shapes).
- :func:`load_lightningdit_checkpoint`, :func:`load_dit_checkpoint`, :func:`load_checkpoint`: official files.

The plain models are the references the fused JVP is tested against. ``torch.func.jvp`` through them needs the
math SDPA backend on CPU (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): the CPU flash kernel has no
forward-AD formula.
"""

from __future__ import annotations

from ._layers import RMSNorm, modulate
from .checkpoints import load_checkpoint, load_dit_checkpoint, load_lightningdit_checkpoint
from .dit import DiT, DiT_B_2, DiT_XL_2, DiTBlock
from .wan import (
    InterleavedRoPE,
    KeyLengthAttention,
    Wan22_A14B_config,
    WanAttentionBlock,
    WanBlock,
    WanCrossAttention,
    WanHead,
    WanLayerNorm,
    WanModel,
    WanSelfAttention,
    wan_rope_tables,
    wan_small,
)
from .lightningdit import (
    LightningDiT,
    LightningDiT_B_1,
    LightningDiT_XL_1,
    LightningDiT_XL_2,
    LightningDiTBlock,
    SwiGLUFFN,
    VisionRotaryEmbedding2D,
    rope_2d_tables,
)

__all__ = [
    "DiT",
    "DiTBlock",
    "DiT_B_2",
    "DiT_XL_2",
    "InterleavedRoPE",
    "KeyLengthAttention",
    "LightningDiT",
    "LightningDiTBlock",
    "LightningDiT_B_1",
    "LightningDiT_XL_1",
    "LightningDiT_XL_2",
    "RMSNorm",
    "SwiGLUFFN",
    "VisionRotaryEmbedding2D",
    "Wan22_A14B_config",
    "WanAttentionBlock",
    "WanBlock",
    "WanCrossAttention",
    "WanHead",
    "WanLayerNorm",
    "WanModel",
    "WanSelfAttention",
    "load_checkpoint",
    "load_dit_checkpoint",
    "load_lightningdit_checkpoint",
    "modulate",
    "rope_2d_tables",
    "wan_rope_tables",
    "wan_small",
]
