"""How the chain runtime drives one block: a plain module, an FSDP2 ``fully_shard`` unit, or an FSDP1 unit.

FSDP2 is driven through its own state machinery (``FSDPState._pre_forward`` / ``_post_forward``, the functions
its forward hooks run) on *plain* primal tensors. That is what keeps training under FSDP2 exact: the
post-backward hook (``RegisterPostBackwardFunction`` on the block inputs) and the pre-backward hooks (on the block
outputs) are attached to ordinary tensors of the primal autograd graph, so backward unshards, accumulates and
reduce-scatters exactly as after a plain forward, while the tangents travel beside them and never meet FSDP.

The private FSDP2 names used here (``_get_fsdp_state``, ``_pre_forward``, ``_post_forward``,
``_fsdp_param_groups`` / ``_fsdp_param_group``, ``FSDPParamGroup._prefetch_unshard``, ``_all_gather_result``,
``comm_ctx.all_gather_state``) exist unchanged from torch 2.6 through 2.14; each access is wrapped in one function
below so a future rename breaks in one place, with a clear error.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

PLAIN, FSDP2, FSDP1 = "plain", "fsdp2", "fsdp1"


# ------------------------------------------------------------------------------------------------ unit detection
_NOT_LOOKED_UP = object()
_fsdp2_class = _NOT_LOOKED_UP


def _fsdp2_module_class():
    """FSDPModule, or None when this torch has no FSDP2 (or no torch.distributed); looked up once: is_fsdp2_unit
    runs on every module call of a transform once the chain's handler is registered, which importing
    torch._dynamo (the transform's first call does) makes happen in every process."""
    global _fsdp2_class
    if _fsdp2_class is _NOT_LOOKED_UP:
        FSDPModule = None
        if torch.distributed.is_available():
            try:
                from torch.distributed.fsdp import FSDPModule
            except ImportError:  # torch < 2.6 kept FSDP2 under _composable
                try:
                    from torch.distributed._composable.fsdp import FSDPModule
                except ImportError:
                    FSDPModule = None
        _fsdp2_class = FSDPModule
    return _fsdp2_class


def _fsdp1_module_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def is_fsdp2_unit(module: nn.Module) -> bool:
    cls = _fsdp2_module_class()
    return cls is not None and isinstance(module, cls)


def is_fsdp1_unit(module: nn.Module) -> bool:
    cls = _fsdp1_module_class() if torch.distributed.is_available() else None
    return cls is not None and isinstance(module, cls)


def unit_kind(module: nn.Module) -> str:
    if is_fsdp2_unit(module):
        return FSDP2
    if is_fsdp1_unit(module):
        return FSDP1
    return PLAIN


def is_sharded_parameter(param: torch.Tensor) -> bool:
    """True for a parameter that FSDP2 (DTensor) or FSDP1 (flat parameter) manages."""
    if type(param).__name__ == "DTensor":
        return True
    return type(param).__name__ == "FlatParameter" or getattr(param, "_is_flat_param", False)


def nested_units(module: nn.Module) -> list[str]:
    """Names of FSDP units strictly inside ``module``."""
    return [name for name, sub in module.named_modules() if sub is not module and unit_kind(sub) != PLAIN]


# ------------------------------------------------------------------------------------------- FSDP2 state access
def fsdp2_state(module: nn.Module):
    try:
        return module._get_fsdp_state()
    except AttributeError as exc:
        raise RuntimeError(f"facm_ext.chain: this torch ({torch.__version__}) has an FSDP2 module without "
                           "_get_fsdp_state(); the chain runtime supports torch 2.6 to 2.14") from exc


def param_groups(state) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def group_is_unsharded(group) -> bool:
    return bool(group.is_unsharded)


def group_gather_pending(group) -> bool:
    return getattr(group, "_all_gather_result", None) is not None


def _training_state_enum():
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    return TrainingState


class Fsdp2Unit:
    """Drives one FSDP2 unit's forward bookkeeping on plain tensors, with prefetch and abort."""

    kind = FSDP2

    def __init__(self, module: nn.Module):
        self.module = module
        self.state = fsdp2_state(module)
        modules = getattr(self.state, "_modules", (module,))
        if len(modules) != 1:
            raise ValueError(f"blocks: {type(module).__name__} belongs to a grouped fully_shard([...]) unit of "
                             f"{len(modules)} modules; the chain needs one fully_shard call per block")

    @property
    def groups(self) -> list:
        return param_groups(self.state)

    def is_lazy_initialized(self) -> bool:
        return getattr(self.state, "_is_root", None) is not None

    def lazy_init(self) -> None:
        self.state._lazy_init()

    def is_gathered(self) -> bool:
        return any(group_is_unsharded(g) or group_gather_pending(g) for g in self.groups)

    def prefetch(self) -> None:
        """Start this unit's all-gather on FSDP's all-gather streams (FSDP's own explicit forward prefetch)."""
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        prefetch_unshard = getattr(FSDPParamGroup, "_prefetch_unshard", None)
        if prefetch_unshard is None:
            self.module.unshard(async_op=True)
            return
        for group in self.groups:
            prefetch_unshard(group, "forward")

    def pre_forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Unshard (or wait for the prefetch), cast inputs per the mixed-precision policy, hook post-backward."""
        return self.state._pre_forward(self.module, args, kwargs)

    def post_forward(self, args: tuple, output: Any, *, force_reshard: bool = True) -> Any:
        """Reshard, hook pre-backward on the (plain) outputs, cast outputs per the mixed-precision policy.

        ``force_reshard``: also reshard a unit FSDP would keep gathered (a root: FSDP keeps a root's parameters
        after forward for its backward); the chain's blocks always pass True.
        """
        comm_ctx = getattr(self.state, "_comm_ctx", None)
        order = getattr(comm_ctx, "post_forward_order", None)
        recorded_before = None if order is None else len(order)
        output = self.state._post_forward(self.module, args, output)
        if not torch.is_grad_enabled() and recorded_before is not None:
            # FSDP records each post-forward for its backward prefetch order; a pass without grad has no backward,
            # and its entries would make the next backward prefetch the wrong unit (one extra all-gather).
            _forget_post_forward_records(self.groups, order, recorded_before)
        # A unit that FSDP made its own root (no enclosing fully_shard root) keeps its parameters after forward;
        # the chain's memory bound needs them freed. Backward unshards again from its pre-backward hook.
        if force_reshard:
            for group in self.groups:
                if group_is_unsharded(group):
                    group.reshard()
        return output

    @contextlib.contextmanager
    def hooks_suspended(self) -> Iterator[None]:
        """FSDP's forward hooks off for this unit while the chain runs its forward (the chain ran them itself)."""
        hook_ids = set()
        for handle_name in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
            hook_id = getattr(getattr(self.state, handle_name, None), "id", None)
            if hook_id is not None:
                hook_ids.add(hook_id)
        snapshots = []
        for dict_name in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                          "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            hooks = getattr(self.module, dict_name, None)
            if hooks is not None and hook_ids.intersection(hooks):
                snapshots.append((hooks, list(hooks.items())))
                for hook_id in hook_ids.intersection(hooks):
                    del hooks[hook_id]
        try:
            yield
        finally:
            # Put FSDP's hooks back at their positions (its pre-hook runs first), keeping hooks the step added
            # and not resurrecting any it removed.
            for hooks, before in snapshots:
                current = dict(hooks)
                hooks.clear()
                for hook_id, value in before:
                    if hook_id in hook_ids or hook_id in current:
                        hooks[hook_id] = current.get(hook_id, value)
                for hook_id, value in current.items():
                    if hook_id not in hooks:
                        hooks[hook_id] = value

    def abort(self) -> None:
        """After an exception: finish any in-flight all-gather, reshard, and reset the forward state to IDLE."""
        training_state = _training_state_enum()
        for group in self.groups:
            if group_gather_pending(group):
                with group.use_training_state(training_state.IDLE):
                    group.wait_for_unshard()
            if not group.is_sharded:
                with group.use_training_state(training_state.IDLE):
                    group.reshard()
            group._training_state = training_state.IDLE
        self.state._training_state = training_state.IDLE
        comm_ctx = getattr(self.state, "_comm_ctx", None)
        gather_state = getattr(comm_ctx, "all_gather_state", None)
        if gather_state is not None:
            self.release_last_gather_buffer()
        state_ctx = getattr(self.state, "_state_ctx", None)
        if state_ctx is not None and state_ctx.iter_forward_root is not None:
            state_ctx.iter_forward_root._training_state = training_state.IDLE
            state_ctx.iter_forward_root = None
        # The failed pass will have no backward: drop its backward-prefetch records (as FSDP's reset_iter_state).
        order = getattr(comm_ctx, "post_forward_order", None)
        if order is not None:
            order.clear()
        for group in self.groups:
            indices = getattr(group, "_post_forward_indices", None)
            if indices is not None:
                indices.clear()

    def release_last_gather_buffer(self) -> None:
        """Free the all-gather output FSDP keeps after a forward copy-out (what the root's post-forward does).

        FSDP keeps it until the next unit's copy-out so that the next all-gather's copy-in cannot reuse memory the
        current copy-out still reads; the chain frees it right after the copy-out instead (the all-gather streams
        wait for the copy-out event), so gathered memory stays at 1 + prefetch blocks rather than one more.
        """
        comm_ctx = getattr(self.state, "_comm_ctx", None)
        gather_state = getattr(comm_ctx, "all_gather_state", None)
        if gather_state is None:
            return
        if gather_state.event is not None:
            comm_ctx.all_gather_copy_in_stream.wait_event(gather_state.event)
            comm_ctx.all_gather_stream.wait_event(gather_state.event)
        comm_ctx.all_gather_state = None


def _forget_post_forward_records(groups, order: list, keep: int) -> None:
    for group in groups:
        indices = getattr(group, "_post_forward_indices", None)
        while indices and indices[-1] >= keep:
            indices.pop()
    del order[keep:]


class Fsdp1Unit:
    """An FSDP1 unit: full parameters for its forward through ``summon_full_params(unit, recurse=False)``."""

    kind = FSDP1

    def __init__(self, module: nn.Module):
        self.module = module

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[nn.Module]:
        fsdp_cls = _fsdp1_module_class()
        with fsdp_cls.summon_full_params(self.module, recurse=False, writeback=False):
            yield self.module.module


def make_unit(module: nn.Module):
    kind = unit_kind(module)
    if kind == FSDP2:
        return Fsdp2Unit(module)
    if kind == FSDP1:
        return Fsdp1Unit(module)
    return None
