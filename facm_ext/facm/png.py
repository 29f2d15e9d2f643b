"""Minimal PNG writing (zlib + struct, no imaging dependency) for sample grids."""

from __future__ import annotations

import os
import struct
import zlib

import torch


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of an 8-bit image: ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) uint8 tensor."""
    if image.dtype != torch.uint8 or image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[2] != 3):
        raise ValueError(f"image: expected a uint8 [H, W] or [H, W, 3] tensor, got {image.dtype} "
                         f"{tuple(image.shape)}")
    height, width = image.shape[:2]
    color_type = 0 if image.dim() == 2 else 2
    rows = image.reshape(height, -1).cpu()
    raw = b"".join(b"\x00" + bytes(rows[i].tolist()) for i in range(height))  # filter 0 (None) per row
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + \
        _chunk(b"IEND", b"")


def image_grid(images: torch.Tensor, *, nrow: int, value_range=(-1.0, 1.0), scale: int = 4,
               padding: int = 1) -> torch.Tensor:
    """Tile ``images`` ``[N, C, H, W]`` (C = 1 or 3, values in ``value_range``) into a uint8 grid of ``nrow``
    images per row, each upscaled ``scale`` times (nearest), with ``padding`` pixels of mid-gray between tiles.
    Returns ``[H', W']`` (C = 1) or ``[H', W', 3]``."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected [N, 1 or 3, H, W], got {tuple(images.shape)}")
    low, high = value_range
    x = ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 0.5)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    grid = (grid * 255).round().to(torch.uint8)
    return grid[0] if c == 1 else grid.permute(1, 2, 0).contiguous()


def write_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """Write a uint8 ``[H, W]`` or ``[H, W, 3]`` image as a PNG file."""
    with open(path, "wb") as f:
        f.write(encode_png(image))
