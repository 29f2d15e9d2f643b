"""Tests of rms_norm_rope_jvp (RMSNorm over the head dim, then rotary embedding, primal and tangent in one pass)
against torch.func.jvp of facm_ext.reference.rope.rms_norm_rope in float64.

Why each group exists:
- the op is the fused form of the qk-norm -> RoPE step the JVP transform calls on q and k, so it must agree with
  the composed reference for every CPU dtype, both pair conventions (interleaved / half-split), both layouts
  ([B, H, L, D] and [B, L, H, D]), every table form (per pair [L, D/2], per channel [L, D], free per-channel
  angles), with and without the [D] weight, and for eps values large enough against mean(x^2) to matter;
- the transform passes strided views (q and k are [B, L, H, D] slices of a [B, L, 3, H, D] qkv tensor, layout
  "BLHD"; their [B, H, L, D] transposes are the other form an attention layer holds) and None tangents (tout must
  then be exactly zero);
- only the primal output is differentiable (w.r.t. x, weight, cos and sin; the backward recomputes the norm from
  the saved rstd), so its gradients are compared with autograd through the float64 reference, and the tangent must
  carry no graph;
- the custom op (which also returns rstd) is checked with torch.library.opcheck and traced by
  torch.compile(fullgraph=True); bad arguments raise ValueError naming the argument.
The requires_cuda tests exercise the compiled kernel (one warp per row, 8 rows per block, head_dim <= 256, weight
and tables read as fp32) on small shapes, since they also run under compute-sanitizer: their names contain
``cuda_rms_norm_rope`` and their dtype parameter ids (dtype0..2) let a ``-k`` filter pick one dtype.
"""

from __future__ import annotations

import pytest
import torch

from conftest import REL_TOL, assert_rel_close, misaligned, noncontiguous, requires_cuda
from facm_ext import _extension
from facm_ext.ops import rms_norm_jvp, rms_norm_rope_jvp, rope_jvp
from facm_ext.ops._common import OP_REGISTRY, use_cuda_kernel
from facm_ext.ops.rms_norm_rope import MAX_KERNEL_HEAD_DIM
from facm_ext.reference import rope as ref

CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL = "rms_norm_rope_jvp_cuda"
# (eps, scale of x): at unit scale eps is negligible against mean(x^2) ~ 1; at scale 0.01 (mean(x^2) ~ 1e-4) an eps
# of 1e-5 changes rstd by ~5%, so an op that dropped or misplaced eps would fail.
EPS_CASES = [(1e-6, 1.0), (1e-5, 1e-2)]
EPS_IDS = ["eps1e-6", "eps1e-5_small_x"]


# ------------------------------------------------------------------------------------------------------- helpers
def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def f64(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def tables(tokens, head_dim, form, interleaved=True, device="cpu", dtype=torch.float32):
    """cos, sin tables. "pair": [L, D/2] angles; "channel": [L, D] with each pair's angle on both of its channels
    (EVA's pair-repeated tables for interleaved pairs, cat([t, t]) for half-split pairs); "free": [L, D] with an
    independent angle per channel (exercises the channel-by-channel semantics)."""
    angles = torch.rand(tokens, head_dim // 2 if form != "free" else head_dim, dtype=torch.float64) * 6.3
    if form == "channel":
        angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def x_shape(layout, batch, heads, tokens, head_dim):
    return (batch, heads, tokens, head_dim) if layout == "BHLD" else (batch, tokens, heads, head_dim)


def ref_jvp(x, tx, weight, cos, sin, eps, interleaved, layout):
    """(out, tout) of torch.func.jvp of the reference in float64 on the CPU (weight and tables held constant)."""
    tx64 = torch.zeros_like(f64(x)) if tx is None else f64(tx)
    w64, cos64, sin64 = f64(weight), f64(cos), f64(sin)
    return torch.func.jvp(lambda a: ref.rms_norm_rope(a, w64, cos64, sin64, eps, interleaved, layout), (f64(x),),
                          (tx64,))


def ref_rstd(x, eps):
    """rsqrt(mean(x^2) + eps) per row in float64: x's shape without the channel dim."""
    x64 = f64(x)
    return torch.rsqrt(x64.square().mean(-1) + eps)


def check_jvp(x, tx, weight, cos, sin, eps, interleaved, layout, dtype, what, factor=1.0):
    """Run the op and compare out and tout with the float64 reference; returns (out, tout)."""
    out, tout = rms_norm_rope_jvp(x, tx, weight, cos, sin, eps=eps, interleaved=interleaved, layout=layout)
    rout, rtout = ref_jvp(x, tx, weight, cos, sin, eps, interleaved, layout)
    assert out.dtype == dtype and tout.dtype == dtype, what
    assert out.device == x.device and tout.device == x.device, what
    assert out.is_contiguous() and tout.is_contiguous(), what
    assert_rel_close(out, rout, dtype, what=f"{what} primal", factor=factor)
    if tx is None:
        assert torch.equal(tout, torch.zeros_like(tout)), f"{what}: tangent of a None tangent is not exactly zero"
    else:
        assert_rel_close(tout, rtout, dtype, what=f"{what} tangent", factor=factor)
    return out, tout


# ----------------------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("form", ["pair", "channel", "free"])
@pytest.mark.parametrize("head_dim", [72, 128, 14, 6])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("eps,scale", EPS_CASES, ids=EPS_IDS)
def test_rms_norm_rope_matches_func_jvp(dtype, interleaved, layout, form, head_dim, weighted, eps, scale):
    batch, heads, tokens = 2, 3, 5
    x = rand(*x_shape(layout, batch, heads, tokens, head_dim), dtype=dtype, scale=scale)
    tx = rand(*x.shape, dtype=dtype, scale=scale)
    weight = rand(head_dim) if weighted else None
    cos, sin = tables(tokens, head_dim, form, interleaved)
    check_jvp(x, tx, weight, cos, sin, eps, interleaved, layout, dtype,
              f"{dtype} {layout} {form} D={head_dim} weight={weighted} eps={eps}")


def test_rms_norm_rope_eps_matters():
    """eps enters the result: with mean(x^2) ~ 1e-4, eps = 1e-5 and eps = 0 give visibly different outputs, each
    matching its own reference."""
    x = rand(2, 3, 5, 16, dtype=torch.float64, scale=1e-2)
    tx = rand(*x.shape, dtype=torch.float64, scale=1e-2)
    cos, sin = tables(5, 16, "pair")
    out0, tout0 = check_jvp(x, tx, None, cos, sin, 0.0, True, "BHLD", torch.float64, "eps=0")
    out1, tout1 = check_jvp(x, tx, None, cos, sin, 1e-5, True, "BHLD", torch.float64, "eps=1e-5")
    assert (out0 - out1).abs().max() > 1e-3 and (tout0 - tout1).abs().max() > 1e-3


def test_rms_norm_rope_qkv_views_and_none_tangent():
    """q and k as an attention layer holds them: [B, L, H, D] slices of a [B, L, 3, H, D] qkv projection (and its
    tangent), read as [B, H, L, D] transposes and as the slices themselves (layout "BLHD", the transform's call;
    bitwise the same result); a channel-strided copy; x and x' in different memory orders; strided tables; None
    tangents."""
    batch, heads, tokens, head_dim = 2, 4, 6, 72
    qkv = rand(batch, tokens, 3, heads, head_dim)
    tqkv = rand(batch, tokens, 3, heads, head_dim)
    weight = rand(head_dim)
    cos, sin = tables(tokens, head_dim, "channel")
    for index, name in ((0, "q"), (1, "k")):
        x, tx = qkv[:, :, index].transpose(1, 2), tqkv[:, :, index].transpose(1, 2)  # [B, H, L, D] views
        assert not x.is_contiguous() and x.stride(-1) == 1
        out, tout = check_jvp(x, tx, weight, cos, sin, 1e-6, True, "BHLD", torch.float32, f"{name} BHLD view")
        out_l, tout_l = check_jvp(x.transpose(1, 2), tx.transpose(1, 2), weight, cos, sin, 1e-6, True, "BLHD",
                                  torch.float32, f"{name} BLHD view")
        torch.testing.assert_close(out_l, out.transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(tout_l, tout.transpose(1, 2), rtol=0, atol=0)
        check_jvp(x, None, weight, cos, sin, 1e-6, True, "BHLD", torch.float32, f"{name} view, None tangent")
    x, tx = qkv[:, :, 0].transpose(1, 2), tqkv[:, :, 0].transpose(1, 2)
    check_jvp(noncontiguous(x), noncontiguous(tx), noncontiguous(weight), noncontiguous(cos), noncontiguous(sin),
              1e-6, False, "BHLD", torch.float32, "channel-strided x, weight and tables")
    check_jvp(x, tx.contiguous(), None, cos, sin, 1e-6, False, "BHLD", torch.float32,
              "x and tx in different memory orders")
    wide = rand(tokens, 2 * head_dim)
    check_jvp(x, tx, None, wide[:, :head_dim].cos(), wide[:, head_dim:].sin(), 1e-6, True, "BHLD", torch.float32,
              "row-strided tables")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rms_norm_rope_none_tangent_is_exact_zero(dtype):
    x = rand(2, 5, 3, 8, dtype=dtype)
    cos, sin = tables(5, 8, "pair")
    out, tout = check_jvp(x, None, rand(8), cos, sin, 1e-6, True, "BLHD", dtype, "None tangent")
    assert tout.dtype == dtype and tout.shape == x.shape
    with_tangent, _ = rms_norm_rope_jvp(x, rand(*x.shape, dtype=dtype), torch.ones(8), cos, sin, layout="BLHD")
    no_weight, _ = rms_norm_rope_jvp(x, None, None, cos, sin, layout="BLHD")
    assert torch.equal(with_tangent, no_weight)  # weight of ones == no weight; the tangent does not touch out


def test_rms_norm_rope_empty_batch():
    x = rand(0, 3, 5, 8)
    cos, sin = tables(5, 8, "pair")
    out, tout = rms_norm_rope_jvp(x, x, rand(8), cos, sin)
    assert out.shape == x.shape and tout.shape == x.shape


def test_rms_norm_rope_layout_inference():
    cos, sin = tables(5, 8, "pair")
    w = rand(8)
    x = rand(2, 3, 5, 8)
    torch.testing.assert_close(rms_norm_rope_jvp(x, None, w, cos, sin)[0],
                               rms_norm_rope_jvp(x, None, w, cos, sin, layout="BHLD")[0], rtol=0, atol=0)
    y = rand(2, 5, 3, 8)
    torch.testing.assert_close(rms_norm_rope_jvp(y, None, w, cos, sin)[0],
                               rms_norm_rope_jvp(y, None, w, cos, sin, layout="BLHD")[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="^layout:"):
        rms_norm_rope_jvp(rand(2, 5, 5, 8), None, w, cos, sin)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rms_norm_rope_matches_unfused_ops(interleaved):
    """The path the transform took before the fused op: x, x' widened to fp32, rms_norm_jvp, rope_jvp, both outputs
    narrowed to bf16. The fused op rounds once (at the end), the unfused path the same way, so they agree to within
    a bf16 rounding."""
    qkv, tqkv = rand(2, 7, 3, 4, 72, dtype=torch.bfloat16), rand(2, 7, 3, 4, 72, dtype=torch.bfloat16)
    x, tx = qkv[:, :, 0].transpose(1, 2), tqkv[:, :, 0].transpose(1, 2)
    weight = rand(72)
    cos, sin = tables(7, 72, "channel", interleaved)
    n, tn = rms_norm_jvp(x.float(), tx.float(), weight, 1e-6)
    r, tr = rope_jvp(n, tn, cos, sin, interleaved, layout="BHLD")
    out, tout = rms_norm_rope_jvp(x, tx, weight, cos, sin, interleaved=interleaved, layout="BHLD")
    assert_rel_close(out, r.bfloat16(), torch.bfloat16, what="fused vs unfused primal")
    assert_rel_close(tout, tr.bfloat16(), torch.bfloat16, what="fused vs unfused tangent")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
def test_rms_norm_rope_custom_op_rstd(dtype, layout):
    """The custom op's third output (saved for the backward): rsqrt(mean(x^2) + eps) per row, x's shape without the
    channel dim, fp32 (fp64 for fp64 x)."""
    x = rand(*x_shape(layout, 2, 3, 5, 12), dtype=dtype)
    cos, sin = tables(5, 12, "pair")
    out, tout, rstd = torch.ops.facm_ext.rms_norm_rope_jvp(x, None, rand(12), 1e-5, cos, sin, True, layout)
    assert rstd.shape == x.shape[:-1]
    assert rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close(rstd, ref_rstd(x, 1e-5), torch.float64 if dtype == torch.float64 else torch.float32,
                     what="rstd")


def _gradients(fn, inputs, needs, probe):
    """Gradients of sum(fn(*inputs) * probe) w.r.t. the inputs flagged in ``needs`` (others get None); the leaves
    are detached aliases of the inputs, so strided views reach fn as they are."""
    leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
    out = fn(*leaves)
    (out * probe.to(device=out.device, dtype=out.dtype)).sum().backward()
    return [None if t is None else t.grad for t in leaves]


def check_gradients(x, weight, cos, sin, eps, interleaved, layout, dtype, needs=(True, True, True, True)):
    """Gradients of the op's primal output vs autograd through the float64 reference, for the inputs in ``needs``
    (x, weight, cos, sin)."""
    inputs = (x, weight, cos, sin)
    # One probe for both, rounded to x's dtype (the dtype of our output, whose gradient it is).
    probe = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view(x.shape).to(x.dtype)
    ours = _gradients(lambda a, w, c, s: rms_norm_rope_jvp(a, rand(*a.shape, dtype=a.dtype, device=a.device), w,
                                                           c, s, eps=eps, interleaved=interleaved,
                                                           layout=layout)[0], inputs, needs, probe)
    theirs = _gradients(lambda a, w, c, s: ref.rms_norm_rope(a, w, c, s, eps, interleaved, layout),
                        [f64(t) for t in inputs], needs, probe)
    for name, t, need, g, r in zip(("x", "weight", "cos", "sin"), inputs, needs, ours, theirs):
        if t is None or not need:
            assert g is None, f"{name}: unexpected gradient"
            continue
        assert g is not None, f"{name}: no gradient"
        assert g.dtype == t.dtype and g.shape == t.shape and g.device == t.device, name
        # A gradient comes in its input's dtype: held to the looser tolerance of that dtype and x's.
        tol_dtype = max(dtype, t.dtype, key=lambda d: REL_TOL[d])
        assert_rel_close(g, r, tol_dtype, what=f"gradient of {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("form", ["pair", "free"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
def test_rms_norm_rope_gradients_match_autograd(dtype, interleaved, layout, form, weighted):
    batch, heads, tokens, head_dim = 2, 3, 4, 12
    x = rand(*x_shape(layout, batch, heads, tokens, head_dim), dtype=dtype)
    weight = rand(head_dim, dtype=dtype) if weighted else None
    cos, sin = tables(tokens, head_dim, form, interleaved, dtype=dtype)
    check_gradients(x, weight, cos, sin, 1e-5, interleaved, layout, dtype)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (False, True, True, True)], ids=["x", "weight", "cos", "sin", "params"])
def test_rms_norm_rope_gradient_subsets(needs):
    """Only some inputs require grad (e.g. the weight without x): the backward's partial paths."""
    x = rand(2, 5, 3, 10)
    cos, sin = tables(5, 10, "channel")
    check_gradients(x, rand(10), cos, sin, 1e-6, True, "BLHD", torch.float32, needs=needs)


def test_rms_norm_rope_gradients_strided_low_precision():
    """bf16 x as a transposed qkv slice with an fp32 weight and tables (the transform's case): gradients of x in
    bf16, of the weight and tables in fp32."""
    qkv = rand(2, 6, 3, 4, 16, dtype=torch.bfloat16)
    cos, sin = tables(6, 16, "channel")
    check_gradients(qkv[:, :, 1].transpose(1, 2), rand(16), cos, sin, 1e-6, True, "BHLD", torch.bfloat16)


def test_rms_norm_rope_tangent_carries_no_graph():
    x = rand(1, 2, 3, 8).requires_grad_(True)
    tx = rand(1, 2, 3, 8).requires_grad_(True)
    weight = rand(8).requires_grad_(True)
    cos, sin = (t.requires_grad_(True) for t in tables(3, 8, "pair"))
    out, tout = rms_norm_rope_jvp(x, tx, weight, cos, sin)
    assert out.requires_grad and out.grad_fn is not None
    assert not tout.requires_grad and tout.grad_fn is None
    out, tout = rms_norm_rope_jvp(x, None, weight, cos, sin)
    assert not tout.requires_grad and tout.grad_fn is None


def _opcheck_cases(device="cpu"):
    x, tx = rand(2, 3, 5, 8, device=device), rand(2, 3, 5, 8, device=device)
    w = rand(8, device=device)
    cos, sin = tables(5, 8, "pair", device=device)
    cos_c, sin_c = tables(5, 8, "channel", device=device)
    return [
        (x.clone().requires_grad_(True), tx, w.clone().requires_grad_(True), 1e-6, cos, sin, True, "BHLD"),
        (x, None, None, 1e-5, cos_c.clone().requires_grad_(True), sin_c, False, "BHLD"),
        (x.transpose(1, 2).clone().requires_grad_(True), tx.transpose(1, 2), w, 0.0, cos,
         sin.clone().requires_grad_(True), False, "BLHD"),
        (x.double().requires_grad_(True), tx.double(), w.double().requires_grad_(True), 1e-6, cos.double(),
         sin.double(), True, "BHLD"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    torch.library.opcheck(torch.ops.facm_ext.rms_norm_rope_jvp.default, _opcheck_cases()[index])


def test_compile_fullgraph():
    def fn(q, tq, k, tk, wq, wk, cos, sin):
        q2, tq2 = rms_norm_rope_jvp(q, tq, wq, cos, sin)
        k2, tk2 = rms_norm_rope_jvp(k, tk, wk, cos, sin, eps=1e-5, interleaved=False, layout="BHLD")
        return q2 * k2, tq2 * k2 + q2 * tk2

    q, tq, k, tk = (rand(2, 3, 5, 8) for _ in range(4))
    wq, wk = rand(8), rand(8)
    cos, sin = tables(5, 8, "pair")
    q.requires_grad_(True)
    wq.requires_grad_(True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, tout = compiled(q, tq, k, tk, wq, wk, cos, sin)
    eager = fn(q, tq, k, tk, wq, wk, cos, sin)
    torch.testing.assert_close(out, eager[0])
    torch.testing.assert_close(tout, eager[1])
    out.sum().backward()
    assert q.grad is not None and wq.grad is not None


def test_op_info_registered():
    info = OP_REGISTRY["rms_norm_rope_jvp"]
    assert info.kernel == KERNEL and set(info.backends) == {"cuda", "reference"}


def test_bad_inputs_raise_value_error():
    x = rand(2, 3, 5, 8)
    w = rand(8)
    cos, sin = tables(5, 8, "pair")
    cases = [
        (lambda: rms_norm_rope_jvp(rand(3, 5, 8), None, w, cos, sin), "x"),
        (lambda: rms_norm_rope_jvp(x.long(), None, w, cos, sin), "x"),
        (lambda: rms_norm_rope_jvp(rand(2, 3, 5, 7), None, None, *tables(5, 6, "pair")), "x"),
        (lambda: rms_norm_rope_jvp(x, rand(2, 3, 5, 6), w, cos, sin), "tx"),
        (lambda: rms_norm_rope_jvp(x, rand(2, 3, 8), w, cos, sin), "tx"),
        (lambda: rms_norm_rope_jvp(x, x.double(), w, cos, sin), "tx"),
        (lambda: rms_norm_rope_jvp(x, None, rand(6), cos, sin), "weight"),
        (lambda: rms_norm_rope_jvp(x, None, rand(1, 8), cos, sin), "weight"),
        (lambda: rms_norm_rope_jvp(x, None, w.long(), cos, sin), "weight"),
        (lambda: rms_norm_rope_jvp(x, None, w.to("meta"), cos, sin), "weight"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos[None], sin), "cos"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos, sin[:, :2]), "sin"),
        (lambda: rms_norm_rope_jvp(x, None, w, rand(5, 3), rand(5, 3)), "cos"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos[:4], sin[:4], layout="BHLD"), "cos"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos.to("meta"), sin), "cos"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos, sin, layout="BHDL"), "layout"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos, sin, eps=-1e-6), "eps"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos, sin, eps=float("inf")), "eps"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos, sin, eps=float("nan")), "eps"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos, sin, eps=None), "eps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            call()


# -------------------------------------------------------------------------------------------------------------- GPU
def _assert_kernel_path(x, tx):
    """The op takes the compiled kernel for these inputs (the same test the op makes)."""
    assert _extension.has_kernel(KERNEL), _extension.load_error()
    assert x.shape[-1] <= MAX_KERNEL_HEAD_DIM and use_cuda_kernel(KERNEL, x, tx), "reference path selected"


# (table form, weight?, (eps, x scale)): each form and each weight choice meets both eps cases.
GPU_FORM_CASES = [("pair", True, EPS_CASES[0]), ("pair", False, EPS_CASES[1]), ("channel", True, EPS_CASES[1]),
                  ("channel", False, EPS_CASES[0]), ("free", True, EPS_CASES[0]), ("free", False, EPS_CASES[1])]


@requires_cuda
def test_cuda_rms_norm_rope_kernel_built():
    assert _extension.has_kernel(KERNEL), _extension.load_error()


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("head_dim", [64, 72, 128, 256, 6, 14, 192])
def test_cuda_rms_norm_rope(dtype, interleaved, layout, head_dim):
    """Kernel vs the float64 reference: every table form with and without weight, each form and each weight choice
    under both eps cases (six calls, not twelve: these run under compute-sanitizer); 30 rows (not a multiple of the
    8 rows per block). head_dim 6/14/64 hold one pair per lane, 72/128 two, 192 three, 256 four."""
    batch, heads, tokens = 2, 3, 5
    for form, weighted, (eps, scale) in GPU_FORM_CASES:
        x = rand(*x_shape(layout, batch, heads, tokens, head_dim), dtype=dtype, device="cuda", scale=scale)
        tx = rand(*x.shape, dtype=dtype, device="cuda", scale=scale)
        weight = rand(head_dim, device="cuda") if weighted else None
        cos, sin = tables(tokens, head_dim, form, interleaved, device="cuda")
        _assert_kernel_path(x, tx)
        check_jvp(x, tx, weight, cos, sin, eps, interleaved, layout, dtype, f"cuda {form} weight={weighted} eps={eps}")


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_cuda_rms_norm_rope_views(dtype, interleaved):
    """Strided inputs the kernel reads in place (unit channel stride) or copies (channel-strided): q and k slices of
    a [B, L, 3, H, D] qkv tensor as [B, H, L, D] and [B, L, H, D], misaligned data pointers, x and x' in different
    memory orders, channel-strided x, row-strided and channel-strided tables, None tangents."""
    batch, heads, tokens, head_dim = 2, 3, 6, 72
    qkv = rand(batch, tokens, 3, heads, head_dim, dtype=dtype, device="cuda")
    tqkv = rand(batch, tokens, 3, heads, head_dim, dtype=dtype, device="cuda")
    weight = rand(head_dim, device="cuda")
    cos, sin = tables(tokens, head_dim, "channel", interleaved, device="cuda")
    for index in (0, 1):
        x, tx = qkv[:, :, index].transpose(1, 2), tqkv[:, :, index].transpose(1, 2)
        _assert_kernel_path(x, tx)
        check_jvp(x, tx, weight, cos, sin, 1e-6, interleaved, "BHLD", dtype, f"qkv[{index}] BHLD view")
        check_jvp(x.transpose(1, 2), tx.transpose(1, 2), weight, cos, sin, 1e-6, interleaved, "BLHD", dtype,
                  f"qkv[{index}] BLHD view")
        check_jvp(x, None, weight, cos, sin, 1e-6, interleaved, "BHLD", dtype, f"qkv[{index}] view, None tangent")
    x, tx = qkv[:, :, 0].transpose(1, 2), tqkv[:, :, 0].transpose(1, 2)
    check_jvp(misaligned(x), misaligned(tx), weight, cos, sin, 1e-6, interleaved, "BHLD", dtype, "misaligned")
    check_jvp(misaligned(x), None, None, cos, sin, 1e-6, interleaved, "BHLD", dtype, "misaligned, None tangent")
    check_jvp(x, tx.contiguous(), weight, cos, sin, 1e-6, interleaved, "BHLD", dtype, "x, x' in different orders")
    check_jvp(noncontiguous(x), noncontiguous(tx), weight, cos, sin, 1e-6, interleaved, "BHLD", dtype,
              "channel-strided x (copied)")
    wide_cos = torch.cat((cos, rand(tokens, 8, device="cuda")), dim=-1)[:, :head_dim]  # row stride D + 8
    wide_sin = torch.cat((sin, rand(tokens, 8, device="cuda")), dim=-1)[:, :head_dim]
    check_jvp(x, tx, weight, wide_cos, wide_sin, 1e-6, interleaved, "BHLD", dtype, "row-strided tables (in place)")
    check_jvp(x, tx, weight, wide_cos, sin, 1e-6, interleaved, "BHLD", dtype, "tables of different row strides")
    check_jvp(x, tx, noncontiguous(weight), noncontiguous(cos), noncontiguous(sin), 1e-6, interleaved, "BHLD", dtype,
              "channel-strided weight and tables")


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 7), (3, 1, 3), (1, 5, 3), (2, 7, 37)],
                         ids=["rows1", "rows7", "rows9", "rows15", "rows518"])
def test_cuda_rms_norm_rope_ragged_rows(dtype, layout, shape):
    """B H L rows that are not a multiple of the kernel's 8 rows per block (the last block has idle warps), one
    position (table row stride 0), and the per-row rstd the kernel writes for the backward."""
    batch, heads, tokens = shape
    for head_dim in (6, 72):
        x = rand(*x_shape(layout, batch, heads, tokens, head_dim), dtype=dtype, device="cuda")
        tx = rand(*x.shape, dtype=dtype, device="cuda")
        weight = rand(head_dim, device="cuda")
        cos, sin = tables(tokens, head_dim, "pair", device="cuda")
        _assert_kernel_path(x, tx)
        check_jvp(x, tx, weight, cos, sin, 1e-6, True, layout, dtype, f"rows {shape} D={head_dim}")
        out, tout, rstd = torch.ops.facm_ext.rms_norm_rope_jvp(x, tx, weight, 1e-6, cos, sin, True, layout)
        assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
        assert_rel_close(rstd, ref_rstd(x, 1e-6), torch.float32, what="kernel rstd")


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_cuda_rms_norm_rope_empty_batch(dtype):
    """No rows: the kernel op returns its (empty) outputs without a launch."""
    x = rand(0, 3, 5, 8, dtype=dtype, device="cuda")
    cos, sin = tables(5, 8, "pair", device="cuda")
    out, tout = rms_norm_rope_jvp(x, x, rand(8, device="cuda"), cos, sin)
    assert out.shape == x.shape and tout.shape == x.shape and out.is_cuda


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float64])
@pytest.mark.parametrize("head_dim", [MAX_KERNEL_HEAD_DIM + 2, 512])
def test_cuda_rms_norm_rope_reference_fallback(dtype, head_dim):
    """head_dim > 256 (and fp64) on CUDA takes the PyTorch path (the kernel would reject the launch) and is still
    correct, with gradients."""
    x = rand(1, 2, 3, head_dim, dtype=dtype, device="cuda")
    tx = rand(*x.shape, dtype=dtype, device="cuda")
    weight = rand(head_dim, device="cuda")
    cos, sin = tables(3, head_dim, "pair", device="cuda")
    for interleaved in (True, False):
        check_jvp(x, tx, weight, cos, sin, 1e-6, interleaved, "BHLD", dtype, f"fallback D={head_dim}")
        check_jvp(x, None, None, cos, sin, 1e-6, interleaved, "BHLD", dtype, f"fallback D={head_dim}, None tangent")
    check_gradients(x, weight, cos, sin, 1e-6, True, "BHLD", dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_cuda_rms_norm_rope_bf16_params_and_opcheck(dtype):
    """bf16 (and fp64) weight and tables are converted to fp32 before the kernel; opcheck on CUDA of the public
    custom op and of the kernel op."""
    x = rand(2, 4, 6, 72, device="cuda", dtype=dtype)
    tx = rand(*x.shape, device="cuda", dtype=dtype)
    for param_dtype in (torch.bfloat16, torch.float16, torch.float64):
        cos, sin = tables(6, 72, "channel", device="cuda", dtype=param_dtype)
        weight = rand(72, device="cuda", dtype=param_dtype)
        check_jvp(x, tx, weight, cos, sin, 1e-6, True, "BHLD", dtype, f"{param_dtype} weight and tables")
    for args in _opcheck_cases("cuda"):
        torch.library.opcheck(torch.ops.facm_ext.rms_norm_rope_jvp.default, args)
    a = rand(2, 3, 5, 8, device="cuda", dtype=dtype)
    c, s = tables(5, 8, "pair", device="cuda")
    w = rand(8, device="cuda")
    torch.library.opcheck(torch.ops.facm_ext.rms_norm_rope_jvp_cuda.default, (a, a, w, 1e-6, c, s, True, "BHLD"))
    torch.library.opcheck(torch.ops.facm_ext.rms_norm_rope_jvp_cuda.default,
                          (a.transpose(1, 2), None, None, 0.0, c, s, False, "BLHD"))


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
def test_cuda_rms_norm_rope_gradients(dtype, interleaved, layout):
    """Gradients of the primal on CUDA (the backward reuses the kernel's rstd) vs autograd through the float64
    reference: x in x's dtype, fp32 weight and tables; and the transform's bf16 qkv-slice case."""
    x = rand(*x_shape(layout, 2, 3, 5, 72), dtype=dtype, device="cuda")
    cos, sin = tables(5, 72, "free", device="cuda")
    _assert_kernel_path(x, None)
    check_gradients(x, rand(72, device="cuda"), cos, sin, 1e-5, interleaved, layout, dtype)
    check_gradients(x, None, cos, sin, 1e-6, interleaved, layout, dtype, needs=(True, False, False, True))
    qkv = rand(2, 5, 3, 3, 72, dtype=dtype, device="cuda")
    view = qkv[:, :, 1].transpose(1, 2) if layout == "BHLD" else qkv[:, :, 1]
    check_gradients(view, rand(72, device="cuda"), cos, sin, 1e-6, interleaved, layout, dtype)


@requires_cuda
def test_cuda_rms_norm_rope_mixed_devices_raise():
    x = rand(2, 3, 5, 8, device="cuda")
    w = rand(8, device="cuda")
    cos, sin = tables(5, 8, "pair", device="cuda")
    cases = [
        (lambda: rms_norm_rope_jvp(x, rand(2, 3, 5, 8), w, cos, sin), "tx"),
        (lambda: rms_norm_rope_jvp(x, None, w.cpu(), cos, sin), "weight"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos.cpu(), sin), "cos"),
        (lambda: rms_norm_rope_jvp(x, None, w, cos, sin.cpu()), "sin"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            call()


@requires_cuda
def test_cuda_rms_norm_rope_large_grid():
    """More than 2^20 blocks x 8 rows: the grid is capped at 2^20 blocks and each warp loops over further rows
    (inputs broadcast over the batch, so every row equals the one-batch result bit for bit). Excluded from the
    sanitizer runs by the word "large"."""
    tokens, heads, head_dim = 16, 1, 8
    batch = (1 << 23) // (tokens * heads) + 3  # rows = 2^23 + 48
    x_one = rand(1, heads, tokens, head_dim, dtype=torch.bfloat16, device="cuda")
    t_one = rand(1, heads, tokens, head_dim, dtype=torch.bfloat16, device="cuda")
    weight = rand(head_dim, device="cuda")
    cos, sin = tables(tokens, head_dim, "pair", device="cuda")
    small_out, small_tout = rms_norm_rope_jvp(x_one, t_one, weight, cos, sin, layout="BHLD")
    big_x, big_t = x_one.expand(batch, -1, -1, -1), t_one.expand(batch, -1, -1, -1)
    out, tout = rms_norm_rope_jvp(big_x, big_t, weight, cos, sin, layout="BHLD")
    assert out.shape[0] * heads * tokens > (1 << 23)
    assert torch.equal(out, small_out.expand_as(out)) and torch.equal(tout, small_tout.expand_as(tout))
