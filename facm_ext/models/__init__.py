"""Reference diffusion transformers in plain PyTorch (no JVP code), with the official parameter names.

- :class:`LightningDiT` / :func:`LightningDiT_XL_1` (hustvl/LightningDiT): the FACM teacher and student.
"""

from __future__ import annotations

from ._layers import RMSNorm, modulate
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
    "LightningDiT",
    "LightningDiTBlock",
    "LightningDiT_B_1",
    "LightningDiT_XL_1",
    "LightningDiT_XL_2",
    "RMSNorm",
    "SwiGLUFFN",
    "VisionRotaryEmbedding2D",
    "modulate",
    "rope_2d_tables",
]
