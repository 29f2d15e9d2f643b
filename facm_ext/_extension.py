"""Loading of the compiled module facm_ext._C, done once and lazily.

Importing facm_ext never imports _C and never touches CUDA. The first op call that could use a CUDA kernel calls
:func:`load`; if the module is missing or broken the op falls back to its Triton or plain-PyTorch path and
``python -m facm_ext.info`` explains why.
"""

from __future__ import annotations

import importlib
import re
import threading

_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None


def load() -> bool:
    """Import facm_ext._C (registering its torch.ops.facm_ext kernels). Returns True when it is available."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                import torch  # noqa: F401  (the extension links against libtorch/libc10, loaded by torch)

                importlib.import_module("facm_ext._C")
                _loaded = True
            except ImportError as exc:  # missing or unbuildable extension: the ops still work without it
                _error = f"{type(exc).__name__}: {exc}"
                _loaded = False
    return _loaded


def load_error() -> str | None:
    """Why facm_ext._C could not be imported, or None."""
    load()
    return _error


def build_info() -> dict:
    """{'extension': bool, 'cuda': bool, 'archs': [str], 'error': str | None}."""
    if not load():
        return {"extension": False, "cuda": False, "archs": [], "error": _error}
    import torch

    fields = dict(item.split("=", 1) for item in torch.ops.facm_ext.build_info().split(";", 1))
    archs = [a for a in re.split(r"[;, ]+", fields.get("archs", "")) if a]
    return {"extension": True, "cuda": fields.get("cuda") == "1", "archs": archs, "error": None}


_present_kernels: set = set()


def has_kernel(name: str) -> bool:
    """True when the compiled kernel op torch.ops.facm_ext.<name> exists (CUDA build loaded)."""
    # Asked by every op call on CUDA tensors. A registered op stays registered, so a kernel found once is
    # remembered; a missing one is looked up again (a library loaded later may still register it).
    if name in _present_kernels:
        return True
    if not load():
        return False
    import torch

    if hasattr(torch.ops.facm_ext, name):
        _present_kernels.add(name)
        return True
    return False
