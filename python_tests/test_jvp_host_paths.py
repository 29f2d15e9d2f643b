"""The transform's host-cost shortcuts (benchmarks/profile_host_cpu.py) against the paths they shortcut and against
torch.func.jvp (float64, CPU): the single-dual fallback of views and first-argument-linear ops, argument binding of
the fused rules, the eager autograd.Function of the custom ops, the light autocast switch of the op bodies, the
hook check of pattern modules, the once-per-call reads of the environment switches and the validation helpers."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import facm_ext
from facm_ext.jvp import JVPTransformError, make_dual, split_dual
from facm_ext.jvp import _dual, _modules, _rules
from facm_ext.ops import _common

from conftest import assert_rel_close, noncontiguous

F64 = torch.float64


def randn(*shape, dtype=F64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


# ------------------------------------------------------------------ views and ops linear in the first argument
# One dual (the first argument) and anything else constant: the shortcut in fallback() takes these.
SINGLE_DUAL_OPS = {
    "reshape": lambda x: x.reshape(3, 2, 2, 8),
    "reshape_tuple": lambda x: x.reshape((12, 8)),
    "view_size": lambda x: x.view(torch.Size([12, 8])),
    "permute": lambda x: x.permute(2, 0, 1),
    "transpose": lambda x: x.transpose(0, 2),
    "flatten_unflatten": lambda x: x.flatten(1).unflatten(1, (4, 8)),
    "chunk": lambda x: x.chunk(3, dim=-1),
    "split_sizes": lambda x: x.split([1, 3, 4], dim=-1),
    "unbind": lambda x: x.unbind(1),
    "getitem": lambda x: x[:, 1:, ::2],
    "getitem_tensor": lambda x: x[torch.tensor([2, 0])],
    "index_select": lambda x: x.index_select(-1, torch.tensor([3, 1, 1])),
    "expand": lambda x: x[:, :1].expand(3, 5, 8),
    "squeeze_unsqueeze": lambda x: x.unsqueeze(1).squeeze(1).movedim(0, -1),
    "narrow_select": lambda x: x.narrow(2, 1, 4).select(0, 1),
    "contiguous_copy": lambda x: x.transpose(0, 1).contiguous(),
    "contiguous_noop": lambda x: x.contiguous(),
    "to_same_dtype": lambda x: x.to(F64),
    "float_double": lambda x: x.float().double(),
    "sum_mean": lambda x: x.sum(-1, keepdim=True) + x.mean(dim=(0, 1)),
    "cumsum_roll_flip": lambda x: x.cumsum(1).roll(2, dims=-1).flip(0),
    "repeat_tile": lambda x: x.repeat(1, 2, 1) + x.tile((1, 2, 1)),
    "neg_clone": lambda x: -x.clone(),
    "tril": lambda x: x.tril(diagonal=1),
    "view_as_other": lambda x: x.reshape(12, 8).view_as(torch.empty(2, 6, 8)),
}


def _general_only(monkeypatch):
    """Make fallback() take its general path (pytree flattening, per-kind rules) for every call."""
    monkeypatch.setattr(_dual, "_only_first_is_dual", lambda args, kwargs: False)


@pytest.mark.parametrize("name", sorted(SINGLE_DUAL_OPS))
def test_single_dual_shortcut_matches_torch_func_and_the_general_path(monkeypatch, name):
    op = SINGLE_DUAL_OPS[name]
    x, tx = randn(3, 4, 8), randn(3, 4, 8)
    out, tout = facm_ext.jvp(op, (x,), (tx,))
    ref, tref = torch.func.jvp(op, (x,), (tx,))
    for o, t, r, tr in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(tout),
                           torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(tref)):
        assert_rel_close(o, r, F64, what=f"{name} primal")
        assert_rel_close(t, tr, F64, what=f"{name} tangent")
        assert not t.requires_grad

    # The shortcut and the general path on the same dual: same outputs, tangents and memory-sharing flags.
    def run(general: bool):
        if general:
            _general_only(monkeypatch)
        else:
            monkeypatch.undo()
        dual = make_dual(x, tx)
        result = op(dual)
        leaves = result if isinstance(result, (tuple, list)) else (result,)
        return [(split_dual(r)[0], split_dual(r)[1], getattr(r, "_facm_shares_memory", None)) for r in leaves], \
            dual._facm_shares_memory

    _modules.install()
    _dual.STATE.depth += 1
    try:
        fast, fast_flag = run(general=False)
        general, general_flag = run(general=True)
    finally:
        _dual.STATE.depth -= 1
        _modules.uninstall()
        monkeypatch.undo()
    assert fast_flag == general_flag, "the input's memory-sharing flag"
    assert len(fast) == len(general)
    for (p1, t1, f1), (p2, t2, f2) in zip(fast, general):
        assert torch.equal(p1, p2) and f1 == f2
        assert (t1 is None) == (t2 is None) and (t1 is None or torch.equal(t1, t2))


METADATA_SECOND_OPS = {
    "type_as": lambda x, y: x.type_as(y.float()),
    "view_as": lambda x, y: x.reshape(12, 8).view_as(y),
    "expand_as": lambda x, y: x[:1].expand_as(y),
    "reshape_as": lambda x, y: x.transpose(0, 1).reshape_as(y),
}


@pytest.mark.parametrize("name", sorted(METADATA_SECOND_OPS))
def test_metadata_argument_with_a_tangent_takes_the_shortcut(monkeypatch, name):
    """x.type_as(y) and the like with y a dual carrying a tangent: the general path runs torch.func.jvp of the op;
    the shortcut applies the op to x's tangent. Same tangents, same flags."""
    op = METADATA_SECOND_OPS[name]
    x, tx, y, ty = randn(3, 4, 8), randn(3, 4, 8), randn(3, 4, 8), randn(3, 4, 8)
    out, tout = facm_ext.jvp(op, (x, y), (tx, ty))
    ref, tref = torch.func.jvp(op, (x, y), (tx, ty))
    assert_rel_close(out, ref, F64, what="primal")
    assert tout.dtype == ref.dtype
    assert_rel_close(tout.double(), tref.double(), F64, what="tangent")

    def run():
        a, b = make_dual(x, tx), make_dual(y, ty)
        result = op(a, b)
        return split_dual(result), result._facm_shares_memory, a._facm_shares_memory, b._facm_shares_memory

    _modules.install()
    _dual.STATE.depth += 1
    try:
        fast = run()
        monkeypatch.setattr(_dual, "_METADATA_SECOND_ARG_NAMES", set())
        general = run()
    finally:
        _dual.STATE.depth -= 1
        _modules.uninstall()
        monkeypatch.undo()
    (p1, t1), *flags1 = fast
    (p2, t2), *flags2 = general
    assert torch.equal(p1, p2) and torch.equal(t1, t2) and t1.dtype == t2.dtype
    assert flags1 == flags2


def test_single_dual_shortcut_keeps_gradients_and_in_place_rules():
    w = randn(8, 8, requires_grad=True)
    x, tx = randn(3, 4, 8, requires_grad=True), randn(3, 4, 8)

    def f(x):
        h = F.linear(x, w).transpose(0, 1).reshape(4, 24)
        a, b = h.chunk(2, dim=-1)
        return (a * b.float().double()).sum(-1)

    out, tout = facm_ext.jvp(f, (x,), (tx,))
    ref, tref = torch.func.jvp(f, (x,), (tx,))
    assert_rel_close(tout, tref, F64, what="tangent")
    grads = torch.autograd.grad(out.square().sum(), (x, w))
    plain_grads = torch.autograd.grad(f(x).square().sum(), (x, w))
    for g, pg in zip(grads, plain_grads):
        assert_rel_close(g, pg, F64, what="gradient through the shortcut's primal")

    def writes_into_a_view(x):
        h = x * 2
        v = h.view(-1)
        v.mul_(3)  # a view of h was taken: its tangent could not be kept in step
        return h

    with pytest.raises(JVPTransformError, match="shares memory"):
        facm_ext.jvp(writes_into_a_view, (x.detach(),), (tx,))


def test_shortcut_not_taken_with_a_second_dual_or_nested_containers():
    x, y, tx, ty = randn(2, 6), randn(2, 6), randn(2, 6), randn(2, 6)
    cases = {
        "second dual positional": lambda x, y: x.expand_as(y) * 1.0 + torch.cat([x, y], -1)[..., :6],
        "dual inside a list": lambda x, y: torch.stack([x, y]).sum(0),
        "dual as kwarg": lambda x, y: x.view_as(other=y),
    }
    for name, f in cases.items():
        out, tout = facm_ext.jvp(f, (x, y), (tx, ty))
        ref, tref = torch.func.jvp(f, (x, y), (tx, ty))
        assert_rel_close(tout, tref, F64, what=name)


# --------------------------------------------------------------------------------------- fused-rule binding
def test_bind_positional_shortcut_equals_keyword_binding():
    names, defaults = ("input", "weight", "bias", "eps"), (None, 1e-5)
    x, w = object(), object()
    assert _rules._bind((x, w), {}, names, defaults) == [x, w, None, 1e-5]
    assert _rules._bind((x, w, 3), {}, names, defaults) == [x, w, 3, 1e-5]
    assert _rules._bind((x, w, 3, 4), {}, names, defaults) == [x, w, 3, 4]
    assert _rules._bind((x,), {"weight": w, "eps": 2}, names, defaults) == [x, w, None, 2]
    assert _rules._bind((x,), {}, names, defaults) == [x, None, None, 1e-5]  # a required one missing: None


@pytest.mark.parametrize("grad", [False, True])
def test_fused_rules_positional_and_keyword_calls_agree(grad):
    x, tx = randn(2, 5, 16, requires_grad=grad), randn(2, 5, 16)
    w, b = randn(12, 16, requires_grad=grad), randn(12, requires_grad=grad)
    q, tq = randn(2, 3, 5, 8), randn(2, 3, 5, 8)
    calls = {
        "linear": (lambda x: F.linear(x, w, b), lambda x: F.linear(input=x, weight=w, bias=b)),
        "linear_no_bias": (lambda x: F.linear(x, w), lambda x: F.linear(x, weight=w, bias=None)),
        "layer_norm": (lambda x: F.layer_norm(x, (16,), None, None, 1e-6),
                       lambda x: F.layer_norm(x, normalized_shape=(16,), eps=1e-6)),
        "gelu": (lambda x: F.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    }
    for name, (positional, keyword) in calls.items():
        ref, tref = torch.func.jvp(positional, (x.detach(),), (tx,))
        for f in (positional, keyword):
            out, tout = facm_ext.jvp(f, (x,), (tx,))
            assert_rel_close(out, ref, F64, what=f"{name} primal")
            assert_rel_close(tout, tref, F64, what=f"{name} tangent")
            assert tout.grad_fn is None and not tout.requires_grad
            assert out.requires_grad == grad
    sdpa = lambda q: F.scaled_dot_product_attention(q, q * 0.5, q, None, 0.0, False, scale=0.3)  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):  # the only CPU backend with a forward-mode rule
        ref, tref = torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, q * 0.5, q, scale=0.3), (q,), (tq,))
    out, tout, report = facm_ext.jvp(sdpa, (q,), (tq,), report=True)
    assert_rel_close(tout, tref, F64, what="sdpa positional tangent")
    assert report.fused.get("F.scaled_dot_product_attention -> attention_jvp") == 1, str(report)


# ---------------------------------------------------------------------------------- custom ops, eager path
def test_eager_function_saves_and_marks_like_the_registered_op():
    from facm_ext.ops import linear_jvp

    x, tx = randn(4, 6, requires_grad=True), randn(4, 6)
    w, b = randn(5, 6, requires_grad=True), randn(5, requires_grad=True)
    y, ty = linear_jvp(x, tx, w, b)
    assert y.grad_fn is not None and "linear_jvp_function" in type(y.grad_fn).__name__
    assert not ty.requires_grad and ty.grad_fn is None
    grads = torch.autograd.grad(y.square().sum(), (x, w, b))
    ref_grads = torch.autograd.grad(F.linear(x, w, b).square().sum(), (x, w, b))
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, F64, what="linear_jvp gradient")


# --------------------------------------------------------------------------------------- environment switches
def test_environment_switches_read_once_per_jvp_call_and_live_outside(monkeypatch):
    from facm_ext import _env

    seen = []

    def func(x):
        seen.append(_common._forced_backend())
        monkeypatch.setenv("FACM_EXT_BACKEND", "triton")  # a change in the middle of a call: not seen by this call
        seen.append(_common._forced_backend())
        return x * 2

    x = randn(3)
    monkeypatch.setenv("FACM_EXT_BACKEND", "reference")
    facm_ext.jvp(func, (x,), (torch.ones_like(x),))
    assert seen == ["reference", "reference"]
    assert _common._forced_backend() == "triton"  # outside a call: read live
    monkeypatch.setenv("FACM_EXT_BACKEND", "cuda")
    assert _common._forced_backend() == "cuda"
    seen.clear()
    monkeypatch.setenv("FACM_EXT_BACKEND", "reference")
    facm_ext.jvp(func, (x,), (torch.ones_like(x),))  # the next call reads the environment again
    assert seen == ["reference", "reference"]
    monkeypatch.delenv("FACM_EXT_BACKEND")
    with _env.snapshot():
        assert _env.get("FACM_EXT_BACKEND", "x") == "x" and _env.get("FACM_EXT_BACKEND") is None
        with _env.snapshot():  # nested: shares the outer snapshot
            monkeypatch.setenv("FACM_EXT_BACKEND", "triton")
            assert _env.get("FACM_EXT_BACKEND", "x") == "x"
    assert _env.get("FACM_EXT_BACKEND") == "triton"


def test_environment_snapshot_ends_on_exceptions(monkeypatch):
    from facm_ext import _env

    def func(x):
        raise RuntimeError("boom")

    x = randn(3)
    with pytest.raises(RuntimeError, match="boom"):
        facm_ext.jvp(func, (x,), (torch.ones_like(x),))
    assert _dual.STATE.subtrees is None
    monkeypatch.setenv("FACM_EXT_BACKEND", "reference")
    assert _env.get("FACM_EXT_BACKEND") == "reference"
    monkeypatch.setenv("FACM_EXT_BACKEND", "triton")
    assert _env.get("FACM_EXT_BACKEND") == "triton"


# ------------------------------------------------------------------------------------------ autocast switch
def _autocast_state(device_type: str):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


@pytest.mark.parametrize("outer", [None, torch.bfloat16])
def test_autocast_disabled_switches_like_torch_autocast(outer):
    def probe(context):
        with context:
            inside = _autocast_state("cpu")
            out = F.linear(torch.randn(2, 4), torch.randn(3, 4))
        return inside, out.dtype, _autocast_state("cpu")

    outer_context = torch.autocast("cpu", outer) if outer is not None else torch.autocast("cpu", enabled=False)
    with outer_context:
        before = _autocast_state("cpu")
        ours = probe(_common.autocast_disabled("cpu"))
        theirs = probe(torch.autocast("cpu", enabled=False))
        assert _autocast_state("cpu") == before
    assert ours == theirs
    assert ours[0][0] is False and ours[1] == torch.float32
    # The nesting count is back where it was: entering and leaving once more drops to zero exactly as before.
    assert torch.autocast_increment_nesting() == 1 and torch.autocast_decrement_nesting() == 0


def test_autocast_disabled_restores_on_exceptions():
    with torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(RuntimeError, match="boom"):
            with _common.autocast_disabled("cpu"):
                raise RuntimeError("boom")
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------------- hooks of pattern modules
class _Inner(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


def test_hook_check_walks_nested_shared_and_cyclic_submodules():
    root = nn.Sequential(nn.Sequential(nn.Identity(), nn.Sequential(nn.Linear(2, 2))))
    shared = nn.Linear(2, 2)
    root.add_module("a", shared)
    root.add_module("b", shared)
    assert not _modules._tree_has_hooks(root)
    handle = root[0][1][0].register_forward_pre_hook(lambda m, a: None)
    assert _modules._tree_has_hooks(root)
    handle.remove()
    cyclic = nn.Sequential(nn.Linear(2, 2))
    cyclic.add_module("itself", cyclic)
    assert not _modules._tree_has_hooks(cyclic)
    handle = shared.register_full_backward_hook(lambda m, gi, go: None)
    assert _modules._tree_has_hooks(root)
    handle.remove()


def test_swiglu_pattern_skipped_when_a_nested_module_has_a_hook():
    mlp = _Inner(8).double()
    x, tx = randn(3, 8), randn(3, 8)
    facm_ext.jvp(mlp, (x,), (tx,))  # recognition (which runs the module once on a probe input) done before the hook
    calls = []
    handle = mlp.fc2.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        out, tout, report = facm_ext.jvp(mlp, (x,), (tx,), report=True)
    finally:
        handle.remove()
    assert calls == [1] and not any("MLP" in k for k in report.fused), str(report)
    ref, tref = torch.func.jvp(mlp, (x,), (tx,))
    assert_rel_close(tout, tref, F64, what="tangent")
    out, tout, report = facm_ext.jvp(mlp, (x,), (tx,), report=True)
    assert any("MLP" in k for k in report.fused) or report.reasons, str(report)


def test_hook_registered_in_the_middle_of_a_call_is_seen():
    """The submodules of a pattern module are found once per call; its hooks are read on every one of its calls."""
    calls = []

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = _Inner(8)

        def forward(self, x):
            y = self.mlp(x)
            self.handles.append(self.mlp.fc2.register_forward_hook(lambda m, a, o: calls.append(1)))
            return self.mlp(y)

    model = Twice().double()
    x, tx = randn(3, 8), randn(3, 8)
    model.handles = []
    facm_ext.jvp(model, (x,), (tx,))  # recognition first
    for handle in model.handles:
        handle.remove()
    model.handles, calls[:] = [], []
    out, tout, report = facm_ext.jvp(model, (x,), (tx,), report=True)
    assert calls == [1], calls  # the second MLP call ran the module (its hook) instead of the fused pattern
    assert sum(v for k, v in report.fused.items() if "MLP" in k) == 1, str(report)
    assert _dual.STATE.subtrees is None
    for handle in model.handles:
        handle.remove()
    ref, tref = torch.func.jvp(model, (x,), (tx,))
    assert_rel_close(out, ref, F64, what="primal")
    assert_rel_close(tout, tref, F64, what="tangent")


# ------------------------------------------------------------------------------------------ validation helpers
def test_validation_helpers_messages():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^x: expected a torch.Tensor, got list$"):
        _common.check_tensor("x", [1])
    with pytest.raises(ValueError, match=r"^x: dtype torch.int64 is not supported; expected one of torch.float16, "
                                         r"torch.bfloat16, torch.float32, torch.float64$"):
        _common.check_tensor("x", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^x: dtype torch.float32 is not supported; expected one of torch.float16$"):
        _common.check_tensor("x", x, dtypes=(d for d in (torch.float16,)))  # any iterable, read once
    assert _common.check_tensor("x", x, dtypes=[torch.float32], ndim=(1, 2)) is x
    with pytest.raises(ValueError, match=r"^x: expected 3 or 4 dimensions, got shape \(2, 3\)$"):
        _common.check_tensor("x", x, ndim=(3, 4))
    with pytest.raises(ValueError, match=r"^x: expected at least 3 dimensions, got shape \(2, 3\)$"):
        _common.check_tensor("x", x, min_ndim=3)
    with pytest.raises(ValueError, match=r"^tx: tangent shape \(3,\) differs from the shape \(2, 3\) of its primal x$"):
        _common.check_tangent("tx", torch.zeros(3), "x", x)
    meta = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"^tx: expected a tensor on cpu \(the device of x\), got meta$"):
        _common.check_tangent("tx", meta, "x", x)
    with pytest.raises(ValueError, match=r"^b: expected a tensor on cpu \(the device of x\), got meta$"):
        _common.check_same_device("x", x, a=None, b=meta)
    with pytest.raises(ValueError, match=r"^b: expected dtype torch.float32 \(the dtype of x\), got torch.float64$"):
        _common.check_same_dtype("x", x, a=x, b=x.double())


def _variants(valid, optional: bool) -> list:
    """``valid`` and the ways an argument can differ from it: another float dtype, an integer dtype, another last
    dim, an extra leading dim, another device, not a tensor, None."""
    out = [valid, valid.double(), valid.to(torch.int64), torch.zeros(*valid.shape[:-1], valid.shape[-1] + 1),
           valid.unsqueeze(0), valid.to("meta"), [1.0]]
    if valid.dim() == 3:
        out += [valid[:, :1], valid[:1]]  # broadcastable / non-broadcastable dims (for modulation and gates)
    return out + [None] if optional else out


def _outcome(fn, args):
    try:
        fn(*args)
    except Exception as exc:  # the outcome itself is compared: type and message
        return f"{type(exc).__name__}: {exc}"
    return "ok"


_B, _L, _C = 2, 3, 4
# (public op, fast-path name in its module, valid arguments, which arguments may be None)
_FAST_PATH_CASES = {
    "linear_jvp": ("linear", "_plain_linear_args", lambda: (torch.randn(_B, _L, _C), torch.randn(_B, _L, _C),
                                                            torch.randn(5, _C), torch.randn(5)), (1, 3)),
    "layer_norm_jvp": ("norms", "_plain_x", lambda: (torch.randn(_B, _L, _C), torch.randn(_B, _L, _C),
                                                     torch.randn(_C), torch.randn(_C)), (1, 2, 3)),
    "rms_norm_jvp": ("norms", "_plain_channel_vector", lambda: (torch.randn(_B, _L, _C), torch.randn(_B, _L, _C),
                                                                torch.randn(_C)), (1, 2)),
    "modulate_jvp": ("norms", "_plain_modulated_args", lambda: (
        torch.randn(_B, _L, _C), torch.randn(_B, _L, _C), torch.randn(_B, _C), torch.randn(_B, _C),
        torch.randn(_B, _L, _C), torch.randn(_B, _L, _C)), (1, 3, 5)),
    "adaln_jvp": ("norms", "_plain_modulated_args", lambda: (
        torch.randn(_B, _L, _C), torch.randn(_B, _L, _C), torch.randn(_B, 1, _C), torch.randn(_B, 1, _C),
        torch.randn(_B, _C), torch.randn(_B, _C)), (1, 3, 5)),
    "gated_residual_jvp": ("pointwise", "_plain_gated_residual_args", lambda: (
        torch.randn(_B, _L, _C), torch.randn(_B, _L, _C), torch.randn(_B, _C), torch.randn(_B, _C),
        torch.randn(_B, _L, _C), torch.randn(_B, _L, _C)), (1, 3, 5)),
}


@pytest.mark.parametrize("name", sorted(_FAST_PATH_CASES))
def test_one_pass_checks_agree_with_the_checks(monkeypatch, name):
    """The ops decide their common case in one pass and run the named checks only when it fails: for every valid
    argument list with one or two arguments changed (dtype, shape, device, type, None), the op's outcome (its
    error message, or success) is the same with the one-pass decision as without it."""
    import importlib
    import itertools

    module_name, fast_name, make_valid, optional = _FAST_PATH_CASES[name]
    module = importlib.import_module(f"facm_ext.ops.{module_name}")
    op = getattr(module, name)
    torch.manual_seed(0)
    valid = make_valid()
    options = [_variants(v, i in optional) for i, v in enumerate(valid)]
    argument_lists = [valid]
    for i, j in itertools.combinations_with_replacement(range(len(valid)), 2):
        for a, b in itertools.product(options[i][1:], options[j][1:]):
            args = list(valid)
            args[i], args[j] = a, (b if i != j else a)
            argument_lists.append(args)
    with torch.no_grad():
        fast = [_outcome(op, args) for args in argument_lists]
        for fast_path in ("_plain_linear_args", "_plain_x", "_plain_channel_vector", "_plain_modulated_args",
                          "_plain_gated_residual_args"):
            if hasattr(module, fast_path):
                monkeypatch.setattr(module, fast_path, lambda *a, **k: False)
        checked = [_outcome(op, args) for args in argument_lists]
    assert fast[0] == "ok"
    assert sum(o != "ok" for o in checked) > len(checked) // 2  # the variants do exercise the checks
    for args, a, b in zip(argument_lists, fast, checked):
        assert a == b, (name, [type(v).__name__ if not isinstance(v, torch.Tensor) else (v.dtype, tuple(v.shape),
                                                                                            v.device.type)
                               for v in args], a, b)


def test_noncontiguous_and_grad_inputs_through_a_whole_block():
    from facm_ext.models.lightningdit import LightningDiTBlock, VisionRotaryEmbedding2D

    torch.manual_seed(0)
    block = LightningDiTBlock(32, 2, use_qknorm=True, use_swiglu=True, use_rmsnorm=True).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    rope = VisionRotaryEmbedding2D(16, 2).double()
    x, c = noncontiguous(randn(2, 4, 32)).requires_grad_(), randn(2, 32, requires_grad=True)
    tx, tc = randn(2, 4, 32), randn(2, 32)
    out, tout = facm_ext.jvp(lambda x, c: block(x, c, rope), (x, c), (tx, tc))
    with sdpa_kernel(SDPBackend.MATH):
        ref, tref = torch.func.jvp(lambda x, c: block(x, c, rope), (x.detach(), c.detach()), (tx, tc))
    assert_rel_close(tout, tref, F64, what="block tangent")
    params = [x, c] + list(block.parameters())
    grads = torch.autograd.grad(out.square().sum(), params)
    plain = torch.autograd.grad(block(x, c, rope).square().sum(), params)
    for g, p in zip(grads, plain):
        assert_rel_close(g, p, F64, what="block gradient")


# ------------------------------------------------------------------------- fused blocks, modulation as pairs
def _block_models():
    from facm_ext.models.lightningdit import LightningDiT
    from facm_ext.models.wan import wan_small

    lightningdit = LightningDiT(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                num_classes=3)
    wan = wan_small(num_layers=2)
    for model in (lightningdit, wan):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        model.double()
    y = torch.tensor([0, 2])
    context = randn(2, 8, 32)
    context_lens = torch.tensor([8, 5])
    return {
        "lightningdit": (lambda x, t: lightningdit(x, t, y), (randn(2, 4, 2, 2), torch.rand(2, dtype=F64))),
        "wan": (lambda x, t: wan(x, t, context), (randn(2, 4, 1, 4, 4), torch.rand(2, dtype=F64))),
        # key padding of self-attention (seq_lens) and of the text (context_lens)
        "wan_padded": (lambda x, t: wan(x, t, context, seq_len=6, context_lens=context_lens),
                       (randn(2, 4, 1, 4, 4), torch.rand(2, dtype=F64))),
    }


def _make_unavailable(monkeypatch, unavailable):
    from facm_ext.jvp import _blocks

    real_call_op = _rules.call_op

    def call_op(name, *args, **kwargs):
        if unavailable is not None and name in unavailable.split("+"):
            return None, "unavailable in this test"
        return real_call_op(name, *args, **kwargs)

    for module in (_rules, _modules, _blocks):
        monkeypatch.setattr(module, "call_op", call_op)


def _spy_block_ops(monkeypatch) -> list:
    """Record the (op name, positional args, keyword args) of the adaLN blocks' adaln_jvp and gated_residual_jvp
    calls (the returned list fills as the transform runs)."""
    from facm_ext.jvp import _blocks

    calls = []
    real_call_op = _blocks.call_op

    def spy(name, what, *args, **kwargs):
        if name in ("adaln_jvp", "gated_residual_jvp"):
            calls.append((name, args, kwargs))
        return real_call_op(name, what, *args, **kwargs)

    monkeypatch.setattr(_blocks, "call_op", spy)
    return calls


def _tiny_lightningdit(depth: int = 2):
    """A seeded fp32 LightningDiT of ``depth`` blocks (width 32, 2 heads, 2x2 latents, 3 classes) with every
    parameter random (no zero-initialized branch), and labels for a batch of 2."""
    from facm_ext.models.lightningdit import LightningDiT

    torch.manual_seed(0)
    model = LightningDiT(input_size=2, patch_size=1, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                         num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model, torch.tensor([0, 2])


def _adaln_out_dtypes(calls: list) -> list:
    return [kwargs.get("out_dtype") for name, _, kwargs in calls if name == "adaln_jvp"]


def test_adaln_block_widens_16bit_modulation_once_for_an_fp32_residual_stream(monkeypatch):
    """fp32 parameters under bf16 autocast: the residual stream is fp32 and the adaLN linear's output bf16. The block
    rule casts that [B, 6C] output (and its tangent) to fp32 once, so the norm op gets fp32 modulation instead of
    casting its four chunks itself; the values are the same as with the 16-bit chunks."""
    from facm_ext.jvp import _blocks

    model, y = _tiny_lightningdit()
    x, t = torch.randn(2, 4, 2, 2), torch.rand(2)
    tangents = (torch.randn(2, 4, 2, 2), torch.ones(2))
    calls = _spy_block_ops(monkeypatch)

    def run():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            return facm_ext.jvp(lambda a, b: model(a, b, y), (x, t), tangents)

    run()  # first call: recognition and verification
    calls.clear()
    out, tout = run()
    seen = [(name, args[0].dtype, args[2].dtype, args[4].dtype) for name, args, _ in calls]
    adaln = [s for s in seen if s[0] == "adaln_jvp"]
    gated = [s for s in seen if s[0] == "gated_residual_jvp"]
    assert len(adaln) == 4 and len(gated) == 4, seen
    # (name, dtypes of args 0, 2, 4): adaln_jvp(x, tx, shift, tshift, scale, ...): x, shift, scale all fp32;
    # gated_residual_jvp(x, tx, gate, tgate, y, ty): fp32 x and gate, bf16 branch output y.
    assert all(s[1:] == (torch.float32,) * 3 for s in adaln), adaln
    assert all(s[1:] == (torch.float32, torch.float32, torch.bfloat16) for s in gated), gated

    real_chunks = _blocks._chunks
    monkeypatch.setattr(_blocks, "_chunks", lambda value, chunks, dim, dtype=None: real_chunks(value, chunks, dim))
    calls.clear()
    ref_out, ref_tout = run()
    assert all(args[2].dtype == torch.bfloat16 for name, args, _ in calls if name == "adaln_jvp"), calls
    assert torch.equal(out, ref_out) and torch.equal(tout, ref_tout)


@pytest.mark.parametrize("grad", [False, True])
def test_adaln_block_norms_write_the_dtype_their_linear_casts_to(monkeypatch, grad):
    """fp32 residual stream under bf16 autocast: norm1's output only feeds the attention's qkv Linear and norm2's
    the MLP's first Linear, both of which cast it to bf16, so adaln_jvp writes bf16 directly (from the second call,
    once the attention module is verified). Outputs, tangents and gradients are those of the fp32 path."""
    from facm_ext.jvp import _blocks

    model, y = _tiny_lightningdit()
    x, t = torch.randn(2, 4, 2, 2, requires_grad=grad), torch.rand(2)
    tangents = (torch.randn(2, 4, 2, 2), torch.ones(2))
    calls = _spy_block_ops(monkeypatch)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
            out, tout = facm_ext.jvp(lambda a, b: model(a, b, y), (x, t), tangents)
        grads = ()
        if grad:
            out.float().square().sum().backward()
            grads = (x.grad.clone(),) + tuple(p.grad.clone() for p in model.parameters() if p.grad is not None)
            x.grad = None
        return out, tout, grads

    run()
    calls.clear()
    out, tout, grads = run()
    assert _adaln_out_dtypes(calls) == [torch.bfloat16] * 4, calls
    monkeypatch.setattr(_blocks, "_autocast_input_dtype", lambda *args: None)
    calls.clear()
    ref_out, ref_tout, ref_grads = run()
    assert _adaln_out_dtypes(calls) == [None] * 4, calls
    assert torch.equal(out, ref_out) and torch.equal(tout, ref_tout)
    assert len(grads) == len(ref_grads) == (41 if grad else 0)  # x and the 40 parameters with a gradient
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_adaln_block_norm_output_stays_fp32_where_the_consumer_is_not_known(monkeypatch):
    """A registered rule for the MLP's type may use its input in any way: norm2 keeps its fp32 output."""
    from facm_ext.jvp import register_jvp_rule
    from facm_ext.models.lightningdit import SwiGLUFFN

    model, y = _tiny_lightningdit(depth=1)
    calls = _spy_block_ops(monkeypatch)
    register_jvp_rule(SwiGLUFFN, lambda module, args, kwargs: module.forward(*args, **kwargs))
    try:
        for _ in range(2):
            calls.clear()
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                facm_ext.jvp(lambda a, b: model(a, b, y), (torch.randn(2, 4, 2, 2), torch.rand(2)),
                             (torch.randn(2, 4, 2, 2), torch.ones(2)))
    finally:
        register_jvp_rule(SwiGLUFFN, None)
    assert _adaln_out_dtypes(calls) == [torch.bfloat16, None], calls


# "a+b": both ops unavailable. rms_norm_rope_jvp replaces the qk-norm and RoPE ops of LightningDiT's attention, so
# those are made unavailable with it to reach their own fallbacks.
@pytest.mark.parametrize("unavailable", [None, "adaln_jvp", "gated_residual_jvp", "linear_jvp", "attention_jvp",
                                         "rms_norm_rope_jvp", "rms_norm_jvp+rms_norm_rope_jvp",
                                         "rope_jvp+rms_norm_rope_jvp"])
@pytest.mark.parametrize("model", ["lightningdit", "wan", "wan_padded"])
def test_fused_blocks_match_torch_func_also_on_their_fallback_expressions(monkeypatch, model, unavailable):
    if model.startswith("wan") and unavailable == "rms_norm_rope_jvp":
        pytest.skip("Wan's attention does not call rms_norm_rope_jvp (its q/k norm spans all heads)")
    _make_unavailable(monkeypatch, unavailable)
    func, primals = _block_models()[model]
    primals = tuple(p.requires_grad_() for p in primals)
    tangents = (randn(*primals[0].shape), torch.ones_like(primals[1]))
    out, tout, report = facm_ext.jvp(func, primals, tangents, report=True)
    assert any("block" in k for k in report.fused), str(report)
    if unavailable is not None:
        assert any("unavailable in this test" in r for rs in report.reasons.values() for r in rs), str(report)
    with sdpa_kernel(SDPBackend.MATH):
        ref, tref = torch.func.jvp(func, tuple(p.detach() for p in primals), tangents)
    assert_rel_close(out, ref, F64, what="primal")
    assert_rel_close(tout, tref, F64, what="tangent")
    grads = torch.autograd.grad(out.square().sum(), primals[0])
    plain = torch.autograd.grad(func(*primals).square().sum(), primals[0])
    assert_rel_close(grads[0], plain[0], F64, what="gradient")


def test_check_broadcastable_agrees_with_torch_broadcast_shapes():
    import itertools

    shapes = [(), (1,), (3,), (2, 1, 3), (1, 4, 3), (2, 4, 3), (4, 3), (2, 4, 1), (5,), (0,), (2, 0, 3),
              (1, 1, 1, 3), (2, 4, 3, 1)]
    targets = [(2, 4, 3), (2, 0, 3), (3,), (1,), ()]
    for shape, target in itertools.product(shapes, targets):
        try:
            expected = torch.broadcast_shapes(shape, target) == target
        except RuntimeError:
            expected = False
        if expected:
            _common.check_broadcastable("v", torch.empty(shape), "x", torch.Size(target))
        else:
            with pytest.raises(ValueError, match=rf"^v: shape {re.escape(str(shape))} does not broadcast to the "
                                                 rf"shape {re.escape(str(target))} of x$"):
                _common.check_broadcastable("v", torch.empty(shape), "x", torch.Size(target))


# --------------------------------------------------------------------------------------- attention modules
def _attention(qk_norm: str, width: int = 32, heads: int = 2):
    from facm_ext.models.lightningdit import Attention

    module = Attention(width, heads, qk_norm=qk_norm != "none", use_rmsnorm=qk_norm == "rms")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.double()


def _rope(width: int = 32, heads: int = 2, grid: int = 2):
    from facm_ext.models.lightningdit import VisionRotaryEmbedding2D

    return VisionRotaryEmbedding2D(width // heads, grid).double()


def _check_attention(func, x, tx, what=""):
    out, tout, report = facm_ext.jvp(func, (x,), (tx,), report=True)
    with sdpa_kernel(SDPBackend.MATH):
        ref, tref = torch.func.jvp(func, (x.detach(),), (tx,))
    assert_rel_close(out, ref, F64, what=f"{what} primal")
    assert_rel_close(tout, tref, F64, what=f"{what} tangent")
    if x.requires_grad:
        grads = torch.autograd.grad(out.square().sum(), x)
        plain = torch.autograd.grad(func(x).square().sum(), x)
        assert_rel_close(grads[0], plain[0], F64, what=f"{what} gradient")
    return report


@pytest.mark.parametrize("qk_norm", ["none", "rms", "layer"])
@pytest.mark.parametrize("with_rope", [False, True])
def test_attention_module_rule_matches_torch_func(qk_norm, with_rope):
    attention, rope = _attention(qk_norm), _rope()
    x, tx = randn(2, 4, 32, requires_grad=True), randn(2, 4, 32)
    func = (lambda x: attention(x, rope=rope)) if with_rope else attention
    _check_attention(func, x, tx)  # first call: recognition and verification
    report = _check_attention(func, x, tx)
    assert report.fused.get("F.linear -> linear_jvp") == 2, str(report)
    assert report.fused.get("F.scaled_dot_product_attention -> attention_jvp") == 1, str(report)
    assert not report.fallback, "the reshapes run on primal and tangent, not through the per-op fallback\\n" + str(report)
    if with_rope and qk_norm == "rms":
        assert report.fused.get("RMSNorm + VisionRotaryEmbedding2D (RMSNorm + RoPE) -> rms_norm_rope_jvp") == 2, \
            str(report)
    elif with_rope:
        assert report.fused.get("VisionRotaryEmbedding2D (RoPE-like) -> rope_jvp") == 2, str(report)
    elif qk_norm == "rms":
        assert report.fused.get("RMSNorm (RMSNorm-like) -> rms_norm_jvp") == 2, str(report)


@pytest.mark.parametrize("grad", [False, True])
def test_attention_qk_norm_rope_fused_under_autocast_equals_the_per_op_path(monkeypatch, grad):
    """fp32 parameters under bf16 autocast: the per-op path widens q/k to fp32 for the fp32-weight norm, rotates in
    fp32 and SDPA narrows back to bf16; rms_norm_rope_jvp computes the same in fp32 and rounds once to bf16."""
    attention, rope = _attention("rms"), _rope()
    attention.float(), rope.float()
    x = torch.randn(2, 4, 32, requires_grad=grad)
    tx = torch.randn(2, 4, 32)
    func = lambda x: attention(x, rope)  # noqa: E731

    def run():
        with torch.autocast("cpu", torch.bfloat16):
            out, tout, report = facm_ext.jvp(func, (x,), (tx,), report=True)
        grads = torch.autograd.grad(out.float().square().sum(), x) if grad else ()
        return out, tout, grads, report

    out, tout, grads, report = run()
    out, tout, grads, report = run()
    assert out.dtype == torch.bfloat16
    assert report.fused.get("RMSNorm + VisionRotaryEmbedding2D (RMSNorm + RoPE) -> rms_norm_rope_jvp") == 2, \
        str(report)
    _make_unavailable(monkeypatch, "rms_norm_rope_jvp")
    ref_out, ref_tout, ref_grads, ref_report = run()
    assert "RMSNorm (RMSNorm-like) -> rms_norm_jvp" in ref_report.fused, str(ref_report)
    assert_rel_close(out, ref_out, torch.bfloat16, what="primal")
    assert_rel_close(tout, ref_tout, torch.bfloat16, what="tangent")
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, torch.bfloat16, what="gradient")


def test_attention_module_rule_norms_per_row_before_the_head_transpose_only_when_that_is_exact():
    """q/k norms of each head's row run on the [B, L, H, D] slices of the qkv output (read in place by the norm
    kernel); a norm that mixes rows (here: over the tokens of the model's [B, H, L, D] q) keeps the model's order."""
    from facm_ext.jvp import _blocks
    from facm_ext.models._layers import RMSNorm

    assert _blocks._per_row(nn.Identity(), 16)
    assert _blocks._per_row(nn.LayerNorm(16), 16) and not _blocks._per_row(nn.LayerNorm(32), 16)
    assert _blocks._per_row(RMSNorm(16), 16) and not _blocks._per_row(RMSNorm(8), 16)

    class TokenCentering(nn.Module):  # subtracts the mean over dim -2: the tokens in the model's order
        def forward(self, t):
            return t - t.mean(dim=-2, keepdim=True)

    assert not _blocks._per_row(TokenCentering(), 16)
    attention, rope = _attention("rms"), _rope()
    attention.q_norm, attention.k_norm = TokenCentering(), TokenCentering()
    x, tx = randn(2, 4, 32, requires_grad=True), randn(2, 4, 32)
    func = lambda x: attention(x, rope)  # noqa: E731
    for report in (_check_attention(func, x, tx), _check_attention(func, x, tx, what="token-mixing q/k norm")):
        # The module rule ran (its first-call check passed): it kept the model's order for these norms.
        assert not any("attention module" in k for k in report.fallback), str(report)
        assert report.fused.get("F.scaled_dot_product_attention -> attention_jvp") == 1, str(report)


@pytest.mark.parametrize("unavailable", ["linear_jvp", "attention_jvp", "rms_norm_rope_jvp",
                                         "rms_norm_jvp+rms_norm_rope_jvp", "rope_jvp+rms_norm_rope_jvp"])
def test_attention_module_rule_steps_fall_back_like_the_per_op_path(monkeypatch, unavailable):
    attention, rope = _attention("rms"), _rope()
    x, tx = randn(2, 4, 32, requires_grad=True), randn(2, 4, 32)
    func = lambda x: attention(x, rope)  # noqa: E731
    _check_attention(func, x, tx)
    _make_unavailable(monkeypatch, unavailable)
    report = _check_attention(func, x, tx, what=unavailable)
    assert any("unavailable in this test" in r for rs in report.reasons.values() for r in rs), str(report)


def test_attention_module_with_a_function_as_rope():
    attention, rope = _attention("rms"), _rope()
    x, tx = randn(2, 4, 32, requires_grad=True), randn(2, 4, 32)
    rope_function = lambda t: rope.forward(t) * 1.5  # noqa: E731  (not a module: called on the duals as is)
    _check_attention(lambda x: attention(x, rope_function), x, tx)
    _check_attention(lambda x: attention(x, rope=rope_function), x, tx)


def test_attention_module_with_another_forward_is_not_fused():
    from facm_ext.models.lightningdit import Attention

    class CausalAttention(Attention):
        def forward(self, x, rope=None):
            batch, tokens, channels = x.shape
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
            return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))

    module = CausalAttention(32, 2).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    x, tx = randn(2, 4, 32, requires_grad=True), randn(2, 4, 32)
    report = _check_attention(module, x, tx)
    assert any("attention module" in k for k in report.fallback), str(report)
    report = _check_attention(module, x, tx)
    assert report.fallback.get("F.scaled_dot_product_attention") == 1, str(report)


def test_attention_module_keeps_hooks_rules_and_handlers():
    from facm_ext.jvp import register_jvp_rule, register_module_call_handler
    from facm_ext.models._layers import RMSNorm

    attention, rope = _attention("rms"), _rope()
    x, tx = randn(2, 4, 32, requires_grad=True), randn(2, 4, 32)
    func = lambda x: attention(x, rope)  # noqa: E731
    _check_attention(func, x, tx)

    calls = []
    handle = rope.register_forward_hook(lambda m, a, o: calls.append("rope hook"))
    try:
        report = _check_attention(func, x, tx, what="hooked rope")
    finally:
        handle.remove()
    assert calls.count("rope hook") == 2 * 3, calls  # q and k, in the transform, the reference and the plain call
    assert "VisionRotaryEmbedding2D (RoPE-like) -> rope_jvp" not in report.fused, str(report)

    def rms_rule(module, args, kwargs):
        calls.append("rule")
        return module.forward(*args, **kwargs)

    register_jvp_rule(RMSNorm, rms_rule)
    try:
        calls.clear()
        _check_attention(func, x, tx, what="registered rule")
    finally:
        register_jvp_rule(RMSNorm, None)
    assert calls.count("rule") == 2, calls

    def handler(module, args, kwargs, run_module):
        calls.append("handler")
        return run_module(module, args, kwargs)

    unregister = register_module_call_handler(lambda m: m is attention.proj, handler)
    try:
        calls.clear()
        _check_attention(func, x, tx, what="handler")
    finally:
        unregister()
    assert calls.count("handler") == 1, calls



def _tiny_wan_case():
    """A tiny float64 Wan with padded text (key lengths), its JVP inputs and the torch.func.jvp reference; the
    transform has seen it once (recognition and verification)."""
    from facm_ext.models.wan import wan_small

    wan = wan_small(num_layers=2)
    with torch.no_grad():
        for p in wan.parameters():
            p.normal_(0.0, 0.2)
    wan.double()
    context, context_lens = randn(2, 8, 32), torch.tensor([8, 5])
    func = lambda x, t: wan(x, t, context, seq_len=6, context_lens=context_lens)  # noqa: E731
    primals = (randn(2, 4, 1, 4, 4), torch.rand(2, dtype=F64))
    tangents = (randn(*primals[0].shape), torch.ones_like(primals[1]))
    with sdpa_kernel(SDPBackend.MATH):
        ref, tref = torch.func.jvp(func, primals, tangents)
    facm_ext.jvp(func, primals, tangents)  # recognition and verification
    return wan, func, primals, tangents, ref, tref


def test_wan_attention_modules_run_on_pairs_and_keep_hooks():
    wan, func, primals, tangents, ref, tref = _tiny_wan_case()
    out, tout, report = facm_ext.jvp(func, primals, tangents, report=True)
    assert_rel_close(tout, tref, F64, what="tangent")
    for name in ("Tensor.transpose", "Tensor.unflatten", "Tensor.flatten"):
        assert report.fallback.get(name, 0) <= 2, f"{name}: the head reshapes run on pairs\n{report}"

    calls = []
    handle = wan.blocks[1].cross_attn.attention.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        out, tout, report = facm_ext.jvp(func, primals, tangents, report=True)
    finally:
        handle.remove()
    assert calls == [1], "the hook inside the cross-attention must run"
    assert_rel_close(tout, tref, F64, what="tangent with a hook")
    assert report.fallback.get("Tensor.unflatten", 0) >= 3, "the hooked block and attention run per op\n" + str(report)


def test_key_length_attention_passes_lengths_without_reading_the_mask(monkeypatch):
    """Wan's key-length attention goes to attention_jvp with its lengths; the per-op path's mask check (a device
    synchronization, which CUDA graphs cannot capture) never runs. A module that ignores the lengths is not taken
    for one."""
    from facm_ext.models.wan import KeyLengthAttention

    wan, func, primals, tangents, ref, tref = _tiny_wan_case()

    def no_mask_reading(*args):
        raise AssertionError("the mask of a key-length attention module was read")

    monkeypatch.setattr(_rules, "_key_lengths_of_mask", no_mask_reading)
    out, tout, report = facm_ext.jvp(func, primals, tangents, report=True)
    assert_rel_close(out, ref, F64, what="primal")
    assert_rel_close(tout, tref, F64, what="tangent")
    # 2 blocks x (self + cross attention), all with key lengths here
    assert report.fused.get("F.scaled_dot_product_attention -> attention_jvp") == 4, str(report)

    class IgnoresLengths(KeyLengthAttention):
        def forward(self, q, k, v, key_lengths=None):
            return F.scaled_dot_product_attention(q, k, v)

    assert _modules._key_length_attention_like(KeyLengthAttention()) is not None
    assert _modules._key_length_attention_like(IgnoresLengths()) is None


def test_sdpa_rule_three_dimensional_inputs_fall_back_with_the_reason():
    q, k, v = randn(3, 5, 8), randn(3, 6, 8), randn(3, 6, 8)
    tangents = (randn(3, 5, 8), randn(3, 6, 8), randn(3, 6, 8))
    func = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    out, tout, report = facm_ext.jvp(func, (q, k, v), tangents, report=True)
    with sdpa_kernel(SDPBackend.MATH):
        ref, tref = torch.func.jvp(func, (q, k, v), tangents)
    assert_rel_close(out, ref, F64, what="primal")
    assert_rel_close(tout, tref, F64, what="tangent")
    assert "only 4-D" in " ".join(report.reasons["F.scaled_dot_product_attention"]), str(report)
