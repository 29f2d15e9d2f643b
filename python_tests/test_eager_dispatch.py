"""The eager path of the custom ops (facm_ext.ops._common.JVPCustomOp): plain eager calls skip the dispatcher but
must give exactly what the registered op gives (outputs, tangents, every gradient), and anything the dispatcher
must see (torch.compile, dispatch modes, functorch transforms, tensor subclasses) must still reach the registered
op. CPU tests; the GPU runs the same public functions through this path in every kernel test."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from facm_ext.ops import (
    adaln_jvp,
    attention_jvp,
    gated_residual_jvp,
    gelu_jvp,
    layer_norm_jvp,
    linear_jvp,
    mlp_jvp,
    modulate_jvp,
    rms_norm_jvp,
    rope_jvp,
    silu_jvp,
    swiglu_jvp,
)
from facm_ext.ops import attention, linear, norms, pointwise

C = 72


def _cases():
    """(name, function of a dict of tensors, the tensors: requires_grad set on the primal inputs)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    cos, sin = r(7, C // 2), r(7, C // 2)
    return [
        ("layer_norm", lambda t: layer_norm_jvp(t["x"], t["tx"], t["w"], t["b"]),
         dict(x=r(2, 7, C, grad=True), tx=r(2, 7, C), w=r(C, grad=True), b=r(C, grad=True))),
        ("rms_norm", lambda t: rms_norm_jvp(t["x"], t["tx"], t["w"]),
         dict(x=r(2, 7, C, grad=True), tx=r(2, 7, C), w=r(C, grad=True))),
        ("modulate", lambda t: modulate_jvp(t["x"], t["tx"], t["sh"], t["tsh"], t["sc"], None),
         dict(x=r(2, 7, C, grad=True), tx=r(2, 7, C), sh=r(2, C, grad=True), tsh=r(2, C), sc=r(2, C, grad=True))),
        ("adaln", lambda t: adaln_jvp(t["x"], t["tx"], t["sh"], t["tsh"], t["sc"], t["tsc"], norm="rms", weight=t["w"]),
         dict(x=r(2, 7, C, grad=True), tx=r(2, 7, C), sh=r(2, C, grad=True), tsh=r(2, C), sc=r(2, C, grad=True),
              tsc=r(2, C), w=r(C, grad=True))),
        ("gated_residual", lambda t: gated_residual_jvp(t["x"], t["tx"], t["g"], t["tg"], t["y"], t["ty"]),
         dict(x=r(2, 7, C, grad=True), tx=r(2, 7, C), g=r(2, 1, C, grad=True), tg=r(2, 1, C), y=r(2, 7, C, grad=True),
              ty=r(2, 7, C))),
        ("gelu", lambda t: gelu_jvp(t["x"], t["tx"]), dict(x=r(3, C, grad=True), tx=r(3, C))),
        ("silu", lambda t: silu_jvp(t["x"], None), dict(x=r(3, C, grad=True))),
        ("swiglu", lambda t: swiglu_jvp(t["a"], t["ta"], t["b"], t["tb"]),
         dict(a=r(3, C, grad=True), ta=r(3, C), b=r(3, C, grad=True), tb=r(3, C))),
        ("rope", lambda t: rope_jvp(t["x"], t["tx"], cos, sin), dict(x=r(2, 3, 7, C, grad=True), tx=r(2, 3, 7, C))),
        ("attention", lambda t: attention_jvp(t["q"], t["k"], t["v"], t["tq"], None, t["tv"]),
         dict(q=r(2, 3, 5, C, grad=True), k=r(2, 3, 9, C, grad=True), v=r(2, 3, 9, C, grad=True), tq=r(2, 3, 5, C),
              tv=r(2, 3, 9, C))),
        ("linear", lambda t: linear_jvp(t["x"], t["tx"], t["w"], t["b"]),
         dict(x=r(2, 7, C, grad=True), tx=r(2, 7, C), w=r(40, C, grad=True), b=r(40, grad=True))),
        ("mlp", lambda t: mlp_jvp(t["x"], t["tx"], t["w1"], t["b1"], t["w2"], t["b2"], activation="swiglu"),
         dict(x=r(2, 7, C, grad=True), tx=r(2, 7, C), w1=r(2 * 40, C, grad=True), b1=r(2 * 40, grad=True),
              w2=r(C, 40, grad=True), b2=r(C, grad=True))),
    ]


CASES = _cases()


def _run(fn, tensors):
    """(primal, tangent, gradients of every tensor that requires grad) for a fixed cotangent of the primal."""
    tensors = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in tensors.items()}
    y, ty = fn(tensors)
    cotangent = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).view(y.shape)
    (y * cotangent).sum().backward()
    grads = {k: v.grad for k, v in tensors.items() if v.requires_grad}
    return y.detach(), ty, grads


@pytest.mark.parametrize("name,fn,tensors", CASES, ids=[c[0] for c in CASES])
def test_eager_path_equals_registered_op(monkeypatch, name, fn, tensors):
    y, ty, grads = _run(fn, tensors)
    monkeypatch.setenv("FACM_EXT_EAGER_DISPATCH", "custom_op")
    y_op, ty_op, grads_op = _run(fn, tensors)
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)
    torch.testing.assert_close(ty, ty_op, rtol=0, atol=0)
    assert ty.grad_fn is None and not ty.requires_grad
    assert set(grads) == set(grads_op)
    for key in grads:
        assert grads[key] is not None, f"{name}: no gradient for {key}"
        torch.testing.assert_close(grads[key], grads_op[key], rtol=0, atol=0, msg=f"{name}: gradient of {key}")


OPS = {
    "gelu": pointwise._gelu_jvp_op, "rms_norm": norms._rms_norm_op, "linear": linear._linear_jvp_op,
    "attention": attention._attention_jvp_op,
}
CALLS = {
    "gelu": lambda t: gelu_jvp(t["x"], t["tx"]),
    "rms_norm": lambda t: rms_norm_jvp(t["x"], t["tx"], None),
    "linear": lambda t: linear_jvp(t["x"], t["tx"], t["w"]),
    "attention": lambda t: attention_jvp(t["x"].view(1, 2, 3, C), t["x"].view(1, 2, 3, C), t["x"].view(1, 2, 3, C)),
}


class _CountingOp:
    """Stands in for a registered op: counts the calls that reach the dispatcher, then forwards them."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


class _PassThroughMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_who_reaches_the_dispatcher(monkeypatch, name):
    op = OPS[name]
    counter = _CountingOp(op.op)
    monkeypatch.setattr(op, "op", counter)
    tensors = dict(x=torch.randn(6, C, dtype=torch.float64, requires_grad=True), tx=torch.randn(6, C, dtype=torch.float64),
                   w=torch.randn(5, C, dtype=torch.float64, requires_grad=True))
    with torch.no_grad():
        CALLS[name](tensors)
    CALLS[name](tensors)
    assert counter.calls == 0, "plain eager calls must skip the dispatcher"
    monkeypatch.setenv("FACM_EXT_EAGER_DISPATCH", "custom_op")
    CALLS[name](tensors)
    assert counter.calls == 1
    monkeypatch.delenv("FACM_EXT_EAGER_DISPATCH")
    with _PassThroughMode():
        CALLS[name](tensors)
    assert counter.calls == 2, "a dispatch mode must see the registered op"
    torch.func.vmap(lambda x: CALLS[name](dict(tensors, x=x))[0])(tensors["x"].detach().unsqueeze(0))
    assert counter.calls == 3, "a functorch transform must see the registered op"


def test_compile_traces_the_registered_op():
    x, tx = torch.randn(4, C), torch.randn(4, C)
    compiled = torch.compile(lambda a, b: gelu_jvp(a, b), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, tx), gelu_jvp(x, tx))
