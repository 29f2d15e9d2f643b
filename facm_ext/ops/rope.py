"""Rotary position embedding JVP: ``out = R(l) x`` and ``out' = R(l) x'`` (the angles depend on the position l
only, so the tangent gets the same rotation).

Accepted layouts:
- x, tx: ``[B, H, L, D]`` (``layout="BHLD"``, LightningDiT after its head transpose) or ``[B, L, H, D]``
  (``layout="BLHD"``, Wan). Any strides with a unit last-dim stride are read in place (others are copied).
  ``layout=None`` infers it from which of dims 1 and 2 has the tables' length L; when both do, pass it.
- cos, sin: ``[L, D]`` per channel (EVA/LightningDiT builds these with every pair's angle repeated; used exactly as
  given, channel by channel, like ``x * cos + rotate(x) * sin``) or ``[L, D/2]`` per pair (one angle per pair;
  Wan's complex ``freqs`` are ``cos + i sin`` of these). Any float dtype; the kernel reads them as fp32 (converted
  first when they are not).
- ``interleaved=True``: pairs are adjacent channels (2i, 2i+1) -- EVA-style 2D RoPE of LightningDiT and the complex
  pairs of Wan's 3D RoPE. ``interleaved=False``: pairs are (j, j + D/2), the ``rotate_half`` (GPT-NeoX) form.

Backends (chosen at run time inside the custom op ``torch.ops.facm_ext.rope_jvp``):
- ``cuda``: ``facm_ext::rope_jvp_cuda`` (csrc/rope) for fp32/fp16/bf16 CUDA x, one pass, 16-byte vectors when
  aligned. Dense x, x' (one memory order) take a flat form, one thread per 16-byte chunk reading its table chunk,
  when the order is ``[B, L, H, D]`` or the two tables take at most 4 MiB; otherwise a thread loads one position's
  table chunk once and rotates it into every head (a position's table row is then read once, not once per head).
- ``reference``: everything else (CPU, fp64, ``FACM_EXT_BACKEND=reference``): the pair formulas in PyTorch.
fp32 math, outputs contiguous in x's dtype and layout. Only the primal output is differentiable (w.r.t. x and the
tables); the tangent output carries no graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from facm_ext import _extension
from facm_ext.ops._common import (
    jvp_custom_op,
    OpInfo,
    check_same_device,
    check_tangent,
    check_tensor,
    register_op_info,
    use_cuda_kernel,
)

LAYOUTS = ("BHLD", "BLHD")

register_op_info(OpInfo(
    name="rope_jvp",
    backends={"cuda": "fp32/fp16/bf16 CUDA x (compiled kernel; tables read as fp32)",
              "reference": "CPU, fp64 or FACM_EXT_BACKEND=reference: the pair formulas in PyTorch"},
    kernel="rope_jvp_cuda",
    notes="x [B, H, L, D] or [B, L, H, D]; tables [L, D] or [L, D/2]; interleaved pairs or rotate_half",
))


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _split_pairs(t: torch.Tensor, interleaved: bool):
    """[..., D] -> (first, second) members of every pair, each [..., D/2]."""
    if interleaved:
        return t[..., 0::2], t[..., 1::2]
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def _merge_pairs(first: torch.Tensor, second: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Inverse of _split_pairs: two [..., D/2] -> [..., D] (contiguous)."""
    if interleaved:
        return torch.stack((first, second), dim=-1).flatten(-2)
    return torch.cat((first, second), dim=-1)


def _table_pairs(table: torch.Tensor, head_dim: int, interleaved: bool, layout: str, dtype: torch.dtype):
    """(angle term of the first member, of the second member) of every pair, broadcastable against x's pairs."""
    table = table.to(dtype)
    if layout == "BLHD":
        table = table.unsqueeze(-2)  # [L, 1, *]: broadcast over the heads
    if table.shape[-1] == head_dim:
        return _split_pairs(table, interleaved)
    return table, table


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, layout: str,
            dtype: torch.dtype) -> torch.Tensor:
    """R(l) x in `dtype`: per pair (x0, x1) -> (x0 c0 - x1 s0, x1 c1 + x0 s1)."""
    head_dim = x.shape[-1]
    c0, c1 = _table_pairs(cos, head_dim, interleaved, layout, dtype)
    s0, s1 = _table_pairs(sin, head_dim, interleaved, layout, dtype)
    x0, x1 = _split_pairs(x.to(dtype), interleaved)
    return _merge_pairs(x0 * c0 - x1 * s0, x1 * c1 + x0 * s1, interleaved)


def _kernel_fakes_registered() -> None:
    @torch.library.register_fake("facm_ext::rope_jvp_cuda")
    def _(x, tx, cos, sin, interleaved, layout):
        return x.new_empty(x.shape), x.new_empty(x.shape)  # contiguous


if _extension.has_kernel("rope_jvp_cuda"):
    _kernel_fakes_registered()


@jvp_custom_op("facm_ext::rope_jvp")
def _rope_jvp_op(x: torch.Tensor, tx: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda_kernel("rope_jvp_cuda", x, tx):
        return torch.ops.facm_ext.rope_jvp_cuda(x, tx, cos.float(), sin.float(), interleaved, layout)
    dtype = _compute_dtype(x, cos, sin)
    out = _rotate(x, cos, sin, interleaved, layout, dtype).to(x.dtype)
    if tx is None:
        tout = torch.zeros_like(x, memory_format=torch.contiguous_format)
    else:
        tout = _rotate(tx, cos, sin, interleaved, layout, dtype).to(x.dtype)
    return out.contiguous(), tout.contiguous()


@_rope_jvp_op.register_fake
def _(x, tx, cos, sin, interleaved, layout):
    return x.new_empty(x.shape), x.new_empty(x.shape)  # contiguous


def _rope_setup(ctx, inputs, output):
    x, _, cos, sin, interleaved, layout = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, cos, sin)
    ctx.interleaved, ctx.layout = interleaved, layout


def _rope_backward(ctx, grad, _grad_tangent):
    x, cos, sin = ctx.saved_tensors
    need_x, _, need_cos, need_sin, _, _ = ctx.needs_input_grad
    grad_x, grad_cos, grad_sin = rope_vjp(grad, x, cos, sin, ctx.interleaved, ctx.layout, need_x=need_x,
                                          need_cos=need_cos, need_sin=need_sin)
    return None if grad_x is None else grad_x.to(x.dtype), None, grad_cos, grad_sin, None, None


def rope_vjp(grad: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
             layout: str, *, need_x: bool = True, need_cos: bool = False, need_sin: bool = False):
    """Gradients of ``R(l) x`` given ``grad`` (x's shape): (R(l)^T grad in the compute dtype, or None; the cos and
    sin gradients in the tables' dtypes, the per-pair products summed over batch and heads, or None)."""
    dtype = _compute_dtype(x, cos, sin)
    head_dim = x.shape[-1]
    g0, g1 = _split_pairs(grad.to(dtype), interleaved)
    grad_x = grad_cos = grad_sin = None
    if need_x:
        c0, c1 = _table_pairs(cos, head_dim, interleaved, layout, dtype)
        s0, s1 = _table_pairs(sin, head_dim, interleaved, layout, dtype)
        grad_x = _merge_pairs(g0 * c0 + g1 * s1, g1 * c1 - g0 * s0, interleaved)
    if need_cos or need_sin:
        x0, x1 = _split_pairs(x.to(dtype), interleaved)
        reduce_dims = (0, 1) if layout == "BHLD" else (0, 2)

        def table_grad(first, second, like):
            first, second = first.sum(reduce_dims), second.sum(reduce_dims)  # [L, D/2] each
            if like.shape[-1] == head_dim:
                return _merge_pairs(first, second, interleaved).to(like.dtype)
            return (first + second).to(like.dtype)

        if need_cos:
            grad_cos = table_grad(g0 * x0, g1 * x1, cos)
        if need_sin:
            grad_sin = table_grad(-g0 * x1, g1 * x0, sin)
    return grad_x, grad_cos, grad_sin


_rope_jvp_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope_jvp(x: torch.Tensor, tx: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
             interleaved: bool = True, *, layout: Optional[str] = None):
    """Primal and tangent of rotary position embedding (see the module docstring for the conventions).

    Args:
        x: [B, H, L, D] or [B, L, H, D] (see ``layout``), D even; fp16/bf16/fp32/fp64; last dim unit-stride for
            the in-place read.
        tx: tangent of x (x's shape and dtype) or None (zero).
        cos, sin: [L, D] (per channel) or [L, D/2] (per pair), same shape, any float dtype (fp32 expected).
        interleaved: True for adjacent pairs (2i, 2i+1); False for the half-split (rotate_half) form.
        layout: "BHLD", "BLHD" or None (inferred from the table length; required when dims 1 and 2 both equal L).
    Returns:
        (out, tout): x's shape, dtype and layout, contiguous. out is differentiable w.r.t. x, cos and sin; tout
        carries no graph.
    """
    layout = check_rope_arguments(x, tx, cos, sin, layout)
    return _rope_jvp_op(x, tx, cos, sin, bool(interleaved), layout)


def check_rope_arguments(x: torch.Tensor, tx: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                         layout: Optional[str]) -> str:
    """Validate rope arguments (ValueError naming the argument); returns the layout, inferred when None."""
    check_tensor("x", x, ndim=4)
    check_tangent("tx", tx, "x", x)
    if tx is not None and tx.dtype != x.dtype:
        raise ValueError(f"tx: tangent dtype {tx.dtype} differs from the dtype {x.dtype} of its primal x")
    check_tensor("cos", cos, ndim=2)
    check_tensor("sin", sin, ndim=2)
    check_same_device("x", x, cos=cos, sin=sin)
    head_dim = x.shape[-1]
    if head_dim % 2 != 0:
        raise ValueError(f"x: head_dim (last dim) must be even, got {head_dim}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin: expected the shape {tuple(cos.shape)} of cos, got {tuple(sin.shape)}")
    if cos.shape[1] not in (head_dim, head_dim // 2):
        raise ValueError(f"cos: expected [L, {head_dim}] (per channel) or [L, {head_dim // 2}] (per pair), "
                         f"got {tuple(cos.shape)}")
    tokens = cos.shape[0]
    if layout is None:
        matches = [name for name, dim in (("BHLD", 2), ("BLHD", 1)) if x.shape[dim] == tokens]
        if len(matches) != 1:
            raise ValueError(f"layout: cannot infer the layout of x {tuple(x.shape)} from tables of length {tokens}"
                             f"; pass layout='BHLD' ([B, H, L, D]) or 'BLHD' ([B, L, H, D])")
        layout = matches[0]
    elif layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'BHLD', 'BLHD' or None, got {layout!r}")
    token_dim = 2 if layout == "BHLD" else 1
    if x.shape[token_dim] != tokens:
        raise ValueError(f"cos: has {tokens} rows but x {tuple(x.shape)} has {x.shape[token_dim]} positions "
                         f"(dim {token_dim} in layout {layout})")
    return layout
