"""Chain-JVP: a streamed forward-mode JVP over FSDP2 (and FSDP1, and plain single-device models).

Unchanged call, FSDP2 model (``fully_shard`` on each block, then on the model)::

    out, tangent = facm_ext.jvp(lambda x, t: model(x, t, y), (x_t, t), (v, torch.ones_like(t)))

facm_ext.jvp imports this package once FSDP2 is in use, and importing it registers the FSDP2 module-call handler
(:mod:`facm_ext.chain._handler`): every ``fully_shard`` unit then runs FSDP's own pre-/post-forward on plain
primal tensors (unshard, mixed-precision cast, the post-/pre-backward hooks) while the tangents travel beside
them, so that

- each block's parameters are all-gathered once for the forward; with grad enabled the output is
  differentiable and backward gathers, accumulates and reduce-scatters exactly as after a plain forward;
- from the second call on (the first records the order of units), the next ``set_prefetch(depth)`` units
  (default 1) are all-gathered on FSDP's all-gather streams while the current block computes; at most
  ``1 + depth`` blocks hold gathered parameters at any moment (FSDP's extra retained all-gather buffer is freed
  right after each copy-out);
- an exception inside a unit leaves every unit of the tree resharded and FSDP's state idle (when all ranks
  raise at the same point, as they do for errors that do not depend on rank-local data, nothing hangs; a
  failure on one rank only leaves the others waiting in their next collective until the process group's
  timeout, as with any SPMD program).

On CUDA each unit can be replayed from CUDA graphs (``set_block_graphs(True)``; off by default; see
:mod:`facm_ext.chain._graphs` for what a block may read): in tangent mode its JVP forward, in grad mode its JVP
forward and the backward of its primal outputs. FSDP2 still gathers, prefetches, reshards and reduce-scatters,
and the host issues a handful of launches per block instead of the block's kernels one by one.

Models whose forward must be driven explicitly: ``ChainJVP(blocks, step=..., prefetch=1, mode=None, model=None,
root=None)`` with modes ``"tangent"``, ``"grad"`` and ``"hybrid"`` (JVP under no_grad, then an ordinary forward
with grad: one more gather per block; the grad mode for FSDP1 units). ``GatherMonitor(modules)`` counts FSDP2
all-gathers per unit and the most units gathered at once.
"""

from facm_ext.chain._chain import MODES, ChainJVP, default_step
from facm_ext.chain._graphs import (block_graph_failures, captured_block_graphs, reset_block_graphs,
                                   set_block_graphs)
from facm_ext.chain._handler import fsdp2_module_call, is_streamed_unit, register_with_transform, set_prefetch
from facm_ext.chain._monitor import GatherMonitor
from facm_ext.chain._seam import seam_name

__all__ = ["ChainJVP", "GatherMonitor", "MODES", "block_graph_failures", "captured_block_graphs", "default_step",
           "fsdp2_module_call", "is_streamed_unit", "register_with_transform", "reset_block_graphs", "seam_name",
           "set_block_graphs", "set_prefetch"]

register_with_transform()
