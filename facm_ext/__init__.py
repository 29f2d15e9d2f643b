"""facm_ext: fused forward-mode JVP kernels and a streamed Chain-JVP runtime for consistency-model training.

Public entry points (loaded lazily, so ``import facm_ext`` is cheap and never initializes CUDA):

- ``facm_ext.jvp(func, primals, tangents)``: drop-in for ``torch.func.jvp`` that runs recognized ops fused.
- ``facm_ext.register_jvp_rule(ModuleType, rule)``: a fused rule for a module class of your own.
- ``facm_ext.ops``: the fused JVP ops, each returning ``(primal_out, tangent_out)``.
- ``facm_ext.chain``: the streamed Chain-JVP runtime over FSDP2.
- ``facm_ext.facm``: the FACM objective and samplers; ``facm_ext.models``: reference DiTs.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "jvp", "chain", "facm", "models", "info")
_LAZY_ATTRS = {"register_jvp_rule": ("facm_ext.jvp", "register_jvp_rule")}


def __getattr__(name: str):
    # facm_ext.jvp is the transform's package; the package module itself is callable (facm_ext/jvp/__init__.py),
    # so facm_ext.jvp(func, primals, tangents) works however the package was first imported.
    if name in _LAZY_ATTRS:
        module_name, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(module_name), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"facm_ext.{name}")
    raise AttributeError(f"module 'facm_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_LAZY_ATTRS))
