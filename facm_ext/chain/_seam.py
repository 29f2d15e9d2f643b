"""The per-block JVP function the chain runs inside each gathered block, and the tangent bookkeeping around it.

``block_jvp(fn, primals, tangents)`` is facm_ext's fused transform (``facm_ext.jvp``) when it is importable, and
``torch.func.jvp`` otherwise (``FACM_EXT_CHAIN_SEAM=torch_func`` forces the latter). Both are called on plain
tensors only: the chain has already run FSDP's bookkeeping for the block, so no FSDP hook ever sees a functorch
wrapper or a dual tensor (the reason ``torch.func.jvp`` through FSDP2 fails on torch 2.11).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree


def _transform():
    """The facm_ext.jvp package if it provides a usable ``jvp``, else None."""
    if os.environ.get("FACM_EXT_CHAIN_SEAM", "").strip().lower() == "torch_func":
        return None
    try:
        module = importlib.import_module("facm_ext.jvp")
    except ImportError:
        return None
    jvp = getattr(module, "jvp", None)
    return module if callable(jvp) else None


def seam_name() -> str:
    return "facm_ext.jvp" if _transform() is not None else "torch.func.jvp"


def block_jvp(fn: Callable, primals: Sequence[Any], tangents: Sequence[torch.Tensor | None]):
    """JVP of ``fn(*primals)``; tangents entries may be None (no tangent: the primal is held constant).

    Returns ``(output, output_tangent)`` with the output tangent a pytree of tensors (zeros where the output does
    not depend on any tangent), never carrying an autograd graph.
    """
    primals = tuple(primals)
    live = [i for i, t in enumerate(tangents) if t is not None]
    if not live:
        output = fn(*primals)
        return output, pytree.tree_map(_zero_tangent_like, output)

    def fn_of_live(*live_primals):
        full = list(primals)
        for index, value in zip(live, live_primals):
            full[index] = value
        return fn(*full)

    live_primals = tuple(primals[i] for i in live)
    live_tangents = tuple(tangents[i] for i in live)
    transform = _transform()
    if transform is not None:
        output, output_tangent = transform.jvp(fn_of_live, live_primals, live_tangents)
    else:
        # Only the math SDPA backend has a forward-mode rule (flash / memory-efficient / cuDNN raise).
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            output, output_tangent = torch.func.jvp(fn_of_live, live_primals, live_tangents)
    output_tangent = _fill_tangent(output, output_tangent)
    return pytree.tree_map(_unalias, output), output_tangent


def _unalias(value):
    """The tensor itself instead of a whole-tensor alias of it (what a JVP transform hands back).

    FSDP2 hooks pre-backward on a unit's outputs and warns for views, since an in-place update of a view would
    drop the hook; an alias covering all of its base is replaced by the base, which has the same values and
    autograd history.
    """
    if not isinstance(value, torch.Tensor):
        return value
    base = value._base
    if (base is not None and type(base) is torch.Tensor and base.shape == value.shape and base.dtype == value.dtype
            and base.stride() == value.stride() and base.storage_offset() == value.storage_offset()):
        return base
    return value


def _zero_tangent_like(value):
    if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
        return torch.zeros_like(value).detach()
    return None


def _fill_tangent(output, output_tangent):
    out_leaves, out_spec = pytree.tree_flatten(output)
    if output_tangent is None:
        tan_leaves = [None] * len(out_leaves)
    else:
        tan_leaves, tan_spec = pytree.tree_flatten(output_tangent)
        if tan_spec != out_spec:
            raise RuntimeError(f"facm_ext.chain: the block JVP returned a tangent of structure {tan_spec} for an "
                               f"output of structure {out_spec}")
    filled = []
    for value, tangent in zip(out_leaves, tan_leaves):
        if tangent is None:
            filled.append(_zero_tangent_like(value))
        else:
            filled.append(tangent.detach() if isinstance(tangent, torch.Tensor) else tangent)
    return pytree.tree_unflatten(filled, out_spec)


def match_tangent(tangent: torch.Tensor | None, primal: Any) -> torch.Tensor | None:
    """The tangent in the primal's dtype and device (after FSDP cast or moved the primal)."""
    if tangent is None or not isinstance(primal, torch.Tensor):
        return tangent
    if tangent.dtype != primal.dtype or tangent.device != primal.device:
        if primal.is_floating_point() or primal.is_complex():
            return tangent.to(device=primal.device, dtype=primal.dtype)
        return None
    return tangent
