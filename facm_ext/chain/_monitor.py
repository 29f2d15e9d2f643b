"""Counting FSDP2 all-gathers and how many units hold gathered parameters at once (tests and benchmarks)."""

from __future__ import annotations

import collections
import threading

import torch.nn as nn


class GatherMonitor:
    """Context manager that counts FSDP2 all-gathers per unit and the most units gathered at the same moment.

    A unit counts as gathered from the moment its all-gather is issued (prefetch included) until it reshards.
    ``modules`` restricts ``max_gathered`` to those units (e.g. ``model.blocks``, leaving out the root unit whose
    embedders stay gathered for the whole forward); ``gathers`` counts every unit, keyed by its module.

    Use::

        with GatherMonitor(model.blocks) as monitor:
            out, tangent = facm_ext.jvp(model, primals, tangents)
        monitor.gathers[model.blocks[3]], monitor.max_gathered
    """

    _lock = threading.Lock()
    _active: list["GatherMonitor"] = []
    _originals: dict | None = None

    def __init__(self, modules=None):
        self._watched = None if modules is None else {id(m) for m in modules}
        self.gathers: collections.Counter = collections.Counter()  # module -> number of all-gathers issued
        self.max_gathered = 0
        self.events: list[tuple[str, str]] = []  # ("gather" | "reshard", module class and id) in order
        self._gathered: set[int] = set()

    @property
    def total_gathers(self) -> int:
        return sum(self.gathers.values())

    def __enter__(self) -> "GatherMonitor":
        with GatherMonitor._lock:
            if not GatherMonitor._active:
                GatherMonitor._install()
            GatherMonitor._active.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        with GatherMonitor._lock:
            GatherMonitor._active.remove(self)
            if not GatherMonitor._active:
                GatherMonitor._uninstall()

    # ------------------------------------------------------------------------------------------------ recording
    def _watched_module(self, module: nn.Module) -> bool:
        return self._watched is None or id(module) in self._watched

    def _on_gather(self, module: nn.Module) -> None:
        self.gathers[module] += 1
        self.events.append(("gather", f"{type(module).__name__}@{id(module):x}"))
        if self._watched_module(module):
            self._gathered.add(id(module))
            self.max_gathered = max(self.max_gathered, len(self._gathered))

    def _on_reshard(self, module: nn.Module) -> None:
        self.events.append(("reshard", f"{type(module).__name__}@{id(module):x}"))
        self._gathered.discard(id(module))

    @staticmethod
    def _group_module(group) -> nn.Module:
        return group.modules[0] if getattr(group, "modules", None) else group

    @classmethod
    def _install(cls) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        originals = {name: getattr(FSDPParamGroup, name) for name in ("unshard", "_to_sharded",
                                                                      "_to_sharded_post_forward")}
        cls._originals = originals

        def unshard(group, *args, **kwargs):
            pending_before = getattr(group, "_all_gather_result", None) is not None
            result = originals["unshard"](group, *args, **kwargs)
            if not pending_before and getattr(group, "_all_gather_result", None) is not None:
                for monitor in list(cls._active):
                    monitor._on_gather(cls._group_module(group))
            return result

        def make_reshard(name):
            def reshard(group, *args, **kwargs):
                was_unsharded = group.is_unsharded
                result = originals[name](group, *args, **kwargs)
                if was_unsharded and not group.is_unsharded:
                    for monitor in list(cls._active):
                        monitor._on_reshard(cls._group_module(group))
                return result

            return reshard

        FSDPParamGroup.unshard = unshard
        FSDPParamGroup._to_sharded = make_reshard("_to_sharded")
        FSDPParamGroup._to_sharded_post_forward = make_reshard("_to_sharded_post_forward")

    @classmethod
    def _uninstall(cls) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        for name, original in (cls._originals or {}).items():
            setattr(FSDPParamGroup, name, original)
        cls._originals = None
