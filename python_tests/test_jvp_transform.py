"""Unit tests of the facm_ext.jvp transform against torch.func.jvp (float64, CPU): op rules, tuple outputs, views,
in-place ops, integer tensors, has_aux, nested modules and hooks, user rules, module-call handlers, patterns,
report, None/zero tangents, gradients and saved-activation memory, bad calls, autocast and torch.compile."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import facm_ext
from facm_ext.jvp import (
    DualTensor,
    JVPReport,
    JVPTransformError,
    is_active,
    make_dual,
    register_jvp_rule,
    register_module_call_handler,
    split_dual,
)
from facm_ext.jvp._rules import get_op

from conftest import assert_rel_close, noncontiguous

F64 = torch.float64


def reference_jvp(func, primals, tangents):
    """torch.func.jvp with the math SDPA backend; None tangents become zeros."""
    tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(func, primals, tangents)


def check_against_reference(func, primals, tangents, *, dtype=F64, factor=1.0):
    out, tout = facm_ext.jvp(func, primals, tangents)
    ref, tref = reference_jvp(func, primals, tangents)
    flat_out, flat_ref = torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)
    flat_tout, flat_tref = torch.utils._pytree.tree_leaves(tout), torch.utils._pytree.tree_leaves(tref)
    assert len(flat_out) == len(flat_ref)
    for i, (o, r, to, tr) in enumerate(zip(flat_out, flat_ref, flat_tout, flat_tref)):
        assert type(o) is torch.Tensor and type(to) is torch.Tensor, "outputs must be plain tensors"
        assert to.grad_fn is None and not to.requires_grad
        assert to.dtype == o.dtype
        assert_rel_close(o, r, dtype, what=f"primal {i}", factor=factor)
        assert_rel_close(to, tr, dtype, what=f"tangent {i}", factor=factor)
    return out, tout


def randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


# ------------------------------------------------------------------------------------------------- op rules
ELEMENTWISE_CASES = {
    "add_sub_scalar": lambda x, y: (x + 2.0) - (1.0 - y) + torch.add(x, y, alpha=0.5) - torch.sub(x, y, alpha=3),
    "mul_div": lambda x, y: x * y / (y * y + 1.0) + 2.0 / (x * x + 1.5),
    "unary": lambda x, y: torch.sin(x) + torch.cos(y) + torch.exp(x * 0.1) + torch.tanh(y) + torch.sigmoid(x)
    + torch.rsqrt(y * y + 1) + torch.sqrt(x * x + 1) + torch.log(y * y + 1) + x.square() + (x * x + 2).reciprocal(),
    "pow": lambda x, y: x.pow(3) + torch.pow(y, 2) + (x * x + 1) ** 0.5 + (x.abs() + 0.5) ** y,
    "generic": lambda x, y: torch.softmax(x * y, dim=-1) + torch.clamp(x, -0.5, 0.5) + F.gelu(y) + F.silu(x)
    + torch.logsumexp(x, dim=-1, keepdim=True) + torch.erf(y) + F.relu(x),
    "reductions": lambda x, y: (x.sum(-1, keepdim=True) + y.mean(0) + x.cumsum(-1) + x.var(-1, keepdim=True)),
    "where_masked": lambda x, y: torch.where(x > 0, x, y) + x.masked_fill(y > 0.5, 3.0) + torch.where(y > 0, 1.0, x),
    "matmul_einsum": lambda x, y: x @ y.transpose(-1, -2) @ x + torch.einsum("bij,bkj->bik", x, y) @ y
    + torch.bmm(x, y.transpose(1, 2)) @ y,
    "cat_stack": lambda x, y: torch.cat([x, y, torch.ones_like(x)], dim=-1)[..., ::2].sum(-1)
    + torch.stack([x, y], dim=0).sum(0).sum(-1),
    "pad": lambda x, y: F.pad(x, (1, 2), value=3.0)[..., 1:-2] * y + F.pad(y, (1, 1), mode="reflect")[..., 1:-1],
    "conv": lambda x, y: F.conv1d(x, torch.ones(4, 3, 2, dtype=F64) * 0.3, torch.ones(4, dtype=F64), stride=2)
    + F.conv1d(y, torch.ones(4, 3, 2, dtype=F64), padding=1)[..., :2]
    + F.conv1d(x, y[:1, :, :2].expand(4, 3, 2))[..., :2],
    "casts": lambda x, y: x.float().double() * y.to(torch.float32).to(F64) + x.type_as(y),
    "complex": lambda x, y: torch.view_as_real(torch.view_as_complex(torch.stack([x, y], -1).contiguous())
                                               * torch.polar(torch.ones_like(x), y)).sum(-1),
}


@pytest.mark.parametrize("case", sorted(ELEMENTWISE_CASES))
def test_function_rules_match_torch_func(case):
    x, y = randn(2, 3, 5), randn(2, 3, 5)
    check_against_reference(ELEMENTWISE_CASES[case], (x, y), (randn(2, 3, 5), randn(2, 3, 5)))


def test_broadcast_and_scalar_tangents():
    x, s = randn(2, 7, 9), randn(2, 9)
    check_against_reference(lambda x, s: x * (1 + s.unsqueeze(1)) + s.unsqueeze(1), (x, s), (randn(2, 7, 9),
                                                                                            randn(2, 9)))
    # only the broadcast operand carries a tangent: the output tangent must still have the output's shape
    out, tout = facm_ext.jvp(lambda s: x + s.unsqueeze(1), (s,), (randn(2, 9),))
    assert tout.shape == out.shape == (2, 7, 9)


def test_linear_layer_norm_sdpa_gelu_functions():
    x, w, b = randn(3, 5, 72), randn(40, 72), randn(40)
    q, k, v = randn(2, 3, 6, 8), randn(2, 3, 7, 8), randn(2, 3, 7, 8)

    def f(x, q, k, v):
        h = F.linear(x, w, b)
        h = F.layer_norm(h, (40,), eps=1e-6) + F.layer_norm(h, (40,), torch.ones(40, dtype=F64), b, 1e-5)
        h = F.gelu(h, approximate="tanh") + F.gelu(h) + F.silu(h)
        if hasattr(F, "rms_norm"):
            h = h + F.rms_norm(h, (40,), None, 1e-6)
        a = F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return h, a

    check_against_reference(f, (x, q, k, v), (randn(3, 5, 72), randn(2, 3, 6, 8), None, randn(2, 3, 7, 8)))


def test_sdpa_masks():
    q, k, v = randn(2, 2, 5, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8)
    lengths = torch.tensor([4, 6])
    prefix = (torch.arange(6)[None, :] < lengths[:, None])[:, None, None, :]
    random_mask = torch.rand(2, 1, 5, 6) > 0.3
    random_mask[..., 0] = True
    tangents = (randn(2, 2, 5, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8))
    report = JVPReport()
    for mask in (prefix, random_mask):
        func = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
        check_against_reference(func, (q, k, v), tangents)
        facm_ext.jvp(func, (q, k, v), tangents, report=report)
    causal = lambda q, k, v: F.scaled_dot_product_attention(q, k, v[:, :, :5], is_causal=True)  # noqa: E731
    check_against_reference(causal, (q, k[:, :, :5], v), (tangents[0], tangents[1][:, :, :5], tangents[2]))
    if get_op("attention_jvp")[0] is not None:
        assert report.fused.get("F.scaled_dot_product_attention -> attention_jvp") == 1  # the prefix mask
        assert "key-prefix" in " ".join(report.reasons["F.scaled_dot_product_attention"])


# ------------------------------------------------------------------------------------ structure of values
def test_tuple_outputs_chunk_split_unbind():
    def f(x):
        a, b, c = x.chunk(3, dim=-1)
        d, e = x.split([2, 4], dim=-1)
        rows = x.unbind(1)
        return {"chunks": (a * b, c), "split": [d.sum(-1), e], "rows": rows[0] * rows[-1]}

    check_against_reference(f, (randn(2, 3, 6),), (randn(2, 3, 6),))


def test_views_and_noncontiguous_inputs():
    def f(x, y):
        h = x.transpose(0, 1).reshape(-1, 6).t()[:, 1:5]
        h = h.unsqueeze(0).expand(2, -1, -1).permute(2, 0, 1).flatten(1).unflatten(1, (2, 6))
        return h.contiguous() * y.mT[:, 0:1, :].reshape(4, 1, 6), x.permute(2, 1, 0).sum(), x.narrow(2, 1, 2)

    x = noncontiguous(randn(3, 2, 6))
    y = noncontiguous(randn(4, 6, 6))
    check_against_reference(f, (x, y), (noncontiguous(randn(3, 2, 6)), randn(4, 6, 6)))


def test_in_place_ops():
    def f(x, y):
        h = x * 2
        h.add_(y)
        h.mul_(y)
        h += x
        h -= 0.5 * y
        h *= 3
        h /= 1.5 + y * y
        h[0] = y[1] * 4
        h[:, 1] = 0.0
        g = x.clone()
        g.copy_(y)
        g = F.silu(g, inplace=True)
        g.clamp_(-1, 1)
        return h, g

    check_against_reference(f, (randn(3, 4), randn(3, 4)), (randn(3, 4), randn(3, 4)))


def test_in_place_refusals():
    x, tx = randn(3, 4), randn(3, 4)

    def into_plain(x):
        buf = torch.zeros(3, 4, dtype=F64)
        buf[0] = x[0]
        return buf

    def on_view(x):
        h = x * 2
        view = h[0]
        view.add_(1.0)
        return h

    def with_out(x):
        out = torch.empty(3, 4, dtype=F64)
        torch.add(x, x, out=out)
        return out

    for func, message in ((into_plain, "has none"), (on_view, "shares memory"), (with_out, "out=")):
        with pytest.raises(JVPTransformError, match=message):
            facm_ext.jvp(func, (x,), (tx,))
    # without a tangent anywhere the same code is untouched by the transform
    out, tout = facm_ext.jvp(into_plain, (x,), (None,))
    assert torch.equal(out[0], x[0]) and not tout.any()


def test_integer_and_bool_tensors_pass_through():
    table = randn(10, 4)

    def f(x, idx, mask):
        rows = table[idx] * x.sum()
        picked = x[mask]
        return rows, picked.sum(), idx * 2, mask.sum()

    x, idx, mask = randn(5), torch.tensor([1, 3, 3]), torch.tensor([True, False, True, True, False])
    (rows, total, idx2, count), (trows, ttotal, tidx, tcount) = facm_ext.jvp(f, (x, idx, mask),
                                                                             (randn(5), None, None))
    ref, tref = torch.func.jvp(lambda x: f(x, idx, mask)[:2], (x,), (tref_x := randn(5),))
    assert idx2.dtype == torch.long and tidx is None and tcount is None
    torch.testing.assert_close(rows, ref[0])
    out2, tout2 = facm_ext.jvp(lambda x: f(x, idx, mask)[:2], (x,), (tref_x,))
    torch.testing.assert_close(tout2[0], tref[0])
    torch.testing.assert_close(tout2[1], tref[1])


def test_has_aux():
    def f(x):
        h = x.sin()
        return h * 2, {"hidden": h, "n": 3}

    x, tx = randn(4), randn(4)
    out, tout, aux = facm_ext.jvp(f, (x,), (tx,), has_aux=True)
    assert type(aux["hidden"]) is torch.Tensor and aux["n"] == 3
    torch.testing.assert_close(aux["hidden"], x.sin())
    torch.testing.assert_close(tout, 2 * x.cos() * tx)
    with pytest.raises(ValueError, match="has_aux"):
        facm_ext.jvp(lambda x: x * 2, (x,), (tx,), has_aux=True)


def test_none_and_zero_tangents_and_independent_outputs():
    x, y = randn(3, 4), randn(3, 4)
    const = randn(3, 4)
    out, tout = facm_ext.jvp(lambda x, y: (x * y, const * 2, y.sum()), (x, y), (None, torch.zeros(3, 4, dtype=F64)))
    assert not tout[0].any() and not tout[1].any() and not tout[2].any()
    assert tout[1].shape == (3, 4) and tout[2].shape == ()
    check_against_reference(lambda x, y: x * y + x.exp(), (x, y), (None, randn(3, 4)))


# ------------------------------------------------------------------------------------------------- modules
class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(approximate="tanh"), nn.Linear(2 * width, width))
        self.gate = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.sigmoid(self.gate(x)) * self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, width: int = 12, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x, scale):
        for block in self.blocks:
            x = block(x * scale)
        return self.out(x)


def _randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def test_nested_modules_hooks_and_parameter_gradients():
    net = _randomize(Net()).double()
    calls = []
    handle = net.blocks[0].gate.register_forward_hook(lambda m, a, o: calls.append(type(o).__name__))
    x, s = randn(2, 5, 12, dtype=F64).requires_grad_(), randn(1, dtype=F64)
    try:
        out, tout = check_against_reference(net, (x, s), (randn(2, 5, 12), torch.ones(1, dtype=F64)))
    finally:
        handle.remove()
    assert calls == ["DualTensor", "Tensor"], "the hooked Linear must go through its normal __call__"
    assert out.requires_grad and tout.grad_fn is None
    params = [x] + list(net.parameters())
    grads = torch.autograd.grad((out * out.detach().cos()).sum(), params)
    ref_out = net(x, s)
    ref_grads = torch.autograd.grad((ref_out * ref_out.detach().cos()).sum(), params)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, F64, what="gradient")


def test_saved_activation_memory_matches_plain_forward():
    net = _randomize(Net(width=32, depth=3))
    x, s = torch.randn(4, 16, 32, requires_grad=True), torch.ones(1)

    def saved_bytes(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(storages.values())

    plain = saved_bytes(lambda: net(x, s))
    ours = saved_bytes(lambda: facm_ext.jvp(net, (x, s), (torch.randn(4, 16, 32), torch.ones(1))))
    assert ours <= 1.3 * plain, f"saved {ours} bytes vs {plain} for a plain forward"


def test_user_rule_is_used_and_removable():
    class ScaledTanh(nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 3

    calls = []

    def rule(module, args, kwargs):
        calls.append(module)
        x, tx = split_dual(args[0])
        y = torch.tanh(x)
        return make_dual(3 * y, 3 * (1 - y * y) * tx)

    module = ScaledTanh()
    x, tx = randn(4), randn(4)
    register_jvp_rule(ScaledTanh, rule)
    try:
        out, tout, report = facm_ext.jvp(lambda x: module(x) + 1, (x,), (tx,), report=True)
    finally:
        register_jvp_rule(ScaledTanh, None)
    assert calls == [module] and report.fused["ScaledTanh -> registered rule"] == 1
    torch.testing.assert_close(tout, 3 * (1 - x.tanh() ** 2) * tx)
    facm_ext.jvp(module, (x,), (tx,))
    assert len(calls) == 1, "a removed rule must not be called"
    assert facm_ext.register_jvp_rule is register_jvp_rule
    with pytest.raises(ValueError, match="module_type"):
        register_jvp_rule(int, rule)


def test_module_call_handler_and_run_module():
    net = _randomize(Net()).double()
    seen, hook_calls = [], []
    net.blocks[1].register_forward_pre_hook(lambda m, a: hook_calls.append(m))

    def handler(module, args, kwargs, run_module):
        assert is_active()
        seen.append(module)
        return run_module(module, args, kwargs)

    unregister = register_module_call_handler(lambda m: isinstance(m, Block), handler)
    try:
        x, s = randn(2, 3, 12), torch.ones(1, dtype=F64)
        check_against_reference(net, (x, s), (randn(2, 3, 12), None))
    finally:
        unregister()
    assert seen[:2] == [net.blocks[0], net.blocks[1]]
    assert hook_calls == [net.blocks[1]], "run_module skips hooks (only the reference forward ran the hook)"
    assert not is_active()


def test_module_call_restored_after_exception_and_in_other_threads():
    original = nn.Module.__call__

    def failing(x):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        facm_ext.jvp(failing, (randn(2),), (randn(2),))
    assert nn.Module.__call__ is original and not is_active()

    other_thread_types = []
    release = threading.Event()
    entered = threading.Event()
    lin = nn.Linear(4, 4).double()

    def slow(x):
        entered.set()
        release.wait(5)
        return lin(x)

    def other():
        entered.wait(5)
        other_thread_types.append((is_active(), type(lin(randn(4))).__name__))
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    facm_ext.jvp(slow, (randn(4),), (randn(4),))
    thread.join()
    assert other_thread_types == [(False, "Tensor")]


class LookAlikeMlp(nn.Module):
    """Structurally an MLP (two Linears and a GELU-tanh) but with a residual: must not be fused as an MLP."""

    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + x


class HandRmsNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class HandLayerNorm(HandRmsNorm):
    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return super().forward(x)


class SwiGLU(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def test_patterns_recognized_and_verified():
    width = 16
    modules = {
        "seq": nn.Sequential(nn.Linear(width, 24), nn.GELU(approximate="tanh"), nn.Dropout(0.0), nn.Linear(24, width)),
        "lookalike": LookAlikeMlp(width),
        "swiglu": SwiGLU(width, 12),
        "rms": HandRmsNorm(width),
        "ln": HandLayerNorm(width),
    }
    for m in modules.values():
        _randomize(m).double()
    x, tx = randn(3, width), randn(3, width)
    for name, module in modules.items():
        report = JVPReport()
        check_against_reference(module, (x,), (tx,))
        facm_ext.jvp(module, (x,), (tx,), report=report)
        text = str(report)
        if name in ("seq", "swiglu"):
            expected = "mlp_jvp"
        elif name == "rms":
            expected = "rms_norm_jvp"
        else:
            expected = None
        if expected is None:
            assert "MLP" not in text and "RMSNorm-like" not in text, text
        elif get_op(expected)[0] is not None:
            assert any(expected in k for k in report.fused), text
        else:
            assert any(expected in r for rs in report.reasons.values() for r in rs), text


def test_report_names_fused_and_fallback_ops():
    lin = _randomize(nn.Linear(8, 8)).double()
    out, tout, report = facm_ext.jvp(lambda x: torch.softmax(lin(x), -1), (randn(2, 8),), (randn(2, 8),),
                                     report=True)
    assert isinstance(report, JVPReport)
    assert report.fallback.get("torch.softmax") == 1 or report.fallback.get("Tensor.softmax") == 1, str(report)
    if get_op("linear_jvp")[0] is not None:
        assert report.fused == {"F.linear -> linear_jvp": 1}
    else:
        assert "op unavailable" in " ".join(report.reasons["F.linear"])
    assert "fused:" in str(report)
    with pytest.raises(ValueError, match="report"):
        facm_ext.jvp(lin, (randn(2, 8),), (randn(2, 8),), report="yes")


# ------------------------------------------------------------------------------------------------ public API
def test_make_dual_split_dual_and_callable_package():
    x, tx = randn(3), randn(3)
    dual = make_dual(x, tx)
    assert isinstance(dual, DualTensor)
    primal, tangent = split_dual(dual)
    assert type(primal) is torch.Tensor and torch.equal(primal, x) and torch.equal(tangent, tx)
    assert split_dual(x) == (x, None) and split_dual(3) == (3, None)
    assert make_dual(torch.arange(3), None).dtype == torch.long
    with pytest.raises(ValueError, match="tangent"):
        make_dual(torch.arange(3), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        make_dual(x, randn(4))
    assert callable(facm_ext.jvp) and facm_ext.jvp.jvp is not None
    out, tout = facm_ext.jvp.jvp(torch.sin, (x,), (tx,))
    torch.testing.assert_close(tout, x.cos() * tx)


def test_bad_calls():
    x, tx = randn(3), randn(3)
    with pytest.raises(ValueError, match="primals"):
        facm_ext.jvp(torch.sin, x, (tx,))
    with pytest.raises(ValueError, match="tangents"):
        facm_ext.jvp(torch.sin, (x,), tx)
    with pytest.raises(ValueError, match="1 entries"):
        facm_ext.jvp(torch.sin, (x,), (tx, tx))
    with pytest.raises(ValueError, match="shape"):
        facm_ext.jvp(torch.sin, (x,), (randn(4),))
    with pytest.raises(ValueError, match="structure"):
        facm_ext.jvp(lambda p: p[0] + p[1], ((x, x),), ((tx, tx, tx),))
    with pytest.raises(ValueError, match="cannot carry a tangent"):
        facm_ext.jvp(lambda i: i * 2, (torch.arange(3),), (torch.ones(3),))
    with pytest.raises(ValueError, match="primals"):
        facm_ext.jvp(lambda a: a, (1.0,), (1.0,))
    with pytest.raises(ValueError, match="func"):
        facm_ext.jvp("not callable", (x,), (tx,))
    with pytest.raises(ValueError, match="output leaf"):
        facm_ext.jvp(lambda a: (a, "text"), (x,), (tx,))
    with pytest.raises(JVPTransformError, match="nested"):
        facm_ext.jvp(lambda a: facm_ext.jvp(torch.sin, (a,), (a,)), (x,), (tx,))


# ---------------------------------------------------------------------------------- autocast and compile
def test_cpu_autocast_tangent_follows_primal_dtype():
    net = _randomize(Net(width=16))
    x, s = torch.randn(2, 4, 16), torch.ones(1)
    tx = torch.randn(2, 4, 16)
    with torch.autocast("cpu", torch.bfloat16):
        out, tout = facm_ext.jvp(net, (x, s), (tx, None))
        ref, tref = torch.func.jvp(lambda x: net(x, s), (x,), (tx,))
    assert out.dtype == ref.dtype == torch.bfloat16 and tout.dtype == out.dtype
    assert_rel_close(out, ref, torch.bfloat16, what="primal", factor=2)
    assert_rel_close(tout, tref.to(tout.dtype), torch.bfloat16, what="tangent", factor=2)


def test_torch_compile_around_the_transform():
    net = _randomize(Net(width=16)).double()
    x, s, tx = randn(2, 4, 16), torch.ones(1, dtype=F64), randn(2, 4, 16)

    def step(x, tx):
        out, tout = facm_ext.jvp(net, (x, s), (tx, None))
        return out * 2, tout

    compiled = torch.compile(step, backend="eager")
    out, tout = compiled(x, tx)
    ref, tref = reference_jvp(lambda x: net(x, s), (x,), (tx,))
    assert_rel_close(out, 2 * ref, F64, what="primal")
    assert_rel_close(tout, tref, F64, what="tangent")


class AdaLNBlock(nn.Module):
    """A DiT-style adaLN-Zero block; ``variant`` changes its forward so the fused form no longer matches."""

    def __init__(self, width: int, variant: str = "dit"):
        super().__init__()
        self.variant = variant
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = HandRmsNorm(width)
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(approximate="tanh"), nn.Linear(2 * width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        x = x + gate_msa.unsqueeze(1) * self.attn(h)
        h = self.norm2(x) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        if self.variant == "no_gate":
            return x + self.mlp(h)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


@pytest.mark.parametrize("variant,dtype", [("dit", F64), ("no_gate", F64), ("dit", torch.float32),
                                           ("dit", torch.bfloat16)])
def test_adaln_block_fused_only_when_verified(variant, dtype):
    block = _randomize(AdaLNBlock(24, variant)).to(dtype)
    x, c = torch.randn(3, 5, 24, dtype=dtype), torch.randn(3, 24, dtype=dtype)
    tangents = (torch.randn(3, 5, 24, dtype=dtype), torch.randn(3, 24, dtype=dtype))
    report = JVPReport()
    out, tout = facm_ext.jvp(block, (x, c), tangents, report=report)
    ref, tref = facm_ext.jvp(lambda x, c: block.forward(x, c), (x, c), tangents)  # unrecognized: per-op rules
    torch.testing.assert_close(out, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    torch.testing.assert_close(tout, tref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    fused = any("adaln_jvp" in k for k in report.fused)
    if get_op("adaln_jvp")[0] is None or get_op("gated_residual_jvp")[0] is None:
        pytest.skip("adaln_jvp / gated_residual_jvp not available")
    reasons = " ".join(report.reasons.get("AdaLNBlock (adaLN block)", ()))
    if variant == "dit" and dtype != torch.bfloat16:
        assert fused and report.fused["adaLN block gated residual -> gated_residual_jvp"] == 2, str(report)
        check_against_reference(block, (x, c), tangents, dtype=dtype)
    elif variant == "no_gate":
        assert not fused and "differs" in reasons, str(report)
    else:
        assert not fused and "not verified" in reasons, str(report)


def test_concurrent_transforms_in_two_threads():
    net = _randomize(Net()).double()
    x, s = randn(2, 3, 12), torch.ones(1, dtype=F64)
    tx = randn(2, 3, 12)
    ref, tref = reference_jvp(lambda x: net(x, s), (x,), (tx,))
    original = nn.Module.__call__
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(facm_ext.jvp(net, (x, s), (tx, None)))
        except Exception as exc:  # noqa: BLE001 - reported to the main thread, which fails the test with it
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 6 and nn.Module.__call__ is original and not is_active()
    for out, tout in results:
        assert_rel_close(out, ref, F64, what="primal")
        assert_rel_close(tout, tref, F64, what="tangent")


def test_patterns_keep_hooks_and_replaced_forwards():
    width = 8
    mlp = _randomize(nn.Sequential(nn.Linear(width, 16), nn.GELU(approximate="tanh"), nn.Linear(16, width))).double()
    x, tx = randn(2, width), randn(2, width)
    calls = []
    handle = mlp[2].register_forward_hook(lambda m, a, o: calls.append(m))
    try:
        report = JVPReport()
        check_against_reference(mlp, (x,), (tx,))
        facm_ext.jvp(mlp, (x,), (tx,), report=report)
    finally:
        handle.remove()
    assert len(calls) == 3, "a hook inside the MLP must run in both transforms (and the reference)"
    assert not any("MLP" in k for k in report.fused), str(report)

    mlp.forward = lambda inp: nn.Sequential.forward(mlp, inp) * 2  # replaced on the instance
    try:
        out, tout = facm_ext.jvp(mlp, (x,), (tx,))
    finally:
        del mlp.forward
    ref, tref = reference_jvp(lambda inp: nn.Sequential.forward(mlp, inp) * 2, (x,), (tx,))
    assert_rel_close(tout, tref, F64, what="tangent with a replaced forward")


def test_random_ops_share_the_draw_between_primal_and_tangent():
    def f(x):
        return F.dropout(x * 2, p=0.5, training=True) + F.dropout(x, p=0.3, training=True).sin()

    x, tx = randn(64), randn(64)
    torch.manual_seed(123)
    out, tout = facm_ext.jvp(f, (x,), (tx,))
    after_ours = torch.rand(1)
    torch.manual_seed(123)
    ref, tref = torch.func.jvp(f, (x,), (tx,))
    after_ref = torch.rand(1)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tout, tref)
    assert torch.equal(after_ours, after_ref), "the generator must advance exactly as one plain call"
    with pytest.raises(JVPTransformError, match="random"):
        facm_ext.jvp(lambda x: F.dropout(x * 1, p=0.5, training=True, inplace=True), (x,), (tx,))


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_modules_run_eagerly_under_the_transform(how):
    net = _randomize(Net()).double()
    x, s, tx = randn(2, 3, 12), torch.ones(1, dtype=F64), randn(2, 3, 12)
    ref, tref = reference_jvp(lambda x: net(x, s), (x,), (tx,))
    if how == "torch.compile":
        model = torch.compile(net, backend="eager")
    else:
        model = _randomize(Net()).double()
        model.load_state_dict(net.state_dict())
        model.compile(backend="eager")
    out, tout, report = facm_ext.jvp(model, (x, s), (tx, None), report=True)
    assert_rel_close(out, ref, F64, what="primal")
    assert_rel_close(tout, tref, F64, what="tangent")
    assert any("run eagerly" in r for rs in report.reasons.values() for r in rs), str(report)
    torch.testing.assert_close(model(x, s), ref)  # the compiled module still works outside the transform


def test_in_place_after_a_copying_reshape_is_allowed():
    def f(x, y):
        h = (x * 2).transpose(0, 1).reshape(-1)  # reshape of a transposed tensor copies: no memory shared
        h += y.reshape(-1)
        return h

    check_against_reference(f, (randn(3, 4), randn(4, 3)), (randn(3, 4), randn(4, 3)))


def test_adaln_block_fused_under_autocast_with_low_precision_activations():
    block = _randomize(AdaLNBlock(16))
    x, c = torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(2, 16, dtype=torch.bfloat16)
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    with torch.autocast("cpu", torch.bfloat16):
        out, tout, report = facm_ext.jvp(block, (x, c), (tx, tc), report=True)
        ref, tref = torch.func.jvp(block, (x, c), (tx, tc))
    assert out.dtype == ref.dtype and tout.dtype == out.dtype
    assert_rel_close(out, ref, torch.bfloat16, what="primal")
    assert_rel_close(tout, tref, torch.bfloat16, what="tangent")
    if get_op("adaln_jvp")[0] is not None and get_op("gated_residual_jvp")[0] is not None:
        assert report.fused.get("adaLN block norm+modulate -> adaln_jvp") == 2, str(report)
