"""The FSDP2 module-call handler that makes ``facm_ext.jvp(model, ...)`` stream through ``fully_shard`` units.

While the transform runs, a call ``unit(*args)`` of an FSDP2 unit comes here with dual arguments. The handler

1. splits every dual into its plain primal and its tangent,
2. runs FSDP's own pre-forward on the plain primals (root setup, unshard or wait for the prefetch, the
   mixed-precision input cast, the post-backward hook on the inputs),
3. starts the all-gathers of the next ``prefetch`` units (the order of units recorded in the previous pass),
4. runs the unit's forward under the transform on duals rebuilt from FSDP's (possibly cast) primals (with
   ``set_block_graphs(True)``: replayed from the unit's CUDA graphs, :mod:`facm_ext.chain._graphs`),
5. splits the outputs, runs FSDP's post-forward on the plain primal outputs (reshard, pre-backward hooks, output
   cast) and hands back duals of those outputs with the tangents cast to match.

A second handler sends the calls of units a ``ChainJVP`` drives (it ran steps 2 and 3 itself) to the block graphs
when they are on.

FSDP's autograd hooks therefore sit on ordinary tensors of the primal graph; the tangents never pass through
them. An exception anywhere in a unit leaves every unit of that FSDP tree resharded and IDLE (in-flight
all-gathers are completed first, so ranks that raise at the same point do not hang).
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from facm_ext.chain import _graphs, _units
from facm_ext.chain._chain import DRIVEN_MODULES
from facm_ext.chain._seam import match_tangent

_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view tensor"


class _Settings(threading.local):
    def __init__(self):
        self.prefetch = 1
        self.enabled = True


SETTINGS = _Settings()

# id(state context of an FSDP tree) -> the unit modules (weak) in the order the last forward pass ran them.
_RECORDED_ORDER: dict[int, list] = {}
_CURRENT_ORDER: dict[int, list] = {}
_UNITS: "weakref.WeakKeyDictionary[nn.Module, _units.Fsdp2Unit]" = weakref.WeakKeyDictionary()


def set_prefetch(depth: int) -> None:
    """How many following FSDP2 units the transform's handler all-gathers ahead (default 1; 0 turns it off)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth: expected an int >= 0, got {depth!r}")
    SETTINGS.prefetch = depth


def is_streamed_unit(module: nn.Module) -> bool:
    """The handler's predicate: FSDP2 units that no ChainJVP is driving right now."""
    return SETTINGS.enabled and _units.is_fsdp2_unit(module) and id(module) not in DRIVEN_MODULES


def is_driven_unit_with_block_graphs(module: nn.Module) -> bool:
    """The second handler's predicate: an FSDP2 unit a ChainJVP is driving (gathered, its hooks suspended) while
    block graphs are on. Its calls inside the ChainJVP's step go to :func:`facm_ext.chain._graphs.run`, as the
    transform's own FSDP2 calls do."""
    return _graphs.SETTINGS.enabled and id(module) in DRIVEN_MODULES and _units.is_fsdp2_unit(module)


def _unit(module: nn.Module) -> _units.Fsdp2Unit:
    unit = _UNITS.get(module)
    if unit is None:
        unit = _units.Fsdp2Unit(module)
        _UNITS[module] = unit
    return unit


def _split(tree, split_dual):
    leaves, spec = pytree.tree_flatten(tree)
    pairs = [split_dual(leaf) if isinstance(leaf, torch.Tensor) else (leaf, None) for leaf in leaves]
    return [p for p, _ in pairs], [t for _, t in pairs], spec


def _rejoin(primals, tangents, make_dual):
    out = []
    for primal, tangent in zip(primals, tangents):
        tangent = match_tangent(tangent, primal)
        if isinstance(primal, torch.Tensor) and tangent is not None:
            out.append(make_dual(primal, tangent))
        else:
            out.append(primal)
    return out


def fsdp2_module_call(module: nn.Module, args: tuple, kwargs: dict, run_module):
    """``handler(module, args, kwargs, run_module)`` for ``facm_ext.jvp.register_module_call_handler``."""
    from facm_ext.jvp import make_dual, split_dual

    unit = _unit(module)
    state_ctx = getattr(unit.state, "_state_ctx", None)
    starts_pass = state_ctx is None or state_ctx.iter_forward_root is None
    try:
        primal_leaves, tangent_leaves, spec = _split((tuple(args), dict(kwargs)), split_dual)
        plain_args, plain_kwargs = pytree.tree_unflatten(primal_leaves, spec)
        plain_args, plain_kwargs = unit.pre_forward(tuple(plain_args), dict(plain_kwargs))
        unit.release_last_gather_buffer()
        tree_key = id(unit.state._state_ctx)
        if starts_pass:
            _CURRENT_ORDER[tree_key] = []
        _record_and_prefetch(tree_key, module)
        cast_leaves, cast_spec = pytree.tree_flatten((plain_args, plain_kwargs))
        if cast_spec != spec:
            raise RuntimeError(f"facm_ext.chain: FSDP's pre-forward changed the argument structure of "
                               f"{type(module).__name__} ({spec} -> {cast_spec})")
        dual_args, dual_kwargs = pytree.tree_unflatten(_rejoin(cast_leaves, tangent_leaves, make_dual), spec)
        DRIVEN_MODULES.add(id(module))
        try:
            output = _graphs.run(module, tuple(dual_args), dict(dual_kwargs), run_module)
        finally:
            DRIVEN_MODULES.discard(id(module))
        out_primals, out_tangents, out_spec = _split(output, split_dual)
        with warnings.catch_warnings():
            # The outputs handed to FSDP are aliases of the transform's primals; the chain never updates them in
            # place (the hazard FSDP warns about), it re-wraps them as duals.
            warnings.filterwarnings("ignore", message=_VIEW_WARNING)
            plain_output = unit.post_forward(plain_args, pytree.tree_unflatten(out_primals, out_spec),
                                             force_reshard=not _is_real_root(unit))
        plain_leaves, plain_spec = pytree.tree_flatten(plain_output)
        if plain_spec != out_spec:
            raise RuntimeError(f"facm_ext.chain: FSDP's post-forward changed the output structure of "
                               f"{type(module).__name__}")
        if starts_pass:
            _RECORDED_ORDER[tree_key] = _CURRENT_ORDER.pop(tree_key, [])
        return pytree.tree_unflatten(_rejoin(plain_leaves, out_tangents, make_dual), out_spec)
    except BaseException:
        _abort_tree(unit)
        if starts_pass and state_ctx is not None:
            _CURRENT_ORDER.pop(id(state_ctx), None)
        raise


def _is_real_root(unit: _units.Fsdp2Unit) -> bool:
    """A root that contains other units keeps its parameters after forward, as FSDP decides for roots."""
    state_ctx = getattr(unit.state, "_state_ctx", None)
    return bool(getattr(unit.state, "_is_root", False)) and state_ctx is not None and len(state_ctx.all_states) > 1


def _record_and_prefetch(tree_key: int, module: nn.Module) -> None:
    current = _CURRENT_ORDER.setdefault(tree_key, [])
    position = len(current)
    current.append(weakref.ref(module))
    recorded = _RECORDED_ORDER.get(tree_key)
    if SETTINGS.prefetch <= 0 or not recorded or position >= len(recorded) or recorded[position]() is not module:
        return
    for ahead in recorded[position + 1: position + 1 + SETTINGS.prefetch]:
        target = ahead()
        if target is None or not _units.is_fsdp2_unit(target):
            continue
        target_unit = _unit(target)
        if not target_unit.is_gathered() and not _is_real_root(target_unit):
            target_unit.prefetch()


def _abort_tree(unit: _units.Fsdp2Unit) -> None:
    state_ctx = getattr(unit.state, "_state_ctx", None)
    states = list(getattr(state_ctx, "all_states", None) or [unit.state])
    for state in states:
        modules = getattr(state, "_modules", None) or ()
        for module in modules:
            _unit(module).abort()
    unit.abort()


def register_with_transform() -> bool:
    """Register the FSDP2 handlers with facm_ext.jvp (idempotent). False if the transform lacks the hook."""
    try:
        from facm_ext import jvp as transform
    except ImportError:
        return False
    register = getattr(transform, "register_module_call_handler", None)
    if register is None:
        return False
    global _REGISTERED
    if not _REGISTERED:
        register(is_streamed_unit, fsdp2_module_call)
        register(is_driven_unit_with_block_graphs, _graphs.run)
        _REGISTERED = True
    return True


_REGISTERED = False
