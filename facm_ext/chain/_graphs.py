"""Block graphs: each FSDP2 unit's JVP replayed from CUDA graphs (opt-in, ``set_block_graphs``).

Why: the chain is host-bound. Python issues each block's ~60 kernels (and in grad mode their backward through
the autograd engine), FSDP2's pre-/post-forward runs around them, and on a 2-GPU host the issue time of a
LightningDiT-XL/1 JVP (28 blocks) measured 119 ms (tangent) and 138 ms (grad) against 75 and 96 ms on one GPU
and ~130-145 ms of GPU time (benchmarks/RESULTS.md, issue 5), so a slower host makes the GPUs wait. With block
graphs, each FSDP2 unit's forward under the transform is captured once per call signature and then replayed: per
block the host issues a few copies (the arguments and the gathered parameters into the graph's static buffers,
the outputs out of them) and one replay, while FSDP2 still gathers, prefetches and reshards the parameters
exactly as before.

Two modes, as the chain's:

- tangent mode (grad disabled): one graph per unit and signature, the JVP forward.
- grad mode (grad enabled, FACM's step; ``set_block_graphs(True, grad=True)``, the default): a forward graph
  (the JVP forward, building the block's autograd graph on static tensors) and a backward graph (the backward of
  the block's primal outputs into its inputs and parameters), captured together the way
  ``torch.cuda.make_graphed_callables`` captures a callable. The unit's call returns outputs whose backward
  replays the backward graph: FSDP2's pre-backward hook gathers the parameters again, the replay gives the
  parameter gradients to autograd (accumulated into the unsharded parameters' ``.grad`` as an eager backward
  does) and FSDP2's post-backward reduce-scatters them. Tangent outputs carry no graph, as in eager grad mode.

Which units: those the transform streams (``facm_ext.jvp`` of an FSDP2 model) and the FSDP2 blocks a ``ChainJVP``
drives, where its step calls ``block(...)``. Which calls: CUDA arguments, no report being collected, not under
torch.compile, a dispatch mode or a functorch transform, tangents without autograd graph, and the unit's
parameters plain (unsharded) CUDA tensors after FSDP's pre-forward. Anything else runs eagerly. The first
``warmup`` calls of a unit with a given signature run eagerly (Triton autotuning, the transform's first-call
checks); the next one runs it once more eagerly (in grad mode its
backward too) with torch's sync debug mode set to "error" and, when nothing synchronized with the host, captures
it. A unit that synchronizes (``.item()``, ``torch.equal``, a data-dependent branch) is recorded in
:func:`block_graph_failures` with the reason, with a warning, and stays eager. A capture that fails anyway
raises: torch leaves its CUDA random-number state unusable after a failed capture, so the process cannot go on
as if nothing happened.

Memory. FSDP2 allocates a unit's unsharded parameters anew at every all-gather, so a graph cannot read them where
they are: units with the same parameter shapes share one set of static parameter buffers (one more gathered
block: 46 MiB for LightningDiT-XL/1), filled from the gathered parameters before each replay (in grad mode again
before the backward replay). Arguments and outputs cross into and out of the graphs through static buffers
shared by units of the same shapes. Tangent-mode graphs share one memory pool per device for their
intermediates (about one block's transient peak). Grad-mode graphs share another; in it every block's saved
activations stay allocated between steps (the memory an eager grad-mode step peaks at, now held from the first
capture on, as with make_graphed_callables; ``reset_block_graphs()`` releases it) and the intermediates of all
blocks reuse one region.

Order (grad mode). The graphs of a pool reuse each other's free memory in the order they were captured, so a
replay may overwrite what a later-captured block saved for its backward. A training step replays in the
captured order (forward through the blocks, then backward in reverse), which is safe; anything else, e.g. a
second grad-mode call of the model before the first one's backward, or a unit called twice in one forward, is
tracked and the backward that would read overwritten activations raises instead of returning wrong gradients.
Run each grad-mode call's backward before the next grad-mode call, or turn block graphs off for such models.

The contract of a CUDA graph holds for the block: its forward may read only its arguments, its own parameters
and buffers, and tensors that outlive the graph (the captured addresses are replayed). A block that reads a
tensor its model computed earlier in the same call through an attribute (rather than an argument) would replay
a stale address: keep block graphs off for such models.
"""

from __future__ import annotations

import contextlib
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
        self.grad = True


SETTINGS = _Settings()


def set_block_graphs(enabled: bool, *, warmup: int = 2, grad: bool = True) -> None:
    """Turn block graphs on or off for this thread's chain calls (default off).

    Args:
        enabled: replay each FSDP2 unit's JVP from CUDA graphs (see the module doc).
        warmup: eager calls of a unit with a given signature before its capture (>= 1: the first call runs the
            transform's one-time checks, which a graph must not capture).
        grad: graphs for grad-mode calls too (forward and backward graphs); False keeps them to tangent mode.

    Captured graphs live as long as their units; the static buffers and memory pools (in grad mode every
    block's saved activations) stay until :func:`reset_block_graphs`, also after turning block graphs off.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled: expected a bool, got {enabled!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise ValueError(f"warmup: expected an int >= 1, got {warmup!r}")
    if not isinstance(grad, bool):
        raise ValueError(f"grad: expected a bool, got {grad!r}")
    SETTINGS.enabled = enabled
    SETTINGS.warmup = warmup
    SETTINGS.grad = grad


@dataclasses.dataclass(slots=True)
class _Graph:
    """One unit's captured forward and the static buffers it reads and writes."""

    graph: "torch.cuda.CUDAGraph"
    static_args: list  # primal and tangent tensors of the arguments, in argument order
    static_params: list  # the unit's parameters, in module.parameters() order
    static_outputs: list  # primal and tangent tensors of the outputs
    out_spec: pytree.TreeSpec
    out_has_tangent: list  # per output leaf: True / False, None for a None leaf

    def replay(self, tensors, params) -> list:
        """The unit's output tensors for these arguments and parameters (fresh tensors, not the buffers)."""
        return _replay_with(self.graph, self, tensors, params)


def _replay_with(graph, buffers, tensors, params) -> list:
    """Fill ``buffers``' static arguments and parameters, replay ``graph``, return fresh copies of its outputs."""
    _copy_into(buffers.static_args, tensors)
    _copy_into(buffers.static_params, params)
    graph.replay()
    return [t.clone() for t in buffers.static_outputs]


# unit -> {signature: eager call count (int) or its captured _Graph}
_UNITS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# unit -> why its capture failed
_FAILED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# shared static buffers: (kind: "params", "args", "outputs", "grad_outputs", "grads"; signatures) -> tensors
_BUFFERS: dict = {}
# (device, "tangent" | "grad") -> the _Pool shared by the captures of that mode on that device
_POOLS: dict = {}


def block_graph_failures() -> dict:
    """{unit class name: reason} for the units block graphs turned down (they run eagerly)."""
    return {type(unit).__name__: reason for unit, reason in _FAILED.items()}


def captured_block_graphs() -> dict:
    """{"tangent": n, "grad": n}: how many (unit, call signature) pairs are replayed from graphs in each mode."""
    counts = {"tangent": 0, "grad": 0}
    for entries in _UNITS.values():
        for entry in entries.values():
            if isinstance(entry, _Graph):
                counts["tangent"] += 1
            elif isinstance(entry, _GradGraph):
                counts["grad"] += 1
    return counts


def reset_block_graphs() -> None:
    """Drop every captured graph and its static buffers (e.g. before a change of batch shape for good); this
    releases the grad-mode pool's saved activations once no pending backward holds its graphs."""
    _UNITS.clear()
    _FAILED.clear()
    _BUFFERS.clear()
    _POOLS.clear()


def _eligible_mode():
    """"tangent" or "grad" where block graphs may replay this call, else None (it runs eagerly)."""
    from facm_ext.jvp._dual import STATE

    if (STATE.report is not None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
            or torch._C._functorch.peek_interpreter_stack() is not None or torch.is_inference_mode_enabled()):
        return None
    if not torch.is_grad_enabled():
        return "tangent"
    return "grad" if SETTINGS.grad else None


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


# Copies of at least this many bytes go one by one: a same-dtype dense copy_ is a device-to-device memcpy, while
# torch._foreach_copy_'s multi-tensor kernel moved a LightningDiT-XL/1 block's parameters at ~670 GB/s on an H100
# (7 ms of a grad step's backward; benchmarks/RESULTS.md, ninth session).
_FOREACH_BYTES = 1 << 20


def _copy_into(targets: list, sources) -> None:
    """targets[i].copy_(sources[i]) for all i: the large ones one by one, the small ones in one foreach launch."""
    small_targets, small_sources = [], []
    for target, source in zip(targets, sources):
        if target.numel() * target.element_size() >= _FOREACH_BYTES:
            target.copy_(source)
        else:
            small_targets.append(target)
            small_sources.append(source)
    if small_targets:
        torch._foreach_copy_(small_targets, small_sources)


def _shared(kind: str, like: list, *, contiguous: bool = False) -> list:
    """Static buffers shaped like ``like``, shared by every capture with the same kind and signatures.

    ``contiguous=False``: the layout of ``like`` (empty_like keeps the strides of a dense tensor, so the capture
    sees the layout the eager call saw, and lays out an overlapping one, an expanded view, densely, so that
    copying into it is well defined). ``contiguous=True``: row-major, for gradients (see _capture_grad)."""
    key = (kind, contiguous, tuple(_tensor_signature(t) for t in like))
    buffers = _BUFFERS.get(key)
    if buffers is None:
        buffers = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if contiguous else torch.empty_like(t)
                   for t in like]
        _BUFFERS[key] = buffers
    return buffers


def run(module: nn.Module, args: tuple, kwargs: dict, run_module):
    """``run_module(module, args, kwargs)``, replayed from the unit's CUDA graphs where block graphs apply."""
    if not SETTINGS.enabled or module in _FAILED:
        return run_module(module, args, kwargs)
    mode = _eligible_mode()
    if mode is None:
        return run_module(module, args, kwargs)
    from facm_ext.jvp import make_dual, split_dual

    tensors, signature, spec, layout = _flat_arguments(args, kwargs, split_dual)
    params = _parameters(module)
    if params is None or not _all_cuda(tensors + params):
        return run_module(module, args, kwargs)
    signature = signature + tuple(_tensor_signature(p) for p in params) + (
        mode, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    if mode == "grad":
        signature += tuple(t.requires_grad for t in tensors) + tuple(p.requires_grad for p in params)
    entries = _UNITS.setdefault(module, {})
    entry = entries.get(signature, 0)
    if isinstance(entry, int):
        if entry < SETTINGS.warmup:
            entries[signature] = entry + 1
            return run_module(module, args, kwargs)
        probe = _probe(module, tensors, params, spec, layout, run_module, make_dual, split_dual, grad=mode == "grad")
        if isinstance(probe, str):
            _FAILED[module] = probe
            warnings.warn(f"facm_ext.chain block graphs: {type(module).__name__} cannot be captured ({probe}); it "
                          "runs eagerly", RuntimeWarning, stacklevel=3)
            return run_module(module, args, kwargs)
        capture = _capture_grad if mode == "grad" else _capture
        entry = capture(module, params, tensors, spec, layout, run_module, make_dual, split_dual, probe)
        entries[signature] = entry
    if mode == "grad":
        outputs = _ReplayBlock.apply(entry, len(tensors), *tensors, *params)
        return _rebuild_outputs(list(outputs), entry.out_has_tangent, entry.out_spec, make_dual)
    return _rebuild_outputs(entry.replay(tensors, params), entry.out_has_tangent, entry.out_spec, make_dual)


def _rebuild_outputs(outputs: list, out_has_tangent: list, out_spec, make_dual):
    leaves, position = [], 0
    for has_tangent in out_has_tangent:
        if has_tangent is None:
            leaves.append(None)
        elif has_tangent:
            leaves.append(make_dual(outputs[position], outputs[position + 1]))
            position += 2
        else:
            leaves.append(outputs[position])
            position += 1
    return pytree.tree_unflatten(leaves, out_spec)


class _NotReplayable(Exception):
    """A unit's call that a graph cannot replay (the message says why)."""


def _split_outputs(output, split_dual):
    """(the output's primal and tangent tensors in order, their layout per leaf, the pytree spec); raises
    _NotReplayable for a leaf that is neither a tensor nor None."""
    out_leaves, out_spec = pytree.tree_flatten(output)
    produced, out_has_tangent = [], []
    for leaf in out_leaves:
        if leaf is None:
            out_has_tangent.append(None)
            continue
        if not isinstance(leaf, torch.Tensor):
            raise _NotReplayable(f"it returns a {type(leaf).__name__}; only tensors (and None) can be replayed")
        primal, tangent = split_dual(leaf)
        produced.append(primal)
        if tangent is not None:
            produced.append(tangent)
        out_has_tangent.append(tangent is not None)
    return produced, out_has_tangent, out_spec


def _probe(module, tensors, params, spec, layout, run_module, make_dual, split_dual, *, grad: bool):
    """The unit's outputs from one eager run with torch's sync debug mode set to "error" (grad mode: and the
    backward of its primal outputs into its arguments and parameters), or why it cannot be captured: a host
    synchronization (``.item()``, ``torch.equal``, a data-dependent branch) raises here instead of failing a
    capture, and the outputs must be tensors (and None) on a CUDA device. A capture that fails midway leaves
    torch's CUDA random-number state unusable in the process (later random ops raise "Offset increment outside
    graph capture"), so it must not be tried.

    The run is on detached copies of the arguments, as the capture will see them (leaves, requiring grad as the
    arguments do), so that its backward stops at the block."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = run_module(module, *_rebuild_arguments(leaves, spec, layout, make_dual))
        produced, _, _ = _split_outputs(output, split_dual)
        if not _all_cuda(produced):
            return "it returns a tensor that is not on a CUDA device"
        if grad:
            differentiable = [t for t in produced if t.requires_grad]
            wrt = [t for t in leaves + params if t.requires_grad]
            if differentiable and wrt:
                torch.autograd.grad(differentiable, wrt, [torch.ones_like(t) for t in differentiable],
                                    allow_unused=True)
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return f"it synchronizes with the host: {exc}"
    except _NotReplayable as exc:
        return str(exc)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    # Detached (the probe's graph is not kept), flagged as the outputs were: which ones get a gradient.
    return [t.detach().requires_grad_(t.requires_grad) for t in produced]


def _pool(device, kind: str):
    """(graph memory pool, capture stream) shared by the captures of one kind ("tangent" | "grad") on a device."""
    key = (device, kind)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = _Pool(torch.cuda.graph_pool_handle(), torch.cuda.Stream(device))
    return pool


class _static_parameters:
    """Within: the unit's parameters are leaves on the static buffers (requiring grad as the gathered ones do),
    so that a capture reads (and differentiates with respect to) the buffers the replays fill."""

    def __init__(self, module: nn.Module, params: list, static_params: list):
        self.module = module
        self.by_id = {id(p): nn.Parameter(s, requires_grad=p.requires_grad) for p, s in zip(params, static_params)}
        self.leaves = [self.by_id[id(p)] for p in params]
        self.swapped = []

    def __enter__(self):
        for owner in self.module.modules():
            for name, p in list(owner._parameters.items()):
                if p is not None and id(p) in self.by_id:
                    self.swapped.append((owner, name, p))
                    owner._parameters[name] = self.by_id[id(p)]
        return self.leaves

    def __exit__(self, *exc):
        for owner, name, p in self.swapped:
            owner._parameters[name] = p
        self.swapped.clear()
        return False


@contextlib.contextmanager
def _capture_context(graph, pool):
    """The capture of ``graph`` into the pool, under the caller's autocast without its cast cache (a cached cast
    would be a tensor of the capture, replayed at a stale address)."""
    with torch.cuda.graph(graph, pool=pool.handle, stream=pool.stream, capture_error_mode="thread_local"), \
            torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                           cache_enabled=False):
        yield


def _capture_failed(module, device, kind, exc):
    _FAILED[module] = f"{type(exc).__name__}: {exc}"
    _POOLS.pop((device, kind), None)  # a failed capture can leave its pool registered as recording for its stream
    return RuntimeError(
        f"facm_ext.chain block graphs: capturing {type(module).__name__} failed ({exc}). A failed CUDA graph "
        "capture leaves torch's CUDA random-number state unusable in this process; turn block graphs off for "
        "this model (facm_ext.chain.set_block_graphs(False)).")


def _capture(module, params, tensors, spec, layout, run_module, make_dual, split_dual, probe):
    """Capture the unit's tangent-mode forward on static buffers. A failure raises (see :func:`_probe` for why it
    cannot be recovered from); the unit is recorded as failed first."""
    device = tensors[0].device if tensors else params[0].device
    static_args = _shared("args", tensors)
    static_params = _shared("params", params)
    static_outputs = _shared("outputs", probe)
    _copy_into(static_args, tensors)
    _copy_into(static_params, params)
    static_call = _rebuild_arguments(static_args, spec, layout, make_dual)
    pool = _pool(device, "tangent")
    graph = torch.cuda.CUDAGraph()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capture's own notes; a failure raises
            with _static_parameters(module, params, static_params), _capture_context(graph, pool):
                produced, out_has_tangent, out_spec = _split_outputs(run_module(module, *static_call), split_dual)
                _check_like(produced, probe)
                for target, source in zip(static_outputs, produced):
                    target.copy_(source)
    except Exception as exc:
        raise _capture_failed(module, device, "tangent", exc) from exc
    return _Graph(graph, static_args, static_params, static_outputs, out_spec, out_has_tangent)


def _check_like(produced: list, probe: list) -> None:
    got = [_tensor_signature(t) for t in produced]
    expected = [_tensor_signature(t) for t in probe]
    if got != expected:
        raise RuntimeError(f"the captured outputs {got} differ from the eager run's {expected}")


# ------------------------------------------------------------------------------------------------ grad mode
@dataclasses.dataclass(slots=True)
class _Pool:
    """A graph memory pool, its capture stream, and (grad mode) which replays' saved activations are intact."""

    handle: tuple
    stream: "torch.cuda.Stream"
    captured: int = 0  # graphs captured into the pool so far
    replays: int = 0  # forward replays so far (their tokens)
    # position of a grad-mode unit's graphs in the capture order -> the token of its forward replay whose saved
    # activations are intact (the replays of graphs captured earlier may reuse the memory they sit in)
    intact: dict = dataclasses.field(default_factory=dict)

    def forward_replayed(self, position: int) -> int:
        self._forget_from(position)
        self.replays += 1
        self.intact[position] = self.replays
        return self.replays

    def backward_replayed(self, position: int) -> None:
        self._forget_from(position + 1)

    def _forget_from(self, position: int) -> None:
        for later in [p for p in self.intact if p >= position]:
            del self.intact[later]


@dataclasses.dataclass(slots=True, eq=False)
class _GradGraph:
    """One unit's grad-mode forward and backward graphs, and the static buffers they read and write."""

    forward: "torch.cuda.CUDAGraph"
    backward: "torch.cuda.CUDAGraph"
    pool: _Pool
    position: int  # in the pool's capture order
    static_args: list  # inputs: primal and tangent tensors of the arguments, in argument order
    static_params: list  # inputs: the unit's parameters, in module.parameters() order
    static_outputs: list  # outputs: primal and tangent tensors of the outputs
    out_spec: pytree.TreeSpec
    out_has_tangent: list  # per output leaf: True / False, None for a None leaf
    differentiable: list  # per static output: whether it has a graph (gets a gradient)
    static_grad_outputs: list  # inputs of the backward: the gradients of the differentiable outputs
    static_grads: list  # outputs of the backward: per argument tensor, then per parameter, a buffer or None
    autograd_graph: list  # the captured forward's autograd nodes: they hold its saved activations

    def replay_forward(self, tensors, params) -> tuple[int, list]:
        token = self.pool.forward_replayed(self.position)
        return token, _replay_with(self.forward, self, tensors, params)

    def replay_backward(self, token: int, params, grad_outputs) -> list:
        if self.pool.intact.get(self.position) != token:
            raise RuntimeError(
                "facm_ext.chain block graphs: the activations this backward needs were overwritten by a later "
                "replay of the block graphs (another grad-mode call of the model, or of this block, ran before "
                "this backward). Run each grad-mode call's backward before the next grad-mode call, or turn "
                "block graphs off for this model (facm_ext.chain.set_block_graphs(False)).")
        _copy_into(self.static_grad_outputs, [g for g, d in zip(grad_outputs, self.differentiable) if d])
        _copy_into(self.static_params, params)
        self.backward.replay()
        self.pool.backward_replayed(self.position)
        return [None if g is None else g.clone() for g in self.static_grads]


class _ReplayBlock(torch.autograd.Function):
    """A grad-mode unit call replayed: forward graph now, backward graph in its backward."""

    @staticmethod
    def forward(ctx, entry: _GradGraph, count: int, *tensors_and_params):
        token, outputs = entry.replay_forward(tensors_and_params[:count], tensors_and_params[count:])
        ctx.entry, ctx.token = entry, token
        # Plain references: FSDP2 frees the gathered parameters' storage after the forward and gathers them again
        # (the same tensors) before this backward runs.
        ctx.params = tensors_and_params[count:]
        ctx.mark_non_differentiable(*[t for t, d in zip(outputs, entry.differentiable) if not d])
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        grads = ctx.entry.replay_backward(ctx.token, ctx.params, grad_outputs)
        return (None, None, *grads)


def _capture_grad(module, params, tensors, spec, layout, run_module, make_dual, split_dual, probe):
    """Capture the unit's grad-mode forward and, right after it, the backward of its primal outputs, into the
    grad-mode pool (see the module doc for the order this implies). A failure raises, as for :func:`_capture`."""
    device = tensors[0].device if tensors else params[0].device
    static_args = _shared("args", tensors)
    static_params = _shared("params", params)
    static_outputs = _shared("outputs", probe)
    differentiable = [t.requires_grad for t in probe]
    # Gradients are row-major, whatever the layout of the tensors they belong to: autograd hands a block the
    # gradient of its output in the layout the next op's backward produced, which for DiT-style models is
    # row-major while the residual stream itself is a transposed view (PatchEmbed's flatten(2).transpose(1, 2)).
    # Buffers in the activations' layout made the captured backward run its elementwise ops on mixed layouts,
    # in PyTorch's strided kernels: +19 ms of a LightningDiT-XL/1 step at 64/GPU (RESULTS.md, ninth session).
    static_grad_outputs = _shared("grad_outputs", [t for t, d in zip(probe, differentiable) if d], contiguous=True)
    wrt_like = [t for t in tensors + params if t.requires_grad]
    grad_buffers = iter(_shared("grads", wrt_like, contiguous=True))
    static_grads = [next(grad_buffers) if t.requires_grad else None for t in tensors + params]
    pool = _pool(device, "grad")
    forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capture's own notes; a failure raises
            with _static_parameters(module, params, static_params) as param_leaves:
                with _capture_context(forward, pool):
                    # Leaves of the captured autograd graph, filled from the static buffers inside the graph, so
                    # that what the forward saves for backward belongs to the pool (and stays put), not to the
                    # buffers the next unit's replay refills.
                    leaves = [t.detach().clone().requires_grad_(x.requires_grad)
                              for t, x in zip(static_args, tensors)]
                    output = run_module(module, *_rebuild_arguments(leaves, spec, layout, make_dual))
                    produced, out_has_tangent, out_spec = _split_outputs(output, split_dual)
                    _check_like(produced, probe)
                    if [t.requires_grad for t in produced] != differentiable:
                        raise RuntimeError("the captured outputs' requires_grad differ from the eager run's")
                    for target, source in zip(static_outputs, produced):
                        target.copy_(source.detach())
                roots = [t for t, d in zip(produced, differentiable) if d]
                wrt = [t for t in leaves + param_leaves if t.requires_grad]
                with _capture_context(backward, pool):
                    grad_outputs = [g.clone() for g in static_grad_outputs]
                    grads = (torch.autograd.grad(roots, wrt, grad_outputs, retain_graph=True, allow_unused=True)
                             if roots and wrt else [None] * len(wrt))
                    grads = iter(grads)
                    for position, target in enumerate(static_grads):
                        if target is None:
                            continue
                        grad = next(grads)
                        if grad is None:  # unused by this block: no gradient, as in eager autograd
                            static_grads[position] = None
                        else:
                            target.copy_(grad)
    except Exception as exc:
        raise _capture_failed(module, device, "grad", exc) from exc
    position = pool.captured
    pool.captured += 1
    return _GradGraph(forward, backward, pool, position, static_args, static_params, static_outputs, out_spec,
                      out_has_tangent, differentiable, static_grad_outputs, static_grads,
                      [t.grad_fn for t in roots])
