"""ChainJVP: the JVP of a chain of blocks, one block's parameters gathered at a time, the next ones prefetched."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from facm_ext.chain import _units
from facm_ext.chain._seam import block_jvp, match_tangent

MODES = ("tangent", "grad", "hybrid")

# Modules whose FSDP bookkeeping the chain is running right now: the transform's FSDP2 module-call handler must
# leave them alone (see facm_ext.chain._handler).
DRIVEN_MODULES: set[int] = set()


def default_step(block: nn.Module, carry, *context, **kwargs):
    """``block(carry, *context, **kwargs)``: the carry is the block's first argument and its whole output."""
    return block(carry, *context, **kwargs)


class ChainJVP:
    """Forward-mode JVP of ``carry -> step(blocks[-1], ... step(blocks[0], carry, *context) ..., *context)``.

    Each block's parameters are gathered once (FSDP2 ``fully_shard`` units: all-gather; FSDP1 units:
    ``summon_full_params(unit, recurse=False)``; plain modules: nothing to gather), the all-gathers of the next
    ``prefetch`` FSDP2 blocks are issued before the current block computes, so they overlap its compute, and no
    more than ``1 + prefetch`` blocks hold gathered parameters at any moment. Inside each block the JVP runs on
    plain tensors through facm_ext's fused transform (``torch.func.jvp`` when the transform is not importable).
    With ``facm_ext.chain.set_block_graphs(True)``, an FSDP2 block that the step calls as ``block(...)`` is
    replayed from CUDA graphs, as in the transform's own streaming of FSDP2 models.

    Args:
        blocks: the ordered blocks (``nn.Module``); all FSDP2 units, all FSDP1 units, or plain modules (a plain
            module between FSDP units is allowed only if none of its parameters is sharded).
        step: ``step(block, carry, *context, **kwargs) -> new carry`` with the carry's structure (default:
            ``block(carry, *context, **kwargs)``). It may call ``block(...)``: the chain already ran FSDP's
            forward bookkeeping, so the block's FSDP hooks are suspended during the step. FSDP1 units are passed
            as their wrapped module (``unit.module``) under ``summon_full_params``.
        prefetch: how many following FSDP2 blocks to all-gather ahead (0: none; FSDP1 units are not prefetched).
        mode: ``"tangent"`` (no graph; detached outputs), ``"grad"`` (the output is differentiable and backward
            produces FSDP's usual gradients and reduce-scatters; each block gathered once for the forward),
            ``"hybrid"`` (the JVP under no_grad, then an ordinary forward with grad: one more gather per block;
            the only grad mode for FSDP1 units), or None: ``"grad"`` when grad mode is on, else ``"tangent"``.
        model: optional module whose parameters the blocks must cover exactly once (checked at construction);
            if it is an FSDP2 unit it is also used as ``root``.
        root: optional FSDP2 root (a ``fully_shard`` module containing the blocks, e.g. the whole model whose
            embedders stay outside the chain). It is lazily initialized first, as its own forward would, so the
            blocks share its streams; without it, blocks never run through a root become their own FSDP roots
            (after which that root can no longer be initialized: pass it here if you will also call it).

    Call: ``chain(carry, carry_tangent, *context, context_tangents=None, **kwargs) -> (carry_out, tangent_out)``.
    ``carry``: a tensor or a pytree (tuple/list/dict) of tensors, e.g. tokens [B, L, C] float; ``carry_tangent``:
    None (zero) or the same structure with tensors of the same shapes (None leaves: zero). ``context``: extra
    positional arguments every step receives unchanged (e.g. conditioning c [B, C] float, RoPE tables [L, D]);
    ``context_tangents``: None or one entry per context argument (tensor or None). ``kwargs``: constant keyword
    arguments (no tangents), e.g. key lengths [B] long. ``tangent_out`` has ``carry_out``'s structure and never
    carries a graph; in ``"tangent"`` mode ``carry_out`` is detached too.
    """

    def __init__(self, blocks: Sequence[nn.Module], *, step: Callable | None = None, prefetch: int = 1,
                 mode: str | None = None, model: nn.Module | None = None, root: nn.Module | None = None):
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"blocks: expected a sequence of nn.Module, got a single {type(blocks).__name__}")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks: expected at least one nn.Module, got an empty sequence")
        for index, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise ValueError(f"blocks[{index}]: expected an nn.Module, got {type(block).__name__}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch: expected an int >= 0, got {prefetch!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)} or None, got {mode!r}")
        if step is not None and not callable(step):
            raise ValueError(f"step: expected a callable step(block, carry, *context), got {type(step).__name__}")
        _check_blocks(blocks, model)
        self.blocks = blocks
        self.step = step or default_step
        self.prefetch = prefetch
        self.mode = mode
        self.model = model
        if root is not None and not _units.is_fsdp2_unit(root):
            raise ValueError(f"root: expected the fully_shard root module containing the blocks, got "
                             f"{type(root).__name__}, which is not an FSDP2 unit")
        self.root = root
        self.units = [_units.make_unit(block) for block in blocks]
        kinds = {unit.kind for unit in self.units if unit is not None}
        if len(kinds) > 1:
            raise ValueError("blocks: mixes FSDP1 and FSDP2 units; use one FSDP version for the whole chain")
        self.kind = kinds.pop() if kinds else _units.PLAIN
        if self.kind == _units.FSDP1 and mode == "grad":
            raise ValueError("mode: 'grad' needs FSDP2 units or plain blocks (FSDP1's summon_full_params gives "
                             "parameters that FSDP1 cannot reduce gradients from); use mode='hybrid' for FSDP1")

    # ------------------------------------------------------------------------------------------------- call
    def __call__(self, carry, carry_tangent=None, *context, context_tangents=None, **kwargs):
        mode = self.mode or ("grad" if torch.is_grad_enabled() else "tangent")
        if self.kind == _units.FSDP1 and mode == "grad":
            mode = "hybrid"
        carry_leaves, carry_spec = pytree.tree_flatten(carry)
        carry_tangent_leaves = _check_tangent_tree("carry_tangent", carry_tangent, carry_leaves, carry_spec)
        if context_tangents is None:
            context_tangents = (None,) * len(context)
        context_tangents = tuple(context_tangents)
        if len(context_tangents) != len(context):
            raise ValueError(f"context_tangents: expected {len(context)} entries (one per context argument), got "
                             f"{len(context_tangents)}")
        for index, (value, tangent) in enumerate(zip(context, context_tangents)):
            if tangent is not None:
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"context_tangents[{index}]: context argument {index} is a "
                                     f"{type(value).__name__}, not a tensor, so it cannot have a tangent")
                _check_leaf_tangent(f"context_tangents[{index}]", tangent, value)
        self._prepare()
        if mode == "hybrid":
            with torch.no_grad():
                _, tangent_out = self._run(carry, carry_leaves, carry_spec, carry_tangent_leaves, context,
                                           context_tangents, kwargs, mode="tangent")
            carry_out = self._plain_forward(carry, carry_spec, context, kwargs)
            return carry_out, tangent_out
        if mode == "tangent":
            with torch.no_grad():
                carry_out, tangent_out = self._run(carry, carry_leaves, carry_spec, carry_tangent_leaves, context,
                                                   context_tangents, kwargs, mode=mode)
            return pytree.tree_map(_detach, carry_out), tangent_out
        return self._run(carry, carry_leaves, carry_spec, carry_tangent_leaves, context, context_tangents, kwargs,
                         mode=mode)

    # -------------------------------------------------------------------------------------------------- internals
    def _prepare(self) -> None:
        if self.kind != _units.FSDP2:
            return
        for root in (self.root, self.model):
            if root is not None and _units.is_fsdp2_unit(root):
                root_unit = _units.Fsdp2Unit(root)
                if not root_unit.is_lazy_initialized():
                    root_unit.lazy_init()
        # Blocks outside any initialized root become their own FSDP roots (FSDP's rule for a unit run alone);
        # all of them are initialized before the first all-gather so a prefetch finds its streams.
        for unit in self.units:
            if unit is not None and unit.kind == _units.FSDP2 and not unit.is_lazy_initialized():
                unit.lazy_init()

    def _run(self, carry, carry_leaves, carry_spec, carry_tangent_leaves, context, context_tangents, kwargs, *,
             mode):
        n_carry = len(carry_leaves)
        primal_leaves = list(carry_leaves)
        tangent_leaves = list(carry_tangent_leaves)
        fsdp2_units = [u for u in self.units if u is not None and u.kind == _units.FSDP2]
        try:
            for index, (block, unit) in enumerate(zip(self.blocks, self.units)):
                current_carry = pytree.tree_unflatten(primal_leaves, carry_spec)
                args = (current_carry, *context)
                if unit is None:
                    out, out_tangent = self._block(block, block, args, tangent_leaves, context_tangents, kwargs)
                elif unit.kind == _units.FSDP1:
                    with unit.full_parameters() as inner:
                        out, out_tangent = self._block(block, inner, args, tangent_leaves, context_tangents,
                                                       kwargs)
                else:
                    args, step_kwargs = unit.pre_forward(args, kwargs)
                    unit.release_last_gather_buffer()
                    self._prefetch_after(index)
                    DRIVEN_MODULES.add(id(block))
                    try:
                        with unit.hooks_suspended():
                            out, out_tangent = self._block(block, block, args, tangent_leaves, context_tangents,
                                                           step_kwargs)
                    finally:
                        DRIVEN_MODULES.discard(id(block))
                    out = unit.post_forward(args, out)
                primal_leaves, tangent_leaves = self._next_carry(index, out, out_tangent, carry_spec, n_carry)
            if fsdp2_units:
                fsdp2_units[-1].release_last_gather_buffer()
        except BaseException:
            for unit in fsdp2_units:
                unit.abort()
            raise
        return (pytree.tree_unflatten(primal_leaves, carry_spec),
                pytree.tree_unflatten(tangent_leaves, carry_spec))

    def _block(self, block, callee, args, carry_tangent_leaves, context_tangents, kwargs):
        """JVP of one step on plain tensors; ``args`` = (carry, *context) after FSDP's input handling."""
        carry_in, *context_in = args
        carry_leaves, carry_spec = pytree.tree_flatten(carry_in)
        tangents = [match_tangent(t, p) for t, p in zip(carry_tangent_leaves, carry_leaves)]
        tangents += [match_tangent(t, p) for t, p in zip(context_tangents, context_in)]
        primals = list(carry_leaves) + list(context_in)
        n_carry = len(carry_leaves)

        def step_of_leaves(*leaves):
            carry_value = pytree.tree_unflatten(list(leaves[:n_carry]), carry_spec)
            return self.step(callee, carry_value, *leaves[n_carry:], **kwargs)

        return block_jvp(step_of_leaves, primals, tangents)

    def _next_carry(self, index, out, out_tangent, carry_spec, n_carry):
        out_leaves, out_spec = pytree.tree_flatten(out)
        if out_spec != carry_spec:
            raise ValueError(f"step: block {index} ({type(self.blocks[index]).__name__}) returned a carry of "
                             f"structure {out_spec}, expected the input carry's structure {carry_spec}")
        tangent_leaves, _ = pytree.tree_flatten(out_tangent)
        tangent_leaves = [match_tangent(t, p) for t, p in zip(tangent_leaves, out_leaves)]
        return out_leaves, tangent_leaves

    def _prefetch_after(self, index: int) -> None:
        for ahead in range(index + 1, min(index + 1 + self.prefetch, len(self.units))):
            unit = self.units[ahead]
            if unit is not None and unit.kind == _units.FSDP2 and not unit.is_gathered():
                unit.prefetch()

    def _plain_forward(self, carry, carry_spec, context, kwargs):
        """The ordinary forward with grad (hybrid mode's second pass): FSDP's own hooks gather each block."""
        for index, block in enumerate(self.blocks):
            carry = self.step(block, carry, *context, **kwargs)
            if pytree.tree_structure(carry) != carry_spec:
                raise ValueError(f"step: block {index} ({type(block).__name__}) returned a carry of structure "
                                 f"{pytree.tree_structure(carry)}, expected {carry_spec}")
        return carry


# --------------------------------------------------------------------------------------------------- validation
def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _check_leaf_tangent(name: str, tangent, primal) -> None:
    if not isinstance(tangent, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor or None, got {type(tangent).__name__}")
    if not isinstance(primal, torch.Tensor):
        raise ValueError(f"{name}: its primal is a {type(primal).__name__}, not a tensor, so it cannot have a "
                         "tangent")
    if tangent.shape != primal.shape:
        raise ValueError(f"{name}: tangent shape {tuple(tangent.shape)} differs from its primal's shape "
                         f"{tuple(primal.shape)}")
    if not (tangent.is_floating_point() or tangent.is_complex()):
        raise ValueError(f"{name}: expected a floating-point tangent, got {tangent.dtype}")


def _check_tangent_tree(name: str, tangent, primal_leaves, primal_spec) -> list:
    if tangent is None:
        return [None] * len(primal_leaves)
    tangent_leaves, tangent_spec = pytree.tree_flatten(tangent)
    if tangent_spec != primal_spec:
        raise ValueError(f"{name}: tangent structure {tangent_spec} does not match the carry's structure "
                         f"{primal_spec}")
    for index, (t, p) in enumerate(zip(tangent_leaves, primal_leaves)):
        if t is not None:
            _check_leaf_tangent(f"{name} (leaf {index})", t, p)
    return tangent_leaves


def _check_blocks(blocks: list[nn.Module], model: nn.Module | None) -> None:
    seen_blocks: dict[int, int] = {}
    owner: dict[int, tuple[int, str]] = {}
    for index, block in enumerate(blocks):
        if id(block) in seen_blocks:
            raise ValueError(f"blocks: blocks[{index}] is the same module as blocks[{seen_blocks[id(block)]}] "
                             f"({type(block).__name__}); each block must appear once")
        seen_blocks[id(block)] = index
        kind = _units.unit_kind(block)
        nested = _units.nested_units(block)
        if nested:
            raise ValueError(f"blocks[{index}] ({type(block).__name__}): contains FSDP units of its own "
                             f"({', '.join(nested[:3])}); give the chain those units as blocks instead")
        for name, param in block.named_parameters():
            if id(param) in owner:
                other, other_name = owner[id(param)]
                raise ValueError(f"blocks: parameter '{name}' of blocks[{index}] ({type(block).__name__}) is "
                                 f"also '{other_name}' of blocks[{other}]; a parameter must belong to one block")
            owner[id(param)] = (index, name)
            if kind == _units.PLAIN and _units.is_sharded_parameter(param):
                raise ValueError(f"blocks[{index}] ({type(block).__name__}): is not an FSDP unit, but its "
                                 f"parameter '{name}' is sharded by an enclosing FSDP unit; apply fully_shard to "
                                 "each block (or pass the unit that owns it as the block)")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module or None, got {type(model).__name__}")
        missing = [name for name, param in model.named_parameters() if id(param) not in owner]
        if missing:
            shown = ", ".join(f"'{n}'" for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"blocks: miss {len(missing)} parameter(s) of model ({type(model).__name__}): "
                             f"{shown}; every parameter must belong to exactly one block")
        model_params = {id(p) for p in model.parameters()}
        foreign = [(index, name) for pid, (index, name) in owner.items() if pid not in model_params]
        if foreign:
            index, name = foreign[0]
            raise ValueError(f"blocks: blocks[{index}] parameter '{name}' is not a parameter of model "
                             f"({type(model).__name__})")

