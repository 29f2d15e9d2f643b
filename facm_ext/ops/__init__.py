"""The fused JVP ops. Each returns ``(primal_out, tangent_out)``; tangent arguments may be None (zero).

Each op is a torch custom op (``torch.ops.facm_ext.<name>``) with a fake implementation for torch.compile and a
backward for its primal output; the tangent output carries no graph. Plain-PyTorch references of the primal
functions are in :mod:`facm_ext.reference` (one module per family).

The op modules load lazily (the attention op imports Triton), so ``import facm_ext.ops`` stays cheap.
"""

from __future__ import annotations

import importlib

_OP_MODULES = {
    "layer_norm_jvp": "norms",
    "rms_norm_jvp": "norms",
    "modulate_jvp": "norms",
    "adaln_jvp": "norms",
    "gated_residual_jvp": "pointwise",
    "gelu_jvp": "pointwise",
    "silu_jvp": "pointwise",
    "swiglu_jvp": "pointwise",
    "rope_jvp": "rope",
    "rms_norm_rope_jvp": "rms_norm_rope",
    "attention_jvp": "attention",
    "linear_jvp": "linear",
    "mlp_jvp": "mlp",
}

__all__ = sorted(_OP_MODULES)


def __getattr__(name: str):
    if name in _OP_MODULES:
        return getattr(importlib.import_module(f"facm_ext.ops.{_OP_MODULES[name]}"), name)
    raise AttributeError(f"module 'facm_ext.ops' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_OP_MODULES))


def load_all() -> None:
    """Import every op module (registers all custom ops and their OpInfo entries)."""
    for module in sorted(set(_OP_MODULES.values())):
        importlib.import_module(f"facm_ext.ops.{module}")
