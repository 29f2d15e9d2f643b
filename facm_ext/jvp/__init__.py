"""``facm_ext.jvp``: a drop-in for ``torch.func.jvp`` that runs recognized ops as fused primal+tangent kernels.

    out, tangent_out = facm_ext.jvp(func, primals, tangents)            # the package module is callable
    out, tangent_out, aux = facm_ext.jvp(func, primals, tangents, has_aux=True)
    out, tangent_out, report = facm_ext.jvp(func, primals, tangents, report=True)

Semantics (what consistency-model training needs): ``tangent_out`` is always detached; ``out`` keeps its autograd
graph when grad is enabled and its backward gives the parameter gradients of a plain forward of ``func``, saving
the same activations (the tangent pass saves nothing).

How: ``func`` runs on dual values (:class:`DualTensor`, a tensor subclass that IS the primal and carries its
tangent). Recognized functions and modules go to the fused ops of facm_ext.ops: F.linear, SDPA (also with a
boolean key-padding mask), F.layer_norm, F.rms_norm, F.gelu, F.silu (facm_ext/jvp/_rules.py); MLP, RMSNorm-like
and RoPE-like modules, DiT-style attention modules (their ops run on primal/tangent pairs, no dual per
intermediate), and whole adaLN-Zero and Wan blocks (norm+modulate and gated residuals fused), each verified
before use (facm_ext/jvp/_modules.py, _blocks.py); rules registered with :func:`register_jvp_rule`. Every other
op uses PyTorch's own forward-mode rule for that single op: closed forms for views, casts, sums, products and
common elementwise functions, ``torch.func.jvp`` of the op otherwise (facm_ext/jvp/_dual.py).
``report=True`` says which ran fused and which did not, and why a fused rule declined.

In-place ops on traced values are supported when the target carries the value (the tangent follows); writing a
traced value into an untraced tensor, ``out=``, and in-place updates of tensors that share memory with other
traced tensors raise :class:`JVPTransformError` rather than lose a tangent. Nested facm_ext.jvp calls are not
supported.

torch.compile: the transform is excluded from dynamo tracing (like ``torch.compiler.disable``): inside a compiled
function, a call of facm_ext.jvp is a graph break and runs eagerly, the fused ops being the compiled kernels of
facm_ext.ops; ``fullgraph=True`` around a facm_ext.jvp call therefore fails. Compile the surrounding step (loss,
optimizer) instead, or the model's non-JVP forwards. A compiled module called inside the transform
(``torch.compile(model)``, ``model.compile()``) runs its original module eagerly, with a note in the report.

Host overhead: the transform runs op by op from Python; where the GPU waits on the host (small per-GPU batches),
:func:`graph` captures facm_ext.jvp in a CUDA graph (no grad, or grad with the backward captured too) and
replays it (facm_ext/jvp/_graph.py).

For the chain runtime: :func:`make_dual`, :func:`split_dual`, :func:`register_module_call_handler`,
:func:`is_active`. Once FSDP2 is imported, the first call imports facm_ext.chain, which registers its FSDP2
module-call handler, so ``facm_ext.jvp(fsdp2_model, ...)`` streams through the fully_shard units.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Union

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from facm_ext import _env

from ._dual import (
    STATE,
    DualTensor,
    JVPReport,
    JVPTransformError,
    is_active,
    make_dual,
    split_dual,
)
from . import _rules  # noqa: F401  (registers the fused function rules)
from ._modules import install, register_jvp_rule, register_module_call_handler, run_module, uninstall
from ._graph import GraphedJVP, graph

__all__ = [
    "DualTensor",
    "GraphedJVP",
    "graph",
    "JVPReport",
    "JVPTransformError",
    "is_active",
    "jvp",
    "make_dual",
    "register_jvp_rule",
    "register_module_call_handler",
    "run_module",
    "split_dual",
]


def _check_inputs(primals, tangents) -> tuple[list, list, Any]:
    if not isinstance(primals, (tuple, list)):
        raise ValueError(f"primals: expected a tuple of tensors (the positional arguments of func), got "
                         f"{type(primals).__name__}")
    if not isinstance(tangents, (tuple, list)):
        raise ValueError(f"tangents: expected a tuple with one tangent per primal, got {type(tangents).__name__}")
    if len(primals) != len(tangents):
        raise ValueError(f"tangents: expected {len(primals)} entries (one per primal), got {len(tangents)}")
    primal_leaves, primal_spec = tree_flatten(tuple(primals))
    tangent_leaves, tangent_spec = tree_flatten(tuple(tangents), is_leaf=lambda v: v is None)
    if len(primal_leaves) != len(tangent_leaves) or (
            primal_spec != tangent_spec and tree_flatten(tuple(tangents))[1] != primal_spec):
        raise ValueError(f"tangents: structure {tangent_spec} does not match the structure of primals "
                         f"{primal_spec}")
    for i, (p, t) in enumerate(zip(primal_leaves, tangent_leaves)):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"primals: leaf {i} is a {type(p).__name__}; expected a torch.Tensor")
        if type(p) is DualTensor and p._facm_tangent is not None:
            raise JVPTransformError("facm_ext.jvp: nested transforms (a primal that already carries a tangent "
                                    "from an enclosing facm_ext.jvp) are not supported")
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tangents: leaf {i} is a {type(t).__name__}; expected a torch.Tensor or None")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"tangents: leaf {i} belongs to a {p.dtype} primal, which cannot carry a tangent; "
                             "pass None (or keep it out of primals)")
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"tangents: leaf {i} has dtype {t.dtype}; expected a floating tangent")
        if t.shape != p.shape:
            raise ValueError(f"tangents: leaf {i} has shape {tuple(t.shape)}; expected the shape "
                             f"{tuple(p.shape)} of its primal")
        if t.device != p.device:
            raise ValueError(f"tangents: leaf {i} is on {t.device}; expected its primal's device {p.device}")
    return primal_leaves, tangent_leaves, primal_spec


def _split_output(out) -> tuple[Any, Any]:
    leaves, spec = tree_flatten(out)
    primal_leaves, tangent_leaves = [], []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(f"func: output leaf {i} is a {type(leaf).__name__}; expected only tensors "
                             "(return extra values through has_aux=True)")
        primal, tangent = split_dual(leaf)
        if tangent is None:
            tangent = torch.zeros_like(primal) if (primal.is_floating_point() or primal.is_complex()) else None
        elif tangent.numel() > 1 and 0 in tangent.stride():
            tangent = tangent.contiguous()  # an expanded (broadcast) tangent: give the caller ordinary memory
        primal_leaves.append(primal)
        tangent_leaves.append(tangent)
    return tree_unflatten(primal_leaves, spec), tree_unflatten(tangent_leaves, spec)


def _strip_duals(value):
    return tree_map(lambda v: split_dual(v)[0] if type(v) is DualTensor else v, value)


def _exclude_from_dynamo(fn):
    """torch.compiler.disable, applied lazily (torch._disable_dynamo imports dynamo at the first call, not at
    import: importing torch._dynamo costs seconds)."""
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


_FSDP2_MODULE = "torch.distributed.fsdp._fully_shard._fully_shard"
_chain_handler_registered = False


def _register_chain_handler_if_fsdp2() -> None:
    """Import facm_ext.chain (whose import registers its FSDP2 module-call handler) once FSDP2 is in use, so
    facm_ext.jvp streams through fully_shard units without the caller importing facm_ext.chain. Without that
    handler, FSDP2's autograd hooks would not see the graph through dual values (missing gradients)."""
    global _chain_handler_registered
    if _chain_handler_registered or _FSDP2_MODULE not in sys.modules:
        return
    fully_shard_module = sys.modules[_FSDP2_MODULE]
    fsdp_module_type = getattr(fully_shard_module, "FSDPModule", None)
    if fsdp_module_type is None:
        return
    import facm_ext.chain  # noqa: F401  (registers the handler)

    _chain_handler_registered = True


@_exclude_from_dynamo
def jvp(func: Callable, primals: tuple, tangents: tuple, *, has_aux: bool = False,
        report: Union[bool, JVPReport] = False):
    """Primal output and Jacobian-vector product of ``func`` at ``primals`` along ``tangents``.

    Args:
        func: any callable written in PyTorch (nn.Modules included, unmodified) taking ``len(primals)`` positional
            arguments and returning a tensor or a pytree of tensors (with has_aux: ``(output, aux)``).
        primals: tuple of tensors (or pytrees of tensors). Integer/bool tensors pass through without tangent.
        tangents: the same structure as primals; each tangent has its primal's shape (cast to its dtype); None
            stands for a zero tangent.
        has_aux: func returns ``(output, aux)``; aux is returned as is (dual values unwrapped, no tangent).
        report: True -> also return a :class:`JVPReport` of fused and fallen-back ops; a JVPReport instance ->
            fill that one (the return value is unchanged).
    Returns:
        ``(out, tangent_out)`` [+ aux] [+ report]. ``out`` has func's structure and autograd graph (when grad is
        enabled); ``tangent_out`` has the same structure, no graph, tangents in the output's dtype, zeros for
        outputs that do not depend on the primals.
    Raises:
        ValueError for malformed primals/tangents/outputs; JVPTransformError for constructs the transform cannot
        differentiate correctly (e.g. in-place writes of traced values into untraced tensors).
    """
    if not callable(func):
        raise ValueError(f"func: expected a callable, got {type(func).__name__}")
    if not isinstance(report, (bool, JVPReport)):
        raise ValueError(f"report: expected a bool or a JVPReport, got {type(report).__name__}")
    primal_leaves, tangent_leaves, spec = _check_inputs(primals, tangents)
    _register_chain_handler_if_fsdp2()
    record = report if isinstance(report, JVPReport) else (JVPReport() if report else None)

    previous_report, previous_subtrees = STATE.report, STATE.subtrees
    install()
    STATE.depth += 1
    if record is not None:
        STATE.report = record
    if previous_subtrees is None:
        STATE.subtrees = {}
    try:
        # The ops' environment switches are read once for the whole call (facm_ext/_env.py).
        with _env.snapshot():
            duals = [make_dual(p, t) for p, t in zip(primal_leaves, tangent_leaves)]
            args = tree_unflatten(duals, spec)
            out = func(*args)
    finally:
        STATE.depth -= 1
        STATE.report, STATE.subtrees = previous_report, previous_subtrees
        uninstall()

    aux = None
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("func: with has_aux=True, expected func to return a tuple (output, aux), got "
                             f"{type(out).__name__}")
        out, aux = out
    out_primal, out_tangent = _split_output(out)
    result = (out_primal, out_tangent)
    if has_aux:
        result = result + (_strip_duals(aux),)
    if report is True:
        result = result + (record,)
    return result


class _CallablePackage(types.ModuleType):
    """facm_ext.jvp is both this package and the transform: ``facm_ext.jvp(func, primals, tangents)`` must work
    whether the attribute lookup on facm_ext returns the package (it always does, as a submodule) or the
    function. Making the package module itself callable keeps the two one object."""

    def __call__(self, func, primals, tangents, *, has_aux: bool = False, report: Union[bool, JVPReport] = False):
        return jvp(func, primals, tangents, has_aux=has_aux, report=report)


sys.modules[__name__].__class__ = _CallablePackage
