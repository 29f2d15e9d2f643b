"""Chain-JVP: a streamed forward-mode JVP over FSDP2 (and FSDP1, and plain single-device models).

- ``facm_ext.jvp(model, primals, tangents)`` on a model sharded with FSDP2 ``fully_shard`` per block streams
  with no change to the call: importing this package registers the FSDP2 module-call handler with the transform
  (:mod:`facm_ext.chain._handler`); ``set_prefetch(depth)`` sets how many units it all-gathers ahead.
- ``ChainJVP(blocks, step=..., prefetch=1, mode=None, model=None, root=None)``: the explicit API for a chain of
  blocks whose forward must be driven by the caller.
- ``GatherMonitor(modules)``: counts FSDP2 all-gathers and the most units gathered at once (tests, benchmarks).
"""

from facm_ext.chain._chain import MODES, ChainJVP, default_step
from facm_ext.chain._handler import fsdp2_module_call, is_streamed_unit, register_with_transform, set_prefetch
from facm_ext.chain._monitor import GatherMonitor
from facm_ext.chain._seam import seam_name

__all__ = ["ChainJVP", "GatherMonitor", "MODES", "default_step", "fsdp2_module_call", "is_streamed_unit",
           "register_with_transform", "seam_name", "set_prefetch"]

register_with_transform()
