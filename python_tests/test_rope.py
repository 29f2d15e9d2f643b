"""Tests of rope_jvp against torch.func.jvp of facm_ext/reference/rope.py in float64: both pair conventions, both
layouts, per-channel and per-pair tables, strided views, None tangents, gradients, custom-op machinery; the
requires_cuda tests exercise the compiled kernel."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_rel_close, misaligned, noncontiguous, requires_cuda
from facm_ext import _extension
from facm_ext.ops import rope_jvp
from facm_ext.ops._common import OP_REGISTRY
from facm_ext.reference import rope as ref

CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)


def f64(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def tables(tokens, head_dim, form, device="cpu", dtype=torch.float32):
    """cos, sin tables. "pair": [L, D/2] angles; "channel": EVA's [L, D] with each pair's angle repeated (the
    repetition follows the convention); "free": [L, D] with an independent angle per channel (exercises the
    channel-by-channel semantics)."""
    angles = torch.rand(tokens, head_dim // 2 if form == "pair" else head_dim, dtype=torch.float64) * 6.3
    if form == "channel":
        angles = angles[:, : head_dim // 2].repeat_interleave(2, dim=-1)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def x_shape(layout, batch, heads, tokens, head_dim):
    return (batch, heads, tokens, head_dim) if layout == "BHLD" else (batch, tokens, heads, head_dim)


def ref_jvp(x, tx, cos, sin, interleaved, layout):
    tx64 = torch.zeros_like(f64(x)) if tx is None else f64(tx)
    return torch.func.jvp(lambda a: ref.rope(a, f64(cos), f64(sin), interleaved, layout), (f64(x),), (tx64,))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("form", ["pair", "channel", "free"])
@pytest.mark.parametrize("head_dim", [72, 128, 14])
def test_rope_matches_func_jvp(dtype, interleaved, layout, form, head_dim):
    batch, heads, tokens = 2, 3, 5
    x = rand(*x_shape(layout, batch, heads, tokens, head_dim), dtype=dtype)
    tx = rand(*x.shape, dtype=dtype)
    cos, sin = tables(tokens, head_dim, form)
    out, tout = rope_jvp(x, tx, cos, sin, interleaved, layout=layout)
    rout, rtout = ref_jvp(x, tx, cos, sin, interleaved, layout)
    assert out.dtype == dtype and tout.dtype == dtype and out.is_contiguous()
    assert_rel_close(out, rout, dtype, what="rope primal")
    assert_rel_close(tout, rtout, dtype, what="rope tangent")


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rope_strided_views_and_none_tangent(interleaved):
    batch, heads, tokens, head_dim = 2, 4, 6, 72
    # q of a fused qkv projection [B, L, 3, H, D]: a BLHD view with token stride 3 H D ...
    qkv = rand(batch, tokens, 3, heads, head_dim)
    tqkv = rand(batch, tokens, 3, heads, head_dim)
    q, tq = qkv[:, :, 0], tqkv[:, :, 0]
    cos, sin = tables(tokens, head_dim, "pair")
    out, tout = rope_jvp(q, tq, cos, sin, interleaved, layout="BLHD")
    rout, rtout = ref_jvp(q, tq, cos, sin, interleaved, "BLHD")
    assert_rel_close(out, rout, torch.float32, what="BLHD view primal")
    assert_rel_close(tout, rtout, torch.float32, what="BLHD view tangent")
    # ... and the same as a BHLD view after the usual transpose
    out_t, tout_t = rope_jvp(q.transpose(1, 2), tq.transpose(1, 2), cos, sin, interleaved, layout="BHLD")
    assert_rel_close(out_t, rout.transpose(1, 2), torch.float32, what="BHLD transposed primal")
    assert_rel_close(tout_t, rtout.transpose(1, 2), torch.float32, what="BHLD transposed tangent")
    # non-unit channel stride and strided tables
    cos_wide, sin_wide = noncontiguous(cos), noncontiguous(sin)
    out_n, tout_n = rope_jvp(noncontiguous(q), None, cos_wide, sin_wide, interleaved, layout="BLHD")
    assert_rel_close(out_n, rout, torch.float32, what="non-contiguous primal")
    assert torch.equal(tout_n, torch.zeros_like(tout_n))


def test_rope_interleaved_pairs_equal_wan_complex_form():
    """Wan's rope: view x as complex pairs and multiply by freqs = cos + i sin (per pair)."""
    batch, tokens, heads, head_dim = 1, 7, 2, 16
    x = rand(batch, tokens, heads, head_dim, dtype=torch.float64)
    angles = torch.rand(tokens, head_dim // 2, dtype=torch.float64) * 6.3
    freqs = torch.polar(torch.ones_like(angles), angles)
    wan = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs[:, None, :]).flatten(-2)
    out, _ = rope_jvp(x, None, angles.cos(), angles.sin(), True)
    assert_rel_close(out, wan, torch.float64, what="Wan complex form")


def test_rope_eva_form():
    """LightningDiT/EVA: t * freqs_cos + rotate_half_interleaved(t) * freqs_sin with [L, D] pair-repeated tables."""
    batch, heads, tokens, head_dim = 2, 2, 9, 8
    x = rand(batch, heads, tokens, head_dim, dtype=torch.float64)
    cos, sin = tables(tokens, head_dim, "channel", dtype=torch.float64)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    out, _ = rope_jvp(x, None, cos, sin, True)
    assert_rel_close(out, x * cos + rotated * sin, torch.float64, what="EVA form")


def test_rope_layout_inference():
    cos, sin = tables(5, 8, "pair")
    x = rand(2, 3, 5, 8)
    torch.testing.assert_close(rope_jvp(x, None, cos, sin)[0], rope_jvp(x, None, cos, sin, layout="BHLD")[0])
    y = rand(2, 5, 3, 8)
    torch.testing.assert_close(rope_jvp(y, None, cos, sin)[0], rope_jvp(y, None, cos, sin, layout="BLHD")[0])
    with pytest.raises(ValueError, match="^layout:"):
        rope_jvp(rand(2, 5, 5, 8), None, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("form", ["pair", "free"])
def test_rope_gradients_match_autograd(dtype, interleaved, layout, form):
    batch, heads, tokens, head_dim = 2, 3, 4, 12
    x0 = rand(*x_shape(layout, batch, heads, tokens, head_dim), dtype=dtype)
    cos0, sin0 = tables(tokens, head_dim, form, dtype=dtype)

    def grads(fn):
        x, cos, sin = (t.clone().requires_grad_(True) for t in (x0, cos0, sin0))
        out = fn(x, cos, sin)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)).sum().backward()
        return x.grad, cos.grad, sin.grad

    ours = grads(lambda x, c, s: rope_jvp(x, rand(*x.shape, dtype=dtype), c, s, interleaved, layout=layout)[0])
    theirs = grads(lambda x, c, s: ref.rope(x, c, s, interleaved, layout))
    for name, g, r in zip(("x", "cos", "sin"), ours, theirs):
        assert g is not None, name
        assert_rel_close(g, r, dtype, what=f"gradient of {name}")


def test_rope_tangent_carries_no_graph():
    x = rand(1, 2, 3, 8).requires_grad_(True)
    tx = rand(1, 2, 3, 8).requires_grad_(True)
    cos, sin = tables(3, 8, "pair")
    out, tout = rope_jvp(x, tx, cos, sin)
    assert out.requires_grad and not tout.requires_grad and tout.grad_fn is None


def _opcheck_cases(device="cpu"):
    x, tx = rand(2, 3, 5, 8, device=device), rand(2, 3, 5, 8, device=device)
    cos, sin = tables(5, 8, "pair", device=device)
    cos_c, sin_c = tables(5, 8, "channel", device=device)
    return [
        (x.clone().requires_grad_(True), tx, cos, sin, True, "BHLD"),
        (x, None, cos_c.clone().requires_grad_(True), sin_c, False, "BHLD"),
        (x.transpose(1, 2).clone().requires_grad_(True), tx.transpose(1, 2), cos, sin.clone().requires_grad_(True),
         False, "BLHD"),
    ]


@pytest.mark.parametrize("index", range(3))
def test_opcheck(index):
    torch.library.opcheck(torch.ops.facm_ext.rope_jvp.default, _opcheck_cases()[index])


def test_compile_fullgraph():
    def fn(q, tq, k, tk, cos, sin):
        q2, tq2 = rope_jvp(q, tq, cos, sin, True)
        k2, tk2 = rope_jvp(k, tk, cos, sin, False, layout="BHLD")
        return q2 * k2, tq2 * k2 + q2 * tk2

    q, tq, k, tk = (rand(2, 3, 5, 8) for _ in range(4))
    cos, sin = tables(5, 8, "pair")
    q.requires_grad_(True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, tout = compiled(q, tq, k, tk, cos, sin)
    eager = fn(q, tq, k, tk, cos, sin)
    torch.testing.assert_close(out, eager[0])
    torch.testing.assert_close(tout, eager[1])
    out.sum().backward()
    assert q.grad is not None


def test_op_info_registered():
    info = OP_REGISTRY["rope_jvp"]
    assert info.kernel == "rope_jvp_cuda" and set(info.backends) == {"cuda", "reference"}


def test_bad_inputs_raise_value_error():
    x = rand(2, 3, 5, 8)
    cos, sin = tables(5, 8, "pair")
    cases = [
        (lambda: rope_jvp(rand(3, 5, 8), None, cos, sin), "x"),
        (lambda: rope_jvp(x.long(), None, cos, sin), "x"),
        (lambda: rope_jvp(rand(2, 3, 5, 7), None, *tables(5, 6, "pair")), "x"),
        (lambda: rope_jvp(x, rand(2, 3, 5, 6), cos, sin), "tx"),
        (lambda: rope_jvp(x, x.double(), cos, sin), "tx"),
        (lambda: rope_jvp(x, None, cos[None], sin), "cos"),
        (lambda: rope_jvp(x, None, cos, sin[:, :2]), "sin"),
        (lambda: rope_jvp(x, None, rand(5, 3), rand(5, 3)), "cos"),
        (lambda: rope_jvp(x, None, cos[:4], sin[:4], layout="BHLD"), "cos"),
        (lambda: rope_jvp(x, None, cos, sin, layout="BHDL"), "layout"),
        (lambda: rope_jvp(x, None, cos.to("meta"), sin), "cos"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            call()


# -------------------------------------------------------------------------------------------------------------- GPU
@requires_cuda
def test_cuda_kernel_built():
    assert _extension.has_kernel("rope_jvp_cuda"), _extension.load_error()


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("layout", ["BHLD", "BLHD"])
@pytest.mark.parametrize("form", ["pair", "channel", "free"])
@pytest.mark.parametrize("head_dim", [72, 128, 14])
def test_cuda_rope(dtype, interleaved, layout, form, head_dim):
    batch, heads, tokens = 2, 5, 33
    x = rand(*x_shape(layout, batch, heads, tokens, head_dim), dtype=dtype, device="cuda")
    tx = rand(*x.shape, dtype=dtype, device="cuda")
    cos, sin = tables(tokens, head_dim, form, device="cuda")
    rout, rtout = ref_jvp(x, tx, cos, sin, interleaved, layout)
    for view in ("contiguous", "misaligned", "transposed"):
        if view == "contiguous":
            xi, txi, lay = x, tx, layout
        elif view == "misaligned":
            xi, txi, lay = misaligned(x), misaligned(tx), layout
        else:  # the same values in the other layout's memory order
            xi = x.transpose(1, 2).contiguous().transpose(1, 2)
            txi, lay = tx.transpose(1, 2).contiguous().transpose(1, 2), layout
        out, tout = rope_jvp(xi, txi, cos, sin, interleaved, layout=lay)
        assert out.is_cuda and out.dtype == dtype and out.is_contiguous()
        assert_rel_close(out, rout, dtype, what=f"primal ({view})")
        assert_rel_close(tout, rtout, dtype, what=f"tangent ({view})")
    out, tout = rope_jvp(x, None, cos, sin, interleaved, layout=layout)
    assert_rel_close(out, rout, dtype, what="primal, no tangent")
    assert torch.equal(tout, torch.zeros_like(tout))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("form", ["pair", "channel"])
@pytest.mark.parametrize("case", ["flat_head_major", "flat_token_major", "looping_large_tables", "looping_sliced_view",
                                  "looping_mixed_orders"])
def test_cuda_rope_kernel_forms(dtype, interleaved, form, case):
    """Each kernel form on aligned vectors. Flat: x, x' and the output dense in one memory order ([B, H, L, D] with
    small tables, or [B, L, H, D]), odd token and head counts. Looping: [B, H, L, D] with tables over 4 MiB, a
    16-byte-aligned slice of a wider tensor, and x and x' in different memory orders."""
    batch, heads, tokens, head_dim = 2, 3, 33, 128
    layout = "BLHD" if case == "flat_token_major" else "BHLD"
    if case == "looping_large_tables":  # 2 tables x 4200 x 128 (or 64) x 4 bytes > 4 MiB for the channel form
        batch, heads, tokens = 1, 2, 8400 if form == "pair" else 4200
    shape = x_shape(layout, batch, heads, tokens, head_dim)
    x = rand(*shape, dtype=dtype, device="cuda")
    tx = rand(*shape, dtype=dtype, device="cuda")
    if case == "looping_sliced_view":
        x = torch.cat([x, rand(*shape, dtype=dtype, device="cuda")], dim=-1)[..., :head_dim]
    if case == "looping_mixed_orders":
        tx = tx.transpose(1, 2).contiguous().transpose(1, 2)
    cos, sin = tables(tokens, head_dim, form, device="cuda")
    rout, rtout = ref_jvp(x, tx, cos, sin, interleaved, layout)
    out, tout = rope_jvp(x, tx, cos, sin, interleaved, layout=layout)
    assert_rel_close(out, rout, dtype, what=f"primal ({case})")
    assert_rel_close(tout, rtout, dtype, what=f"tangent ({case})")
    out, tout = rope_jvp(x, None, cos, sin, interleaved, layout=layout)
    assert_rel_close(out, rout, dtype, what=f"primal, no tangent ({case})")
    assert torch.equal(tout, torch.zeros_like(tout))


@requires_cuda
def test_cuda_rope_bf16_tables_and_opcheck():
    x = rand(2, 4, 6, 72, device="cuda", dtype=torch.bfloat16)
    cos, sin = tables(6, 72, "channel", device="cuda", dtype=torch.bfloat16)
    out, _ = rope_jvp(x, None, cos, sin)
    rout, _ = ref_jvp(x, None, cos, sin, True, "BHLD")
    assert_rel_close(out, rout, torch.bfloat16, what="bf16 tables")
    for args in _opcheck_cases("cuda"):
        torch.library.opcheck(torch.ops.facm_ext.rope_jvp.default, args)
    a = rand(2, 3, 5, 8, device="cuda")
    c, s = tables(5, 8, "pair", device="cuda")
    torch.library.opcheck(torch.ops.facm_ext.rope_jvp_cuda.default, (a, a, c, s, True, "BHLD"))


@requires_cuda
def test_cuda_large_64bit_index():
    """More than 2^31 work elements selects the 64-bit index instantiation (inputs broadcast over the batch)."""
    tokens, head_dim = 16, 128
    batch = (2**31) // (tokens * head_dim) + 1
    x_one = rand(1, 1, tokens, head_dim, dtype=torch.bfloat16, device="cuda")
    cos, sin = tables(tokens, head_dim, "pair", device="cuda")
    small_out, small_tout = rope_jvp(x_one, x_one, cos, sin, layout="BHLD")
    big = x_one.expand(batch, 1, tokens, head_dim)
    out, tout = rope_jvp(big, big, cos, sin, layout="BHLD")
    assert out.numel() > 2**31
    assert torch.equal(out, small_out.expand_as(out)) and torch.equal(tout, small_tout.expand_as(tout))
