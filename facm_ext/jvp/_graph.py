"""``facm_ext.jvp.graph``: facm_ext.jvp captured once in a CUDA graph and replayed.

Why: at the batch sizes consistency models train with per GPU (LightningDiT-XL at 16 x 256 tokens), one eager
facm_ext.jvp issues ~1,700 kernels from Python and the GPU waits on the host most of the time
(benchmarks/profile_overhead.py: 31 ms of kernels in a 103 ms call on an H200). Replaying a captured graph
issues them with one call. Two modes, picked by ``torch.is_grad_enabled()`` when the graph is made:

- no grad: one graph of the JVP; each call copies the primals and tangents into the captured input buffers,
  replays, and returns the captured output buffers (overwritten by the next call; clone them to keep them).
- grad: ``torch.cuda.make_graphed_callables`` captures the JVP's forward and the backward of ``out`` into two
  graphs; ``out`` is differentiable and its backward accumulates the gradients of ``module``'s parameters (and of
  primals that require grad), as the eager transform does. The tangent output carries no graph.

Constraints (those of CUDA graphs): fixed shapes, dtypes and devices; no host synchronization inside ``func``;
no hooks on ``module`` (so no FSDP: use facm_ext.chain there); make the graph under the autocast the calls run
with, with ``cache_enabled=False``; ``func`` must read parameters of ``module`` only (weights of other modules
are frozen into the graph as constants of their current storage). The first call warms up (Triton autotuning,
cuBLAS workspaces) on a side stream before capturing.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._dual import STATE


class _JVPModule(nn.Module):
    """The JVP of ``func`` as a module of flat tensor arguments (primals then tangents), owning ``module`` so that
    make_graphed_callables sees its parameters."""

    def __init__(self, func: Callable, module: Optional[nn.Module], spec, count: int, transform: Callable):
        super().__init__()
        self.inner = module
        self._func, self._spec, self._count, self._transform = func, spec, count, transform

    def forward(self, *flat):
        primals = tree_unflatten(list(flat[: self._count]), self._spec)
        tangents = tree_unflatten(list(flat[self._count:]), self._spec)
        # A replay costs no host time, so adaLN blocks take the per-op path, whose kernels take the least GPU time
        # (the native block op saves host time only); warm-ups and capture then run the same kernels, so the Triton
        # autotuning of the warm-ups covers what the capture launches.
        previous, STATE.per_op_blocks = STATE.per_op_blocks, True
        try:
            out, tangent_out = self._transform(self._func, primals, tangents)
        finally:
            STATE.per_op_blocks = previous
        return out, tangent_out


class GraphedJVP:
    """``graphed(primals, tangents) -> (out, tangent_out)``: replays the JVP captured by :func:`graph`."""

    def __init__(self, func: Callable, primals: tuple, tangents: tuple, *, module: Optional[nn.Module],
                 warmup: int, transform: Callable):
        primal_leaves, spec = tree_flatten(tuple(primals))
        tangent_leaves, tangent_spec = tree_flatten(tuple(tangents))
        if tangent_spec != spec:
            raise ValueError(f"tangents: expected the structure of primals {spec}, got {tangent_spec}")
        leaves = primal_leaves + tangent_leaves
        for i, leaf in enumerate(leaves):
            where = f"primals[{i}]" if i < len(primal_leaves) else f"tangents[{i - len(primal_leaves)}]"
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(f"{where}: a CUDA graph needs tensors (None tangents: pass zeros), got "
                                 f"{type(leaf).__name__}")
            if not leaf.is_cuda:
                raise ValueError(f"{where}: a CUDA graph needs CUDA tensors, got one on {leaf.device}")
        if module is not None and not isinstance(module, nn.Module):
            raise ValueError(f"module: expected an nn.Module or None, got {type(module).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup: expected at least 1 iteration, got {warmup}")
        self._spec, self._count = spec, len(primal_leaves)
        self.grad = torch.is_grad_enabled()
        self._shapes = [(tuple(t.shape), t.dtype, t.device) for t in leaves]
        wrapper = _JVPModule(func, module, spec, len(primal_leaves), transform)
        if self.grad:
            static = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in leaves)
            self._graphed = torch.cuda.make_graphed_callables(wrapper, static, num_warmup_iters=warmup,
                                                              allow_unused_input=True)
            self._static_inputs = None
        else:
            self._static_inputs = [t.detach().clone() for t in leaves]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    wrapper(*self._static_inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_outputs = wrapper(*self._static_inputs)

    def __call__(self, primals: tuple, tangents: tuple):
        primal_leaves, spec = tree_flatten(tuple(primals))
        tangent_leaves, tangent_spec = tree_flatten(tuple(tangents))
        if spec != self._spec or tangent_spec != self._spec:
            raise ValueError(f"primals/tangents: expected the captured structure {self._spec}")
        leaves = primal_leaves + tangent_leaves
        for i, (leaf, (shape, dtype, device)) in enumerate(zip(leaves, self._shapes)):
            if not isinstance(leaf, torch.Tensor) or tuple(leaf.shape) != shape or leaf.dtype != dtype \
                    or leaf.device != device:
                got = (f"{tuple(leaf.shape)} {leaf.dtype} on {leaf.device}" if isinstance(leaf, torch.Tensor)
                       else type(leaf).__name__)
                raise ValueError(f"input {i}: expected the captured {shape} {dtype} on {device}, got {got}")
        if self.grad:
            out, tangent_out = self._graphed(*leaves)
            # make_graphed_callables returns every output from one autograd node; the tangent carries no graph.
            return out, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tangent_out)
        for static, leaf in zip(self._static_inputs, leaves):
            static.copy_(leaf)
        self._graph.replay()
        return self._static_outputs


def graph(func: Callable, primals: tuple, tangents: tuple, *, module: Optional[nn.Module] = None,
          warmup: int = 3) -> GraphedJVP:
    """Capture ``facm_ext.jvp(func, primals, tangents)`` in a CUDA graph; returns a callable that replays it.

    Args:
        func: as for facm_ext.jvp; reads the parameters of ``module`` (and no other module's).
        primals, tangents: example inputs (tuples of CUDA tensors, same structure; no None tangents), giving the
            shapes, dtypes and requires_grad flags every later call must have.
        module: the nn.Module whose parameters get gradients in grad mode (usually the model ``func`` calls).
            No hooks may be registered on it.
        warmup: eager iterations on a side stream before the capture.
    Returns:
        :class:`GraphedJVP`; ``graphed(primals, tangents)`` -> ``(out, tangent_out)`` as facm_ext.jvp returns them.
        Grad mode is ``torch.is_grad_enabled()`` at this call.
    """
    from . import jvp as transform

    if not callable(func):
        raise ValueError(f"func: expected a callable, got {type(func).__name__}")
    if not torch.cuda.is_available():
        raise ValueError("facm_ext.jvp.graph needs CUDA (CUDA graphs); call facm_ext.jvp directly on the CPU")
    return GraphedJVP(func, primals, tangents, module=module, warmup=warmup, transform=transform)
