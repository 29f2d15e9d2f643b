"""Block graphs: the tangent mode's per-unit JVP forward replayed from CUDA graphs (opt-in, ``set_block_graphs``).

Why: the chain's tangent mode is host-bound. Python issues each block's ~60 kernels, FSDP2's pre-/post-forward
runs around them, and on a 2-GPU host the issue time of a LightningDiT-XL/1 JVP (28 blocks) measured 119 ms
against 75 ms on one GPU and ~130 ms of GPU time (benchmarks/RESULTS.md, issue 5), so a slower host makes the
GPUs wait. With block graphs, each FSDP2 unit's forward under the transform is captured once per call
signature and then replayed: per block the host issues two copies (the arguments and the gathered parameters
into the graph's static buffers), the replay and one copy per output, while FSDP2 still gathers, prefetches and
reshards the parameters exactly as before.

Which calls: tangent mode only (grad disabled), CUDA arguments, no report being collected, not under
torch.compile, a dispatch mode or a functorch transform, and the unit's parameters plain (unsharded) CUDA tensors
after FSDP's pre-forward. Anything else runs eagerly. The first ``warmup`` calls of a unit with a given signature
run eagerly (Triton autotuning, the transform's first-call checks); the next one runs it once more eagerly with
torch's sync debug mode set to "error" and, when nothing synchronized with the host, captures it. A unit that
synchronizes (``.item()``, ``torch.equal``, a data-dependent branch) is recorded in :func:`block_graph_failures`
with the reason, with a warning, and stays eager. A capture that fails anyway raises: torch leaves its CUDA
random-number state unusable after a failed capture, so the process cannot go on as if nothing happened.

Memory (what the streaming bound gains): FSDP2 allocates a unit's unsharded parameters anew at every all-gather,
so a graph cannot read them where they are. Units with the same parameter shapes share one set of static
parameter buffers (one more gathered block: 46 MiB for LightningDiT-XL/1), filled from the gathered parameters
before each replay; units with the same argument and output shapes share static argument and output buffers;
the graphs share one memory pool per device for their intermediates (about one block's transient peak).

The contract of a CUDA graph holds for the block: its forward may read only its arguments, its own parameters
and buffers, and tensors that outlive the graph (the captured addresses are replayed). A block that reads a
tensor its model computed earlier in the same call through an attribute (rather than an argument) would replay
a stale address: keep block graphs off for such models.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
import weakref

import torch
import torch.nn as nn
import torch.utils._pytree as pytree


class _Settings(threading.local):
    def __init__(self):
        self.enabled = False
        self.warmup = 2


SETTINGS = _Settings()


def set_block_graphs(enabled: bool, *, warmup: int = 2) -> None:
    """Turn block graphs on or off for this thread's tangent-mode chain calls (default off).

    Args:
        enabled: replay each FSDP2 unit's JVP forward from a CUDA graph in tangent mode (see the module doc).
        warmup: eager calls of a unit with a given signature before its capture (>= 1: the first call runs the
            transform's one-time checks, which a graph must not capture).
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled: expected a bool, got {enabled!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise ValueError(f"warmup: expected an int >= 1, got {warmup!r}")
    SETTINGS.enabled = enabled
    SETTINGS.warmup = warmup


@dataclasses.dataclass(slots=True)
class _Graph:
    """One unit's captured forward and the static buffers it reads and writes."""

    graph: "torch.cuda.CUDAGraph"
    static_args: list  # primal and tangent tensors of the arguments, in argument order
    static_params: list  # the unit's parameters, in module.parameters() order
    static_outputs: list  # primal and tangent tensors of the outputs
    out_spec: pytree.TreeSpec
    out_has_tangent: list  # per output leaf: True / False, None for a None leaf


# unit -> {signature: eager call count (int) or its captured _Graph}
_UNITS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# unit -> why its capture failed
_FAILED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# shared static buffers: ("params" | "args" | "outputs", signature) -> list of tensors
_BUFFERS: dict = {}
# device -> (graph memory pool, capture stream) shared by the captures on that device
_POOLS: dict = {}


def block_graph_failures() -> dict:
    """{unit class name: reason} for the units block graphs turned down (they run eagerly)."""
    return {type(unit).__name__: reason for unit, reason in _FAILED.items()}


def reset_block_graphs() -> None:
    """Drop every captured graph and its static buffers (e.g. before a change of batch shape for good)."""
    _UNITS.clear()
    _FAILED.clear()
    _BUFFERS.clear()
    _POOLS.clear()


def _eligible_context() -> bool:
    from facm_ext.jvp._dual import STATE

    return (not torch.is_grad_enabled() and STATE.report is None
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.peek_interpreter_stack() is None)


# Markers in an argument layout: a tensor argument without / with a tangent (anything else is a constant).
_PRIMAL, _DUAL = object(), object()


def _tensor_signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.stride(), t.device


def _flat_arguments(args: tuple, kwargs: dict, split_dual):
    """(primal/tangent tensors in order, their signature, the pytree spec, how to rebuild the leaves)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors, signature, layout = [], [spec], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            primal, tangent = split_dual(leaf)
            tensors.append(primal)
            signature.append(_tensor_signature(primal))
            if tangent is not None:
                tensors.append(tangent)
                signature.append(_tensor_signature(tangent))
            layout.append(_DUAL if tangent is not None else _PRIMAL)
        else:
            # Constants: by value where that is what they are, else by identity (e.g. a RoPE module argument).
            signature.append(("value", type(leaf), leaf) if leaf is None or isinstance(leaf, (bool, int, float, str))
                             else ("object", id(leaf)))
            layout.append(leaf)
    return tensors, tuple(signature), spec, layout


def _rebuild_arguments(tensors: list, spec, layout: list, make_dual):
    leaves, position = [], 0
    for entry in layout:
        if entry is _PRIMAL:
            leaves.append(tensors[position])
            position += 1
        elif entry is _DUAL:
            leaves.append(make_dual(tensors[position], tensors[position + 1]))
            position += 2
        else:
            leaves.append(entry)
    return pytree.tree_unflatten(leaves, spec)


def _parameters(module: nn.Module):
    """The unit's parameters in a fixed order, or None when one is not a plain tensor (still sharded: a
    DTensor)."""
    params = list(module.parameters())
    for p in params:
        if type(p) not in (nn.Parameter, torch.Tensor):
            return None
    return params


def _all_cuda(tensors: list) -> bool:
    return all(t.is_cuda for t in tensors)


def _shared(kind: str, like: list) -> list:
    key = (kind, tuple(_tensor_signature(t) for t in like))
    buffers = _BUFFERS.get(key)
    if buffers is None:
        # empty_like keeps the strides of a dense tensor (the capture sees the layout the eager call saw) and
        # lays out an overlapping one (an expanded view) densely, so that copying into it is well defined.
        buffers = [torch.empty_like(t) for t in like]
        _BUFFERS[key] = buffers
    return buffers


def run(module: nn.Module, args: tuple, kwargs: dict, run_module):
    """``run_module(module, args, kwargs)``, replayed from the unit's CUDA graph where block graphs apply."""
    if not SETTINGS.enabled or module in _FAILED or not _eligible_context():
        return run_module(module, args, kwargs)
    from facm_ext.jvp import make_dual, split_dual

    tensors, signature, spec, layout = _flat_arguments(args, kwargs, split_dual)
    params = _parameters(module)
    if params is None or not _all_cuda(tensors + params):
        return run_module(module, args, kwargs)
    signature = signature + tuple(_tensor_signature(p) for p in params) + (
        torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    entries = _UNITS.setdefault(module, {})
    entry = entries.get(signature, 0)
    if isinstance(entry, int):
        if entry < SETTINGS.warmup:
            entries[signature] = entry + 1
            return run_module(module, args, kwargs)
        reason = _why_not_capturable(module, args, kwargs, run_module, split_dual)
        if reason is not None:
            _FAILED[module] = reason
            warnings.warn(f"facm_ext.chain block graphs: {type(module).__name__} cannot be captured ({reason}); it "
                          "runs eagerly", RuntimeWarning, stacklevel=3)
            return run_module(module, args, kwargs)
        entry = _capture(module, params, tensors, spec, layout, run_module, make_dual, split_dual)
        entries[signature] = entry
    torch._foreach_copy_(entry.static_args, tensors)
    torch._foreach_copy_(entry.static_params, params)
    entry.graph.replay()
    outputs = [t.clone() for t in entry.static_outputs]
    leaves, position = [], 0
    for has_tangent in entry.out_has_tangent:
        if has_tangent is None:
            leaves.append(None)
        elif has_tangent:
            leaves.append(make_dual(outputs[position], outputs[position + 1]))
            position += 2
        else:
            leaves.append(outputs[position])
            position += 1
    return pytree.tree_unflatten(leaves, entry.out_spec)


def _why_not_capturable(module, args, kwargs, run_module, split_dual):
    """Why the unit's forward cannot be captured, or None: one eager run with torch's sync debug mode set to
    "error", so that a host synchronization (``.item()``, ``torch.equal``, a data-dependent branch) raises here
    instead of failing a capture, and a look at its outputs (tensors and None only). A capture that fails midway
    leaves torch's CUDA random-number state unusable in the process (later random ops raise "Offset increment
    outside graph capture"), so it must not be tried."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = run_module(module, args, kwargs)
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return f"it synchronizes with the host: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for leaf in pytree.tree_leaves(output):
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            return f"it returns a {type(leaf).__name__}; only tensors (and None) can be replayed"
        if isinstance(leaf, torch.Tensor) and not all(t is None or t.is_cuda for t in split_dual(leaf)):
            return "it returns a tensor that is not on a CUDA device"
    return None


def _capture(module, params, tensors, spec, layout, run_module, make_dual, split_dual):
    """Capture the unit's forward on static buffers. A failure raises (see :func:`_why_not_capturable` for why
    it cannot be recovered from); the unit is recorded as failed first."""
    device = tensors[0].device if tensors else params[0].device
    static_args = _shared("args", tensors)
    static_params = _shared("params", params)
    torch._foreach_copy_(static_args, tensors)
    torch._foreach_copy_(static_params, params)
    # The forward reads the static parameters during the capture: swap them in where the unit holds its own.
    by_id = {id(p): s for p, s in zip(params, static_params)}
    swapped = []
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is not None and id(p) in by_id:
                swapped.append((owner, name, p))
                owner._parameters[name] = nn.Parameter(by_id[id(p)], requires_grad=False)
    static_call = _rebuild_arguments(static_args, spec, layout, make_dual)
    pool_and_stream = _POOLS.get(device)
    if pool_and_stream is None:
        pool_and_stream = _POOLS[device] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(device))
    pool, stream = pool_and_stream
    graph = torch.cuda.CUDAGraph()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capture's own notes; a failure raises
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                output = run_module(module, *static_call)
                out_leaves, out_spec = pytree.tree_flatten(output)
                produced, out_has_tangent = [], []
                for leaf in out_leaves:  # tensors and None (checked by the eager probe)
                    if leaf is None:
                        out_has_tangent.append(None)
                        continue
                    primal, tangent = split_dual(leaf)
                    produced.append(primal)
                    if tangent is not None:
                        produced.append(tangent)
                    out_has_tangent.append(tangent is not None)
                static_outputs = _shared("outputs", produced)
                for target, source in zip(static_outputs, produced):
                    target.copy_(source)
    except Exception as exc:
        _FAILED[module] = f"{type(exc).__name__}: {exc}"
        _POOLS.pop(device, None)  # a failed capture can leave its pool registered as recording for its stream
        raise RuntimeError(
            f"facm_ext.chain block graphs: capturing {type(module).__name__} failed ({exc}). A failed CUDA graph "
            "capture leaves torch's CUDA random-number state unusable in this process; turn block graphs off for "
            "this model (facm_ext.chain.set_block_graphs(False)).") from exc
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p
    return _Graph(graph, static_args, static_params, static_outputs, out_spec, out_has_tangent)
