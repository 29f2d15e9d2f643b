"""Norm-family fused JVP ops (facm_ext.ops.norms) against torch.func.jvp of the references (facm_ext.reference.norms).

CPU tests exercise the plain-PyTorch path (float64 against float64 references, and fp32/fp16/bf16 inputs against
float64); tests marked requires_cuda run the CUDA kernel (csrc/norms) and assert that the kernel really ran.
"""

from __future__ import annotations

import itertools
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import assert_rel_close, noncontiguous, requires_cuda
from facm_ext import _extension
from facm_ext.ops import _common
from facm_ext.ops import norms as norm_ops
from facm_ext.ops.norms import adaln_jvp, layer_norm_jvp, modulate_jvp, rms_norm_jvp
from facm_ext.reference import norms as ref

F64 = torch.float64
CHANNELS = [72, 128, 1152, 5120, 77, 1000]
MOD_KINDS = ["bc", "b1c", "per_token_strided"]
# (tx, tshift, tscale) present?  All eight combinations for modulate; adaLN uses the ones that matter below.
TANGENT_MASKS = list(itertools.product([True, False], repeat=3))
ADALN_MASKS = [(True, True, True), (True, False, False), (False, True, True), (False, False, True),
               (False, False, False)]


# ------------------------------------------------------------------------------------------------------ helpers
def make_mod(kind: str, b: int, l: int, c: int, *, dtype=F64, device="cpu", index: int = 0):
    """A modulation tensor of the given kind: [B, C], [B, 1, C], or a per-token strided [B, L, C] view (slice
    ``index`` of a [B, L, 6, C] buffer, as Wan's modulation)."""
    if kind == "bc":
        return torch.randn(b, c, dtype=dtype, device=device)
    if kind == "b1c":
        return torch.randn(b, 1, c, dtype=dtype, device=device)
    if kind == "per_token_strided":
        view = torch.randn(b, l, 6, c, dtype=dtype, device=device)[:, :, index]
        assert not view.is_contiguous()
        return view
    raise AssertionError(kind)


def zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


def ref_jvp(fn, primals, tangents):
    """torch.func.jvp of fn in float64 (None tangents are zeros)."""
    primals64 = tuple(p.detach().to(F64) for p in primals)
    tangents64 = tuple(zeros_if_none(t, p).detach().to(F64) for t, p in zip(tangents, primals64))
    return torch.func.jvp(fn, primals64, tangents64)


def check_pair(out, expected, dtype, what, factor=1.0):
    y, ty = out
    ry, rty = expected
    assert y.dtype == ty.dtype, what
    assert not ty.requires_grad and ty.grad_fn is None, f"{what}: the tangent must carry no graph"
    assert_rel_close(y, ry, dtype, what=f"{what} primal", factor=factor)
    assert_rel_close(ty, rty, dtype, what=f"{what} tangent", factor=factor)


def maybe(flag, t):
    return t if flag else None


# ------------------------------------------------------------------------------------------- float64 vs reference
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_layer_norm_matches_reference(c, affine, with_tangent):
    x = torch.randn(2, 3, c, dtype=F64) * 2 + 0.5
    tx = torch.randn_like(x) if with_tangent else None
    w = torch.randn(c, dtype=F64) if affine != "none" else None
    b = torch.randn(c, dtype=F64) if affine == "weight_bias" else None
    out = layer_norm_jvp(x, tx, w, b, eps=1e-6)
    expected = ref_jvp(lambda a: ref.layer_norm(a, w, b, 1e-6), (x,), (tx,))
    check_pair(out, expected, F64, f"layer_norm C={c} {affine}")
    if not with_tangent:
        assert torch.count_nonzero(out[1]) == 0


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_tangent", [True, False])
def test_rms_norm_matches_reference(c, with_weight, with_tangent):
    x = torch.randn(2, 3, c, dtype=F64)
    tx = torch.randn_like(x) if with_tangent else None
    w = torch.randn(c, dtype=F64) if with_weight else None
    out = rms_norm_jvp(x, tx, w, eps=1e-6)
    expected = ref_jvp(lambda a: ref.rms_norm(a, w, 1e-6), (x,), (tx,))
    check_pair(out, expected, F64, f"rms_norm C={c} weight={with_weight}")


@pytest.mark.parametrize("shape", [(7,), (5, 72), (2, 3, 4, 72), (2, 1, 3, 1, 128)])
def test_norms_any_rank(shape):
    x = torch.randn(*shape, dtype=F64)
    tx = torch.randn_like(x)
    check_pair(layer_norm_jvp(x, tx), ref_jvp(lambda a: ref.layer_norm(a), (x,), (tx,)), F64, f"layer {shape}")
    check_pair(rms_norm_jvp(x, tx), ref_jvp(lambda a: ref.rms_norm(a), (x,), (tx,)), F64, f"rms {shape}")


def test_rms_norm_qk_norm_strided_heads():
    """LightningDiT qk-norm: q, k are per-head [B, L, H, 72] views of a fused qkv projection."""
    b, l, h, d = 2, 5, 4, 72
    qkv = torch.randn(b, l, 3, h, d, dtype=F64)
    tqkv = torch.randn_like(qkv)
    q, tq = qkv[:, :, 0], tqkv[:, :, 0]
    w = torch.randn(d, dtype=F64)
    assert not q.is_contiguous()
    # The kernel path views these rows without a copy: [B*L, H, D] with strides (3*H*D, D, 1).
    assert norm_ops._rows_shape(q) == (b * l, h, d)
    q.view(norm_ops._rows_shape(q))
    check_pair(rms_norm_jvp(q, tq, w), ref_jvp(lambda a: ref.rms_norm(a, w), (q,), (tq,)), F64, "qk-norm")


def test_rows_shape_merges_leading_dims():
    x = torch.randn(4, 6, 8, 16)
    assert norm_ops._rows_shape(x) == (1, 4 * 6 * 8, 16)
    assert norm_ops._rows_shape(torch.randn(4, 6, 2, 8, 16)[:, :, 0]) == (4 * 6, 8, 16)
    assert norm_ops._rows_shape(x.permute(2, 0, 1, 3)) == (8, 4 * 6, 16)
    x.permute(2, 0, 1, 3).view(8, 4 * 6, 16)
    perm = x.permute(1, 0, 2, 3)  # three leading dims that cannot merge into two strides: the caller copies
    assert norm_ops._rows_shape(perm) is None
    assert norm_ops._rows_shape(torch.randn(16)) == (1, 1, 16)


def test_view3_views_in_place_or_copies_by_strides():
    """The kernel's [B', L', C] operand: a view of the same storage where the strides allow it, else a copy; never
    a failed view (decided from the strides)."""
    slab = torch.randn(4, 6, 2, 8, 16)
    x = slab[:, :, 0]  # [4, 6, 8, 16] with rows strided over two dims
    shape3 = norm_ops._rows_shape(x)
    view = norm_ops._view3(x, shape3)
    assert view.data_ptr() == x.data_ptr() and torch.equal(view, x.reshape(shape3))
    same_layout = slab[:, :, 1]
    assert norm_ops._view3(same_layout, shape3).data_ptr() == same_layout.data_ptr()
    contiguous = torch.randn(4, 6, 8, 16)
    assert norm_ops._view3(contiguous, shape3).data_ptr() == contiguous.data_ptr()
    other_layout = torch.randn(6, 4, 8, 16).transpose(0, 1)  # x's shape, strides unlike x's
    copied = norm_ops._view3(other_layout, shape3)
    assert copied.data_ptr() != other_layout.data_ptr() and torch.equal(copied, other_layout.reshape(shape3))


@pytest.mark.parametrize("kind", MOD_KINDS)
@pytest.mark.parametrize("mask", TANGENT_MASKS)
@pytest.mark.parametrize("c", [77, 1152])
def test_modulate_matches_reference(kind, mask, c):
    b, l = 2, 3
    x = torch.randn(b, l, c, dtype=F64)
    shift, scale = make_mod(kind, b, l, c, index=0), make_mod(kind, b, l, c, index=1)
    tx = maybe(mask[0], torch.randn_like(x))
    tshift = maybe(mask[1], make_mod(kind, b, l, c, index=3))
    tscale = maybe(mask[2], make_mod(kind, b, l, c, index=4))
    out = modulate_jvp(x, tx, shift, tshift, scale, tscale)
    expected = ref_jvp(ref.modulate, (x, shift, scale), (tx, tshift, tscale))
    check_pair(out, expected, F64, f"modulate {kind} {mask}")


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("kind", MOD_KINDS)
@pytest.mark.parametrize("mask", ADALN_MASKS)
@pytest.mark.parametrize("c", [72, 1000, 5120])
def test_adaln_matches_reference(norm, kind, mask, c):
    b, l = 2, 3
    x = torch.randn(b, l, c, dtype=F64) + 1.0
    shift, scale = make_mod(kind, b, l, c, index=0), make_mod(kind, b, l, c, index=1)
    w = torch.randn(c, dtype=F64) if norm == "rms" else None
    tx = maybe(mask[0], torch.randn_like(x))
    tshift = maybe(mask[1], make_mod(kind, b, l, c, index=3))
    tscale = maybe(mask[2], make_mod(kind, b, l, c, index=4))
    out = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm=norm, weight=w, eps=1e-6)
    expected = ref_jvp(lambda a, s, k: ref.adaln(a, s, k, norm, w, 1e-6), (x, shift, scale), (tx, tshift, tscale))
    check_pair(out, expected, F64, f"adaln {norm} {kind} {mask}")


def test_adaln_with_layer_weight():
    x, tx = torch.randn(2, 4, 96, dtype=F64), torch.randn(2, 4, 96, dtype=F64)
    shift, scale, tshift, tscale = (torch.randn(2, 96, dtype=F64) for _ in range(4))
    w = torch.randn(96, dtype=F64)
    out = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm="layer", weight=w)
    expected = ref_jvp(lambda a, s, k: ref.adaln(a, s, k, "layer", w), (x, shift, scale), (tx, tshift, tscale))
    check_pair(out, expected, F64, "adaln layer weight")


def test_noncontiguous_inputs():
    b, l, c = 2, 3, 72
    x, tx = noncontiguous(torch.randn(b, l, c, dtype=F64)), noncontiguous(torch.randn(b, l, c, dtype=F64))
    w, bias = noncontiguous(torch.randn(1, c, dtype=F64))[0], noncontiguous(torch.randn(1, c, dtype=F64))[0]
    shift, scale = noncontiguous(torch.randn(b, c, dtype=F64)), noncontiguous(torch.randn(b, l, c, dtype=F64))
    tshift, tscale = noncontiguous(torch.randn(b, c, dtype=F64)), noncontiguous(torch.randn(b, l, c, dtype=F64))
    check_pair(layer_norm_jvp(x, tx, w, bias), ref_jvp(lambda a: ref.layer_norm(a, w, bias), (x,), (tx,)), F64,
               "layer noncontiguous")
    check_pair(rms_norm_jvp(x, tx, w), ref_jvp(lambda a: ref.rms_norm(a, w), (x,), (tx,)), F64, "rms noncontiguous")
    check_pair(modulate_jvp(x, tx, shift, tshift, scale, tscale),
               ref_jvp(ref.modulate, (x, shift, scale), (tx, tshift, tscale)), F64, "modulate noncontiguous")
    check_pair(adaln_jvp(x, tx, shift, tshift, scale, tscale, norm="rms", weight=w),
               ref_jvp(lambda a, s, k: ref.adaln(a, s, k, "rms", w), (x, shift, scale), (tx, tshift, tscale)), F64,
               "adaln noncontiguous")


def test_empty_rows():
    x = torch.randn(0, 3, 72, dtype=F64)
    y, ty = layer_norm_jvp(x, x)
    assert y.shape == ty.shape == x.shape
    y, ty = adaln_jvp(x, None, torch.randn(0, 72, dtype=F64), None, torch.randn(0, 72, dtype=F64), None)
    assert y.shape == x.shape


# ------------------------------------------------------------------------------------ low precision, dtype rule
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mod_dtype", ["same", "fp32"])
def test_dtype_rule_cpu(dtype, mod_dtype):
    """fp32 math, outputs in x's dtype, fp32 modulation accepted with low-precision x (Wan)."""
    b, l, c = 2, 3, 1152
    md = dtype if mod_dtype == "same" else torch.float32
    x, tx = torch.randn(b, l, c, dtype=dtype), torch.randn(b, l, c, dtype=dtype)
    shift, scale = make_mod("per_token_strided", b, l, c, dtype=md, index=0), make_mod("bc", b, l, c, dtype=md)
    tshift, tscale = make_mod("per_token_strided", b, l, c, dtype=md, index=2), make_mod("bc", b, l, c, dtype=md)
    w = torch.randn(c, dtype=torch.float32)
    out = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm="rms", weight=w)
    assert out[0].dtype == dtype and out[1].dtype == dtype
    expected = ref_jvp(lambda a, s, k: ref.adaln(a, s, k, "rms", w.to(F64)), (x, shift, scale), (tx, tshift, tscale))
    check_pair(out, expected, dtype, f"adaln {dtype} mod {md}")
    out = layer_norm_jvp(x, tx.to(torch.float32), w, w)  # a tangent of another dtype is cast to x's dtype
    assert out[1].dtype == dtype
    check_pair(out, ref_jvp(lambda a: ref.layer_norm(a, w.to(F64), w.to(F64)), (x,), (tx.to(torch.float32),)),
               dtype, f"layer_norm {dtype}")


# ------------------------------------------------------------------------------------------------- gradients
def _grads(out, inputs, grad):
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, live, grad)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("op", ["layer", "rms", "modulate", "adaln_layer", "adaln_rms"])
@pytest.mark.parametrize("kind", MOD_KINDS)
def test_primal_gradients_match_reference(op, kind):
    b, l, c = 2, 3, 77
    x = _leaf(torch.randn(b, l, c, dtype=F64))
    tx = torch.randn(b, l, c, dtype=F64)
    w = _leaf(torch.randn(c, dtype=F64)) if op != "modulate" else None
    bias = _leaf(torch.randn(c, dtype=F64)) if op == "layer" else None
    # Gradients flow into the strided views' base as they would for Wan's [B, L, 6, C] modulation.
    shift, scale = _leaf(make_mod(kind, b, l, c, index=0)), _leaf(make_mod(kind, b, l, c, index=1))
    tshift, tscale = make_mod(kind, b, l, c, index=2), make_mod(kind, b, l, c, index=3)
    grad = torch.randn(b, l, c, dtype=F64)
    if op == "layer":
        inputs = (x, w, bias)
        ours = layer_norm_jvp(x, tx, w, bias)[0]
        theirs = ref.layer_norm(x, w, bias)
    elif op == "rms":
        inputs = (x, w)
        ours = rms_norm_jvp(x, tx, w)[0]
        theirs = ref.rms_norm(x, w)
    elif op == "modulate":
        inputs = (x, shift, scale)
        ours = modulate_jvp(x, tx, shift, tshift, scale, tscale)[0]
        theirs = ref.modulate(x, shift, scale)
    else:
        norm = op.split("_")[1]
        inputs = (x, shift, scale, w)
        ours = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm=norm, weight=w)[0]
        theirs = ref.adaln(x, shift, scale, norm, w)
    for name, g_ours, g_ref in zip(["x", "a", "b", "c"], _grads(ours, inputs, grad), _grads(theirs, inputs, grad)):
        assert g_ours.shape == g_ref.shape
        assert_rel_close(g_ours, g_ref, F64, what=f"{op} {kind} grad {name}")


def test_gradient_only_for_inputs_requiring_it():
    x = _leaf(torch.randn(2, 3, 72, dtype=F64))
    shift, scale = torch.randn(2, 72, dtype=F64), _leaf(torch.randn(2, 72, dtype=F64))
    y, ty = adaln_jvp(x, torch.randn_like(x), shift, None, scale, None)
    y.sum().backward()
    assert x.grad is not None and scale.grad is not None and shift.grad is None
    assert not ty.requires_grad


def test_low_precision_gradients_cpu():
    x = _leaf(torch.randn(2, 3, 1152, dtype=torch.bfloat16))
    w = _leaf(torch.randn(1152, dtype=torch.float32))
    shift, scale = _leaf(torch.randn(2, 1152)), _leaf(torch.randn(2, 1152))
    y, _ = adaln_jvp(x, None, shift, None, scale, None, norm="rms", weight=w)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, shift, scale, w), grad)
    x64, s64, k64, w64 = (_leaf(t.detach().to(F64)) for t in (x, shift, scale, w))
    want = torch.autograd.grad(ref.adaln(x64, s64, k64, "rms", w64), (x64, s64, k64, w64), grad.to(F64))
    for g, r, t in zip(got, want, (x, shift, scale, w)):
        assert g.dtype == t.dtype
        assert_rel_close(g, r, torch.bfloat16, what="bf16 grad")


# ---------------------------------------------------------------------------------------- custom op machinery
def _opcheck_samples(device="cpu", dtype=torch.float32):
    def t(*shape, grad=False):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)

    per_token = torch.randn(2, 3, 6, 72, dtype=dtype, device=device)
    return [
        (torch.ops.facm_ext.layer_norm_jvp.default, (t(2, 3, 72, grad=True), t(2, 3, 72), t(72, grad=True),
                                                     t(72, grad=True), 1e-6)),
        (torch.ops.facm_ext.layer_norm_jvp.default, (t(5, 77, grad=True), None, None, None, 1e-5)),
        (torch.ops.facm_ext.rms_norm_jvp.default, (t(2, 3, 4, 72, grad=True), t(2, 3, 4, 72), t(72), 1e-6)),
        (torch.ops.facm_ext.modulate_jvp.default, (t(2, 3, 72, grad=True), None, t(2, 72, grad=True), t(2, 72),
                                                   t(2, 72, grad=True), None)),
        (torch.ops.facm_ext.adaln_jvp.default, (t(2, 3, 72, grad=True), t(2, 3, 72), per_token[:, :, 0],
                                                per_token[:, :, 1], per_token[:, :, 2].requires_grad_(True),
                                                per_token[:, :, 3], t(72, grad=True), "rms", 1e-6)),
        (torch.ops.facm_ext.adaln_jvp.default, (t(2, 3, 72, grad=True), None, t(2, 1, 72), None, t(2, 72), None,
                                                None, "layer", 1e-6)),
        (torch.ops.facm_ext.adaln_jvp.default, (t(2, 3, 72, grad=True), t(2, 3, 72), t(2, 72, grad=True), None,
                                                t(2, 72), t(2, 72), t(72, grad=True), "rms", 1e-6, torch.bfloat16)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_out_dtype_rounds_the_fp32_result_once(norm, out_dtype):
    """out_dtype: the fp32 result rounded once to it (what casting the fp32 output gives), and the gradient of x
    through it equals the gradient through that cast."""
    b, l, c = 2, 3, 72
    x = torch.randn(b, l, c, requires_grad=True)
    tx, shift, tshift, scale, tscale = (torch.randn(b, c) if i else torch.randn(b, l, c) for i in range(5))
    w = torch.randn(c) if norm == "rms" else None
    y, ty = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm=norm, weight=w, out_dtype=out_dtype)
    y32, ty32 = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm=norm, weight=w)
    assert y.dtype == ty.dtype == out_dtype
    assert torch.equal(y, y32.to(out_dtype)) and torch.equal(ty, ty32.to(out_dtype))
    g = torch.randn(b, l, c).to(out_dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    (grad32,) = torch.autograd.grad(y32.to(out_dtype), x, g)
    assert torch.equal(grad, grad32)
    with pytest.raises(ValueError, match="^out_dtype: "):
        adaln_jvp(x, tx, shift, tshift, scale, tscale, norm=norm, weight=w, out_dtype=torch.int32)


def test_compile_fullgraph_matches_eager():
    b, l, c = 2, 3, 72
    x = _leaf(torch.randn(b, l, c))
    tx = torch.randn(b, l, c)
    shift, scale = _leaf(torch.randn(b, c)), _leaf(torch.randn(b, l, c))
    tshift, tscale = torch.randn(b, c), torch.randn(b, l, c)
    w = _leaf(torch.randn(c))

    def block(x, tx, shift, tshift, scale, tscale, w):
        h, th = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm="rms", weight=w)
        h, th = layer_norm_jvp(h, th, w, None)
        h, th = rms_norm_jvp(h.view(b, l, 4, c // 4), th.view(b, l, 4, c // 4))
        h, th = modulate_jvp(h.view(b, l, c), th.view(b, l, c), shift, tshift, scale, tscale)
        return h, th

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = (x, tx, shift, tshift, scale, tscale, w)
    got, want = compiled(*args), block(*args)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    grad = torch.randn(b, l, c)
    leaves = (x, shift, scale, w)
    for g, r in zip(torch.autograd.grad(got[0], leaves, grad), torch.autograd.grad(want[0], leaves, grad)):
        torch.testing.assert_close(g, r)


def test_op_info_registered():
    for name in ("layer_norm_jvp", "rms_norm_jvp", "modulate_jvp", "adaln_jvp"):
        info = _common.OP_REGISTRY[name]
        assert info.kernel == norm_ops.KERNEL and set(info.backends) == {"cuda", "reference"}


def test_cpu_tensors_use_reference_path():
    x = torch.randn(2, 3, 72)
    assert norm_ops.backend_for(x, None) == "reference"


# -------------------------------------------------------------------------------------------------- bad inputs
def _bad_cases():
    x = torch.randn(2, 3, 8)
    m = torch.randn(2, 8)
    meta = torch.randn(2, 3, 8, device="meta")
    return [
        ("x", lambda: layer_norm_jvp("x", None)),
        ("x", lambda: layer_norm_jvp(torch.ones(2, 3, 8, dtype=torch.int32), None)),
        ("x", lambda: layer_norm_jvp(torch.randn(2, 0), None)),
        ("tx", lambda: layer_norm_jvp(x, torch.randn(2, 3, 9))),
        ("tx", lambda: rms_norm_jvp(x, meta)),
        ("weight", lambda: layer_norm_jvp(x, None, torch.randn(9))),
        ("weight", lambda: rms_norm_jvp(x, None, torch.randn(1, 8))),
        ("bias", lambda: layer_norm_jvp(x, None, None, torch.randn(7))),
        ("eps", lambda: layer_norm_jvp(x, None, eps=-1.0)),
        ("eps", lambda: rms_norm_jvp(x, None, eps=float("nan"))),
        ("eps", lambda: rms_norm_jvp(x, None, eps="1e-6")),
        ("x", lambda: modulate_jvp(torch.randn(3, 8), None, m, None, m, None)),
        ("shift", lambda: modulate_jvp(x, None, torch.randn(3, 8), None, m, None)),
        ("shift", lambda: modulate_jvp(x, None, None, None, m, None)),
        ("scale", lambda: modulate_jvp(x, None, m, None, torch.randn(2, 4, 8), None)),
        ("scale", lambda: modulate_jvp(x, None, m, None, torch.randn(8), None)),
        ("scale", lambda: modulate_jvp(x, None, m, None, torch.randn(2, 8, device="meta"), None)),
        ("tshift", lambda: modulate_jvp(x, None, m, torch.randn(2, 1, 8), m, None)),
        ("tscale", lambda: adaln_jvp(x, None, m, None, m, torch.randn(2, 9))),
        ("norm", lambda: adaln_jvp(x, None, m, None, m, None, norm="batch")),
        ("weight", lambda: adaln_jvp(x, None, m, None, m, None, norm="rms", weight=torch.randn(4))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_inputs_raise_value_error(index):
    name, call = _bad_cases()[index]
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


# ------------------------------------------------------------------------------------------------- CUDA kernel
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _require_kernel():
    assert _extension.has_kernel(norm_ops.KERNEL), (
        f"CUDA device present but kernel op facm_ext::{norm_ops.KERNEL} missing: {_extension.load_error()}")


def _gpu_case(op, dtype, shape, kind="bc", mod_dtype=None, mask=(True, True, True), misaligned=False,
              out_dtype=None):
    """Run one op on CUDA (asserting the kernel path) and compare with the float64 reference of the same inputs."""
    _require_kernel()
    dev = "cuda"
    b, l, c = shape

    def tensor(*s, dt=dtype):
        if misaligned:  # start one element into a buffer whose rows are one element longer: no 16-byte alignment
            buf = torch.randn(*s[:-1], s[-1] + 1, dtype=dt, device=dev)
            return buf[..., 1:]
        return torch.randn(*s, dtype=dt, device=dev)

    x = tensor(b, l, c)
    x.add_(0.3)  # in place: keeps the misaligned view
    tx = maybe(mask[0], tensor(b, l, c))
    md = mod_dtype or dtype
    shift, scale = make_mod(kind, b, l, c, dtype=md, device=dev, index=0), make_mod(kind, b, l, c, dtype=md,
                                                                                   device=dev, index=1)
    tshift = maybe(mask[1], make_mod(kind, b, l, c, dtype=md, device=dev, index=2))
    tscale = maybe(mask[2], make_mod(kind, b, l, c, dtype=md, device=dev, index=3))
    w = torch.randn(c, device=dev)
    bias = torch.randn(c, device=dev)
    if op == "layer":
        args, backend_args = (x, tx, w, bias), (x, tx, w, bias)
        out = layer_norm_jvp(*args)
        expected = ref_jvp(lambda a: ref.layer_norm(a, w.double(), bias.double()), (x,), (tx,))
    elif op == "rms":
        args, backend_args = (x, tx, w), (x, tx, w)
        out = rms_norm_jvp(*args)
        expected = ref_jvp(lambda a: ref.rms_norm(a, w.double()), (x,), (tx,))
    elif op == "modulate":
        backend_args = (x, tx, shift, tshift, scale, tscale)
        out = modulate_jvp(x, tx, shift, tshift, scale, tscale)
        expected = ref_jvp(ref.modulate, (x, shift, scale), (tx, tshift, tscale))
    else:
        norm = op.split("_")[1]
        wn = w if norm == "rms" else None
        backend_args = (x, tx, shift, tshift, scale, tscale, wn)
        out = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm=norm, weight=wn, out_dtype=out_dtype)
        expected = ref_jvp(lambda a, s, k: ref.adaln(a, s, k, norm, None if wn is None else wn.double()),
                           (x, shift, scale), (tx, tshift, tscale))
        if out_dtype is not None:
            # One rounding of the fp32 result: exactly the fp32 output cast.
            wide = adaln_jvp(x, tx, shift, tshift, scale, tscale, norm=norm, weight=wn)
            assert torch.equal(out[0], wide[0].to(out_dtype)) and torch.equal(out[1], wide[1].to(out_dtype))
    assert norm_ops.backend_for(*backend_args) == "cuda"
    out_dtype = out_dtype or dtype
    assert out[0].dtype == out[1].dtype == out_dtype and out[0].is_contiguous() and out[1].is_contiguous()
    check_pair(out, expected, out_dtype,
               f"cuda {op} {dtype} {shape} {kind} mod={md} mask={mask} misaligned={misaligned} out={out_dtype}")


# 16-bit rows of > 128 aligned vectors take the shared-memory-staged kernel unless this asks for the register one.
STAGING_ENV = "FACM_EXT_NORMS_ROW_STAGING"


@requires_cuda
@pytest.mark.parametrize("staging", ["default", "registers"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("c", [72, 128, 1152, 5120, 77, 1000, 8191, 8192])
@pytest.mark.parametrize("op", ["layer", "rms", "modulate", "adaln_layer", "adaln_rms"])
def test_cuda_kernel_matches_reference(dtype, c, op, staging, monkeypatch):
    if staging == "registers":
        monkeypatch.setenv(STAGING_ENV, "registers")
    _gpu_case(op, dtype, (3, 37, c))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [1152, 5120])
@pytest.mark.parametrize("mask", TANGENT_MASKS)
@pytest.mark.parametrize("op", ["adaln_layer", "adaln_rms"])
def test_cuda_staged_per_token_modulation(dtype, c, mask, op):
    # Shared-memory-staged rows (> 128 vectors) with per-token modulation of x's dtype, every tangent subset.
    _gpu_case(op, dtype, (2, 7, c), kind="per_token_strided", mask=mask)


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind", MOD_KINDS)
@pytest.mark.parametrize("mask", TANGENT_MASKS)
@pytest.mark.parametrize("op", ["modulate", "adaln_layer", "adaln_rms"])
def test_cuda_kernel_modulation_and_tangents(dtype, kind, mask, op):
    _gpu_case(op, dtype, (2, 19, 1152), kind=kind, mask=mask)


@requires_cuda
@pytest.mark.parametrize("staging", ["default", "registers"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [5120, 1000])
def test_cuda_kernel_fp32_per_token_modulation(x_dtype, c, staging, monkeypatch):
    """Wan: fp32 (or bf16) x with fp32 per-token modulation sliced from a [B, L, 6, C] tensor."""
    if staging == "registers":
        monkeypatch.setenv(STAGING_ENV, "registers")
    _gpu_case("adaln_layer", x_dtype, (1, 257, c), kind="per_token_strided", mod_dtype=torch.float32)
    _gpu_case("modulate", x_dtype, (1, 257, c), kind="per_token_strided", mod_dtype=torch.float32)


@requires_cuda
@pytest.mark.parametrize("staging", ["default", "registers"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [72, 1152, 5120, 1000])
@pytest.mark.parametrize("kind", ["bc", "per_token_strided"])
@pytest.mark.parametrize("mod_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["adaln_layer", "adaln_rms"])
def test_cuda_adaln_narrow_output(op, mod_dtype, kind, c, out_dtype, staging, monkeypatch):
    """fp32 x, outputs in the 16-bit dtype the consumer casts to: written by the staged kernel (C = 1152, 5120),
    cast after the register kernel elsewhere (C = 72, 1000, or staging off); bit-equal to the fp32 outputs cast."""
    if staging == "registers":
        monkeypatch.setenv(STAGING_ENV, "registers")
    _gpu_case(op, torch.float32, (2, 19, c), kind=kind, mod_dtype=mod_dtype, out_dtype=out_dtype)
    _gpu_case(op, torch.float32, (2, 19, c), kind=kind, mod_dtype=mod_dtype, out_dtype=out_dtype,
              mask=(True, False, True))


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("c", [72, 1152, 5120])
@pytest.mark.parametrize("op", ["layer", "rms", "adaln_layer", "adaln_rms"])
def test_cuda_kernel_misaligned_views(dtype, c, op):
    _gpu_case(op, dtype, (2, 5, c), misaligned=True, kind="per_token_strided")


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 72), (1, 1, 5120), (4, 1, 1152), (1, 1, 1), (2, 3, 3), (1, 4096, 128)])
def test_cuda_kernel_small_and_edge_shapes(dtype, shape):
    _gpu_case("adaln_layer", dtype, shape)
    if shape[-1] > 1:  # RMSNorm of one channel is +-1 and its tangent ~eps/x^2: ill-conditioned in any precision
        _gpu_case("rms", dtype, shape)


@requires_cuda
def test_cuda_qk_norm_large_many_rows():
    """LightningDiT qk-norm at training shape: 64 * 256 * 16 rows of 72 channels, a strided view of qkv."""
    _require_kernel()
    qkv = torch.randn(64, 256, 3, 16, 72, dtype=torch.bfloat16, device="cuda")
    tqkv = torch.randn_like(qkv)
    w = torch.randn(72, device="cuda")
    q, tq = qkv[:, :, 0], tqkv[:, :, 0]
    assert norm_ops.backend_for(q, tq, w) == "cuda"
    out = rms_norm_jvp(q, tq, w)
    expected = ref_jvp(lambda a: ref.rms_norm(a, w.double()), (q,), (tq,))
    check_pair(out, expected, torch.bfloat16, "qk-norm cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_beyond_kernel_limit_falls_back(dtype):
    x = torch.randn(2, 3, 16384, dtype=dtype, device="cuda")
    tx = torch.randn_like(x)
    assert norm_ops.backend_for(x, tx) == "reference"
    check_pair(layer_norm_jvp(x, tx), ref_jvp(lambda a: ref.layer_norm(a), (x,), (tx,)), dtype, "C=16384")


@requires_cuda
def test_cuda_float64_uses_reference_path():
    x, tx = torch.randn(2, 3, 72, dtype=F64, device="cuda"), torch.randn(2, 3, 72, dtype=F64, device="cuda")
    assert norm_ops.backend_for(x, tx) == "reference"
    check_pair(rms_norm_jvp(x, tx), ref_jvp(lambda a: ref.rms_norm(a), (x,), (tx,)), F64, "cuda fp64")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["layer", "modulate", "adaln_rms"])
def test_cuda_primal_gradients(dtype, op):
    _require_kernel()
    b, l, c = 2, 33, 1152
    x = _leaf(torch.randn(b, l, c, dtype=dtype, device="cuda"))
    tx = torch.randn(b, l, c, dtype=dtype, device="cuda")
    w = _leaf(torch.randn(c, device="cuda"))
    bias = _leaf(torch.randn(c, device="cuda"))
    shift = _leaf(make_mod("bc", b, l, c, dtype=torch.float32, device="cuda"))
    scale = _leaf(make_mod("per_token_strided", b, l, c, dtype=torch.float32, device="cuda"))
    grad = torch.randn(b, l, c, dtype=dtype, device="cuda")
    if op == "layer":
        leaves = (x, w, bias)
        y = layer_norm_jvp(x, tx, w, bias)[0]
        fn = lambda a, ww, bb: ref.layer_norm(a, ww, bb)  # noqa: E731
    elif op == "modulate":
        leaves = (x, shift, scale)
        y = modulate_jvp(x, tx, shift, None, scale, None)[0]
        fn = ref.modulate
    else:
        leaves = (x, shift, scale, w)
        y = adaln_jvp(x, tx, shift, None, scale, None, norm="rms", weight=w)[0]
        fn = lambda a, s, k, ww: ref.adaln(a, s, k, "rms", ww)  # noqa: E731
    got = torch.autograd.grad(y, leaves, grad)
    leaves64 = tuple(_leaf(t.detach().double()) for t in leaves)
    want = torch.autograd.grad(fn(*leaves64), leaves64, grad.double())
    for g, r, t in zip(got, want, leaves):
        assert g.dtype == t.dtype
        assert_rel_close(g, r, dtype, what=f"cuda grad {op}")


@requires_cuda
def test_cuda_deterministic_large():
    _require_kernel()
    x = torch.randn(8, 300, 5120, dtype=torch.bfloat16, device="cuda")
    shift, scale = torch.randn(8, 5120, device="cuda"), torch.randn(8, 5120, device="cuda")
    first = adaln_jvp(x, x, shift, shift, scale, scale)
    second = adaln_jvp(x, x, shift, shift, scale, scale)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@requires_cuda
@pytest.mark.parametrize("index", range(6))
def test_cuda_opcheck(index):
    _require_kernel()
    op, args = _opcheck_samples(device="cuda", dtype=torch.bfloat16)[index]
    torch.library.opcheck(op, args)


@requires_cuda
def test_cuda_kernel_op_opcheck():
    _require_kernel()
    assert norm_ops.register_kernel_fake()
    kernel = getattr(torch.ops.facm_ext, norm_ops.KERNEL).default
    x = torch.randn(2, 5, 72, dtype=torch.bfloat16, device="cuda")
    mod = torch.randn(2, 1, 72, device="cuda").expand(2, 5, 72)
    w = torch.randn(72, device="cuda")
    torch.library.opcheck(kernel, (x, x, w, None, mod, mod, mod, None, 2, 1e-6))
    torch.library.opcheck(kernel, (x, None, None, None, None, None, None, None, 1, 1e-6))


# The C++ input checks run in a child process: a crash there (one segfaulted once on torch 2.11, not reproduced on
# CPU with 2.14) then fails this test with the last check reached instead of ending the whole test session.
_KERNEL_CHECKS_SCRIPT = """
import torch
from facm_ext import _extension
assert _extension.load(), _extension.load_error()
kernel = torch.ops.facm_ext.norm_modulate_jvp_cuda.default
x = torch.randn(2, 5, 72, dtype=torch.bfloat16, device="cuda")
mod = torch.randn(2, 1, 72, device="cuda").expand(2, 5, 72)
cases = {
    "tx dtype": (x, x.float(), None, None, None, None, None, None, 1, 1e-6),
    "x channels not contiguous": (x.transpose(1, 2).contiguous().transpose(1, 2), None, None, None, None, None,
                                  None, None, 1, 1e-6),
    "modulation dtypes differ": (x, None, None, None, mod, None, mod.bfloat16(), None, 0, 1e-6),
    "tangent shape": (x, x[:, :4], None, None, None, None, None, None, 2, 1e-6),
    "weight dtype": (x, None, torch.randn(72, device="cuda", dtype=torch.bfloat16), None, None, None, None, None,
                     2, 1e-6),
    "bias with rms": (x, None, None, torch.randn(72, device="cuda"), None, None, None, None, 2, 1e-6),
    "bad norm": (x, None, None, None, None, None, None, None, 3, 1e-6),
}
for name, args in cases.items():
    print("CHECK", name, flush=True)
    try:
        kernel(*args)
        print("NO ERROR", name, flush=True)
    except RuntimeError as exc:
        print("RAISED", name, "|", str(exc).splitlines()[0], flush=True)
print("DONE", flush=True)
"""


@requires_cuda
def test_cuda_kernel_op_rejects_bad_inputs():
    _require_kernel()
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _KERNEL_CHECKS_SCRIPT], capture_output=True, text=True,
                          timeout=300, cwd=repo_root)
    out = proc.stdout
    assert proc.returncode == 0 and "DONE" in out, (
        f"child exited with {proc.returncode}; its output:\n{out}\n{proc.stderr[-3000:]}")
    expected = {"tx dtype": "tx must have the dtype of x", "x channels not contiguous": "contiguous in its last dim",
                "modulation dtypes differ": "share one dtype", "tangent shape": "must have the shape of x",
                "weight dtype": "weight must be a contiguous float32", "bias with rms": "RMSNorm takes no bias",
                "bad norm": "norm must be 0"}
    for name, message in expected.items():
        line = next((ln for ln in out.splitlines() if ln.startswith(("RAISED " + name, "NO ERROR " + name))), "")
        assert line.startswith("RAISED") and message in line, f"{name}: {line or 'not reached'}"


@requires_cuda
def test_cuda_compile_fullgraph():
    _require_kernel()
    x = _leaf(torch.randn(2, 16, 1152, dtype=torch.bfloat16, device="cuda"))
    shift, scale = torch.randn(2, 1152, device="cuda"), torch.randn(2, 1152, device="cuda")

    def fn(x, shift, scale):
        return adaln_jvp(x, x.detach(), shift, shift, scale, scale, norm="layer")

    compiled = torch.compile(fn, fullgraph=True)
    for g, r in zip(compiled(x, shift, scale), fn(x, shift, scale)):
        torch.testing.assert_close(g, r)
