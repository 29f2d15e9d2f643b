"""Tests of the pointwise JVP ops (gated residual, GELU, SiLU, SwiGLU) against torch.func.jvp of the references
in facm_ext/reference/pointwise.py, computed in float64 from the same (rounded) input values.

CPU tests exercise the PyTorch path; tests marked requires_cuda exercise the compiled kernels (and fail, rather
than silently testing the PyTorch path, when the extension was built without them).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_rel_close, misaligned, noncontiguous, REL_TOL, requires_cuda
from facm_ext import _extension
from facm_ext.ops import gated_residual_jvp, gelu_jvp, silu_jvp, swiglu_jvp
from facm_ext.ops._common import OP_REGISTRY
from facm_ext.reference import pointwise as ref

CPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [72, 128, 1152, 5120, 77, 1001]


def rand(*shape, dtype=torch.float32, device="cpu", scale=2.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).to(device=device, dtype=dtype)


def f64(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def ref_jvp(fn, primals, tangents):
    """torch.func.jvp of fn in float64 on CPU; None tangents are zeros."""
    primals = tuple(f64(p) for p in primals)
    tangents = tuple(torch.zeros_like(p) if t is None else f64(t) for p, t in zip(primals, tangents))
    return torch.func.jvp(fn, primals, tangents)


def tokens_for(width):
    return 2 if width >= 1152 else 5


# ------------------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_func_jvp(dtype, width, approximate):
    x, tx = rand(2, tokens_for(width), width, dtype=dtype), rand(2, tokens_for(width), width, dtype=dtype)
    y, ty = gelu_jvp(x, tx, approximate)
    ry, rty = ref_jvp(lambda a: ref.gelu(a, approximate), (x,), (tx,))
    assert y.dtype == dtype and ty.dtype == dtype
    assert_rel_close(y, ry, dtype, what="gelu primal")
    assert_rel_close(ty, rty, dtype, what="gelu tangent")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_silu_matches_func_jvp(dtype, width):
    x, tx = rand(2, tokens_for(width), width, dtype=dtype, scale=4.0), rand(2, tokens_for(width), width, dtype=dtype)
    y, ty = silu_jvp(x, tx)
    ry, rty = ref_jvp(ref.silu, (x,), (tx,))
    assert_rel_close(y, ry, dtype, what="silu primal")
    assert_rel_close(ty, rty, dtype, what="silu tangent")


def test_silu_extreme_inputs_stay_finite():
    x = torch.tensor([[-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]])
    y, ty = silu_jvp(x, torch.ones_like(x))
    ry, rty = ref_jvp(ref.silu, (x,), (torch.ones_like(x),))
    assert torch.isfinite(y).all() and torch.isfinite(ty).all()
    assert_rel_close(y, ry, torch.float32, what="silu primal")
    assert_rel_close(ty, rty, torch.float32, what="silu tangent")


@pytest.mark.parametrize("op,fn", [(lambda x, t: gelu_jvp(x, t, "tanh"), lambda a: ref.gelu(a, "tanh")),
                                   (silu_jvp, ref.silu)], ids=["gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_noncontiguous_and_none_tangent(op, fn, dtype):
    x, tx = rand(3, 4, 77, dtype=dtype), rand(3, 4, 77, dtype=dtype)
    y, ty = op(noncontiguous(x), noncontiguous(tx))
    ry, rty = ref_jvp(fn, (x,), (tx,))
    assert_rel_close(y, ry, dtype, what="primal, non-contiguous")
    assert_rel_close(ty, rty, dtype, what="tangent, non-contiguous")
    y0, ty0 = op(x.transpose(0, 1), None)
    assert_rel_close(y0, ry.transpose(0, 1), dtype, what="primal, transposed, no tangent")
    assert torch.equal(ty0, torch.zeros_like(ty0))


# ---------------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_swiglu_split_views_match_func_jvp(dtype, width):
    """a, b are the two halves of one [B, L, 2C] Linear output (strided views), as in LightningDiT."""
    h, th = rand(2, tokens_for(width), 2 * width, dtype=dtype), rand(2, tokens_for(width), 2 * width, dtype=dtype)
    a, b = h.chunk(2, dim=-1)
    ta, tb = th.chunk(2, dim=-1)
    assert not a.is_contiguous()
    out, tout = swiglu_jvp(a, ta, b, tb)
    rout, rtout = ref_jvp(ref.swiglu, (a, b), (ta, tb))
    assert out.dtype == dtype
    assert_rel_close(out, rout, dtype, what="swiglu primal")
    assert_rel_close(tout, rtout, dtype, what="swiglu tangent")


@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_swiglu_none_tangents(which):
    a, b, ta, tb = (rand(2, 3, 72) for _ in range(4))
    ta_in = None if which in ("a", "both") else ta
    tb_in = None if which in ("b", "both") else tb
    out, tout = swiglu_jvp(a, ta_in, b, tb_in)
    rout, rtout = ref_jvp(ref.swiglu, (a, b), (ta_in if ta_in is None else ta, tb_in if tb_in is None else tb))
    assert_rel_close(out, rout, torch.float32, what="primal")
    if which == "both":
        assert torch.equal(tout, torch.zeros_like(tout))
    else:
        assert_rel_close(tout, rtout, torch.float32, what="tangent")


# -------------------------------------------------------------------------------------------------- gated residual
def gate_variants(batch, tokens, width, dtype, device="cpu"):
    """(name, gate, tgate): [B, C], [B, 1, C], per-token [B, L, C] contiguous, and Wan's slice of [B, L, 6, C]."""
    full = rand(batch, tokens, 6, width, dtype=dtype, device=device)
    tfull = rand(batch, tokens, 6, width, dtype=dtype, device=device)
    return [
        ("per_sample", rand(batch, width, dtype=dtype, device=device), rand(batch, width, dtype=dtype, device=device)),
        ("per_sample_3d", rand(batch, 1, width, dtype=dtype, device=device),
         rand(batch, 1, width, dtype=dtype, device=device)),
        ("per_token", rand(batch, tokens, width, dtype=dtype, device=device),
         rand(batch, tokens, width, dtype=dtype, device=device)),
        ("per_token_strided", full[:, :, 2], tfull[:, :, 5]),
    ]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_gated_residual_matches_func_jvp(dtype, width):
    batch, tokens = 2, tokens_for(width)
    x, tx, y, ty = (rand(batch, tokens, width, dtype=dtype) for _ in range(4))
    for name, gate, tgate in gate_variants(batch, tokens, width, dtype):
        h, th = gated_residual_jvp(x, tx, gate, tgate, y, ty)
        rh, rth = ref_jvp(ref.gated_residual, (x, gate, y), (tx, tgate, ty))
        assert h.dtype == dtype and th.dtype == dtype
        assert_rel_close(h, rh, dtype, what=f"primal, gate {name}")
        assert_rel_close(th, rth, dtype, what=f"tangent, gate {name}")


@pytest.mark.parametrize("present", list(itertools.product([True, False], repeat=3)),
                         ids=lambda p: "".join("1" if v else "0" for v in p))
def test_gated_residual_none_tangents(present):
    x, tx, y, ty = (rand(2, 5, 77) for _ in range(4))
    gate, tgate = rand(2, 77), rand(2, 77)
    tangents = [t if keep else None for t, keep in zip((tx, tgate, ty), present)]
    h, th = gated_residual_jvp(x, tangents[0], gate, tangents[1], y, tangents[2])
    rh, rth = ref_jvp(ref.gated_residual, (x, gate, y), tangents)
    assert_rel_close(h, rh, torch.float32, what="primal")
    if any(present):
        assert_rel_close(th, rth, torch.float32, what="tangent")
    else:
        assert torch.equal(th, torch.zeros_like(th))


@pytest.mark.parametrize("y_dtype,gate_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_gated_residual_mixed_dtypes(y_dtype, gate_dtype):
    """Wan: fp32 residual stream x, bf16 branch output y, fp32 per-token gate. Output in x's dtype, fp32 math."""
    batch, tokens, width = 1, 6, 72
    x, tx = rand(batch, tokens, width), rand(batch, tokens, width)
    y, ty = rand(batch, tokens, width, dtype=y_dtype), rand(batch, tokens, width, dtype=y_dtype)
    _, gate, tgate = gate_variants(batch, tokens, width, gate_dtype)[3]
    h, th = gated_residual_jvp(noncontiguous(x), tx, gate, tgate, y, ty)
    rh, rth = ref_jvp(ref.gated_residual, (x, gate, y), (tx, tgate, ty))
    assert h.dtype == torch.float32 and th.dtype == torch.float32
    assert_rel_close(h, rh, torch.float32, what="primal")
    assert_rel_close(th, rth, torch.float32, what="tangent")


# ------------------------------------------------------------------------------------------------------- gradients
def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    weight = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape)
    (out * weight).sum().backward()
    return [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["gelu_tanh", "gelu_none", "silu", "swiglu", "gated_per_sample", "gated_per_token"])
def test_primal_gradients_match_autograd(dtype, case):
    shape = (2, 5, 72)
    if case.startswith("gelu"):
        approximate = case.split("_")[1]
        ours, theirs = (lambda x: gelu_jvp(x, None, approximate)[0]), (lambda x: ref.gelu(x, approximate))
        inputs = [rand(*shape, dtype=dtype)]
    elif case == "silu":
        ours, theirs, inputs = (lambda x: silu_jvp(x, None)[0]), ref.silu, [rand(*shape, dtype=dtype)]
    elif case == "swiglu":
        ours, theirs = (lambda a, b: swiglu_jvp(a, None, b, None)[0]), ref.swiglu
        inputs = [rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)]
    else:
        gate_shape = (2, 72) if case == "gated_per_sample" else shape
        ours = lambda x, g, y: gated_residual_jvp(x, None, g, None, y, None)[0]  # noqa: E731
        theirs = ref.gated_residual
        inputs = [rand(*shape, dtype=dtype), rand(*gate_shape, dtype=dtype), rand(*shape, dtype=dtype)]
    for ours_grad, ref_grad in zip(_grads(ours, inputs), _grads(theirs, inputs)):
        assert ours_grad is not None
        assert_rel_close(ours_grad, ref_grad, dtype, what=f"{case} gradient")


def test_gated_residual_mixed_dtype_gradients():
    x = rand(1, 4, 72).requires_grad_(True)
    full = rand(1, 4, 6, 72).requires_grad_(True)
    y = rand(1, 4, 72, dtype=torch.bfloat16).requires_grad_(True)
    h, th = gated_residual_jvp(x, None, full[:, :, 1], None, y, None)
    h.sum().backward()
    assert x.grad.dtype == torch.float32 and y.grad.dtype == torch.bfloat16
    assert_rel_close(full.grad[:, :, 1], y.detach().double(), torch.float32, what="gate gradient")
    assert torch.equal(full.grad[:, :, 0], torch.zeros_like(full.grad[:, :, 0]))
    assert_rel_close(y.grad, full.detach()[:, :, 1].double(), torch.bfloat16, what="y gradient")


def test_tangent_outputs_carry_no_graph():
    x = rand(2, 3, 8).requires_grad_(True)
    g = rand(2, 8).requires_grad_(True)
    tx = rand(2, 3, 8).requires_grad_(True)  # even a tangent that requires grad must not create a graph
    results = [gelu_jvp(x, tx), silu_jvp(x, tx), swiglu_jvp(x, tx, x, tx), gated_residual_jvp(x, tx, g, None, x, tx)]
    for primal, tangent in results:
        assert primal.requires_grad and primal.grad_fn is not None
        assert not tangent.requires_grad and tangent.grad_fn is None


# ------------------------------------------------------------------------------------------- custom-op machinery
def _opcheck_cases(device="cpu"):
    x, tx, y, ty = (rand(2, 3, 72, device=device) for _ in range(4))
    gate, tgate = rand(2, 1, 72, device=device), rand(2, 1, 72, device=device)
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (torch.ops.facm_ext.gelu_jvp.default, (req(x), tx, "tanh")),
        (torch.ops.facm_ext.gelu_jvp.default, (x, None, "none")),
        (torch.ops.facm_ext.silu_jvp.default, (req(x), tx)),
        (torch.ops.facm_ext.swiglu_jvp.default, (req(x), tx, req(y), None)),
        (torch.ops.facm_ext.gated_residual_jvp.default, (req(x), tx, req(gate), tgate, req(y), ty)),
        (torch.ops.facm_ext.gated_residual_jvp.default, (x, None, gate, None, y, None)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    def block(x, tx, gate, tgate, a, ta, b, tb):
        h, th = gated_residual_jvp(x, tx, gate, tgate, x, tx)
        g, tg = gelu_jvp(h, th, "tanh")
        s, ts = silu_jvp(g, tg)
        w, tw = swiglu_jvp(a, ta, b, tb)
        return s + w, ts + tw

    x, tx, a, ta, b, tb = (rand(2, 3, 72) for _ in range(6))
    gate, tgate = rand(2, 72), rand(2, 72)
    x.requires_grad_(True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, tout = compiled(x, tx, gate, tgate, a, ta, b, tb)
    eager_out, eager_tout = block(x, tx, gate, tgate, a, ta, b, tb)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(tout, eager_tout)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_op_info_registered():
    for name in ("gated_residual_jvp", "gelu_jvp", "silu_jvp", "swiglu_jvp"):
        info = OP_REGISTRY[name]
        assert info.kernel == f"{name}_cuda" and set(info.backends) == {"cuda", "reference"}


# ------------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_value_error():
    x = rand(2, 3, 8)
    cases = [
        (lambda: gelu_jvp(x.long(), None), "x"),
        (lambda: gelu_jvp([1.0], None), "x"),
        (lambda: gelu_jvp(x, rand(2, 3, 7)), "tx"),
        (lambda: gelu_jvp(x, x.double()), "tx"),
        (lambda: gelu_jvp(x, None, "erf"), "approximate"),
        (lambda: gelu_jvp(x, x.to("meta")), "tx"),
        (lambda: silu_jvp(torch.tensor(1.0), None), "x"),
        (lambda: swiglu_jvp(x, None, rand(2, 3, 9), None), "b"),
        (lambda: swiglu_jvp(x, None, x.half(), None), "b"),
        (lambda: swiglu_jvp(x, None, x, rand(2, 3)), "tb"),
        (lambda: gated_residual_jvp(x, None, rand(3, 8), None, x, None), "gate"),
        (lambda: gated_residual_jvp(x, None, rand(2, 3, 9), None, x, None), "gate"),
        (lambda: gated_residual_jvp(x, None, rand(2, 8), rand(2, 7), x, None), "tgate"),
        (lambda: gated_residual_jvp(x, None, rand(2, 8), None, rand(2, 4, 8), None), "y"),
        (lambda: gated_residual_jvp(x, None, rand(2, 8).to("meta"), None, x, None), "gate"),
        (lambda: gated_residual_jvp(x, None, rand(2, 8), None, x, x.half()), "ty"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            call()


# -------------------------------------------------------------------------------------------------------------- GPU
@requires_cuda
def test_cuda_kernels_built():
    for name in ("gelu_jvp_cuda", "silu_jvp_cuda", "swiglu_jvp_cuda", "gated_residual_jvp_cuda"):
        assert _extension.has_kernel(name), f"{name} missing: {_extension.load_error()}"


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("width", [72, 1152, 5120, 77, 1001])
@pytest.mark.parametrize("view", ["contiguous", "misaligned", "noncontiguous"])
def test_cuda_activations(dtype, width, view):
    make = {"contiguous": lambda t: t, "misaligned": misaligned, "noncontiguous": noncontiguous}[view]
    x = rand(3, 7, width, dtype=dtype, device="cuda", scale=3.0)
    tx = rand(3, 7, width, dtype=dtype, device="cuda")
    for approximate in ("tanh", "none"):
        y, ty = gelu_jvp(make(x), make(tx), approximate)
        ry, rty = ref_jvp(lambda a: ref.gelu(a, approximate), (x,), (tx,))
        assert y.is_cuda and y.dtype == dtype
        assert_rel_close(y, ry, dtype, what=f"gelu {approximate} primal")
        assert_rel_close(ty, rty, dtype, what=f"gelu {approximate} tangent")
    y, ty = silu_jvp(make(x), make(tx))
    ry, rty = ref_jvp(ref.silu, (x,), (tx,))
    assert_rel_close(y, ry, dtype, what="silu primal")
    assert_rel_close(ty, rty, dtype, what="silu tangent")
    y, ty = gelu_jvp(make(x), None)
    assert torch.equal(ty, torch.zeros_like(ty))
    assert_rel_close(y, ref_jvp(lambda a: ref.gelu(a, "tanh"), (x,), (tx,))[0], dtype, what="gelu, no tangent")


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("width", [3072, 72, 77])
@pytest.mark.parametrize("tangents", ["both", "a", "b", "none"])
def test_cuda_swiglu(dtype, width, tangents):
    h = rand(2, 9, 2 * width, dtype=dtype, device="cuda", scale=3.0)
    th = rand(2, 9, 2 * width, dtype=dtype, device="cuda")
    a, b = h.chunk(2, dim=-1)
    ta, tb = th.chunk(2, dim=-1)
    ta = ta if tangents in ("both", "a") else None
    tb = tb if tangents in ("both", "b") else None
    out, tout = swiglu_jvp(a, ta, b, tb)
    rout, rtout = ref_jvp(ref.swiglu, (a, b), (ta, tb))
    assert_rel_close(out, rout, dtype, what="swiglu primal")
    if tangents == "none":
        assert torch.equal(tout, torch.zeros_like(tout))
    else:
        assert_rel_close(tout, rtout, dtype, what="swiglu tangent")
    out_m, tout_m = swiglu_jvp(misaligned(a), None if ta is None else misaligned(ta), misaligned(b),
                               None if tb is None else misaligned(tb))
    assert_rel_close(out_m, rout, dtype, what="swiglu primal, misaligned")
    if tangents == "none":
        assert torch.equal(tout_m, torch.zeros_like(tout_m))
    else:
        assert_rel_close(tout_m, rtout, dtype, what="swiglu tangent, misaligned")


@requires_cuda
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float16,) * 3, (torch.bfloat16,) * 3,
                                    (torch.bfloat16, torch.float32, torch.bfloat16),
                                    (torch.float32, torch.float32, torch.bfloat16),
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float32, torch.float16)],
                         ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@pytest.mark.parametrize("width", [1152, 5120, 77])
def test_cuda_gated_residual(dtypes, width):
    # [B, C] gates with aligned dense operands take the two-rows-per-thread kernel: 3 x 11 rows put a thread's
    # rows in two batches (rows 10 and 11) and leave the last thread one row; the other gates and the misaligned
    # views take the one-row kernel.
    x_dtype, gate_dtype, y_dtype = dtypes
    batch, tokens = 3, 11
    x, tx = rand(batch, tokens, width, dtype=x_dtype, device="cuda"), rand(batch, tokens, width, dtype=x_dtype,
                                                                            device="cuda")
    y, ty = rand(batch, tokens, width, dtype=y_dtype, device="cuda"), rand(batch, tokens, width, dtype=y_dtype,
                                                                            device="cuda")
    for name, gate, tgate in gate_variants(batch, tokens, width, gate_dtype, device="cuda"):
        for present in itertools.product([True, False], repeat=3):
            tangents = [t if keep else None for t, keep in zip((tx, tgate, ty), present)]
            h, th = gated_residual_jvp(x, tangents[0], gate, tangents[1], y, tangents[2])
            rh, rth = ref_jvp(ref.gated_residual, (x, gate, y), tangents)
            assert h.dtype == x_dtype and th.dtype == x_dtype
            assert_rel_close(h, rh, x_dtype, what=f"primal, gate {name}")
            if any(present):
                assert_rel_close(th, rth, x_dtype, what=f"tangent, gate {name}, tangents {present}")
            else:
                assert torch.equal(th, torch.zeros_like(th))
        h_m, th_m = gated_residual_jvp(misaligned(x), misaligned(tx), gate, tgate, misaligned(y), misaligned(ty))
        rh, rth = ref_jvp(ref.gated_residual, (x, gate, y), (tx, tgate, ty))
        assert_rel_close(h_m, rh, x_dtype, what=f"primal, misaligned, gate {name}")
        assert_rel_close(th_m, rth, x_dtype, what=f"tangent, misaligned, gate {name}")


@requires_cuda
def test_cuda_gradients_and_opcheck():
    x = rand(2, 5, 72, device="cuda").requires_grad_(True)
    y = rand(2, 5, 72, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    gate = rand(2, 72, device="cuda").requires_grad_(True)
    h, th = gated_residual_jvp(x, None, gate, None, y, None)
    assert not th.requires_grad
    h.sum().backward()
    assert_rel_close(gate.grad, y.detach().double().sum(1), torch.float32, what="gate gradient")
    for index in range(6):
        op, args = _opcheck_cases("cuda")[index]
        torch.library.opcheck(op, args)
    a = rand(2, 3, 72, device="cuda")
    torch.library.opcheck(torch.ops.facm_ext.gelu_jvp_cuda.default, (a, a, "tanh"))
    torch.library.opcheck(torch.ops.facm_ext.swiglu_jvp_cuda.default, (a, None, a, a))
    torch.library.opcheck(torch.ops.facm_ext.gated_residual_jvp_cuda.default,
                          (a, a, rand(2, 1, 72, device="cuda"), None, a, None))


@requires_cuda
def test_cuda_large_kernel_agrees_with_reference_backend(monkeypatch):
    """The kernel and the PyTorch path agree on large random fp32 tensors (guards index arithmetic at scale)."""
    x = rand(4, 1000, 1152, device="cuda")
    tx = rand(4, 1000, 1152, device="cuda")
    y, ty = gelu_jvp(x, tx)
    monkeypatch.setenv("FACM_EXT_BACKEND", "reference")
    ry, rty = gelu_jvp(x, tx)
    assert_rel_close(y, ry, torch.float32, what="gelu primal vs reference backend")
    assert_rel_close(ty, rty, torch.float32, what="gelu tangent vs reference backend")


@requires_cuda
def test_cuda_large_64bit_index():
    """More than 2^31 elements selects the 64-bit index instantiation: a broadcast (stride-0) input keeps the
    inputs small; every row of the output must equal the small 32-bit-index result bit for bit."""
    width, rows = 1024, (2**31) // 1024 + 3
    x_row = rand(1, 1, width, dtype=torch.bfloat16, device="cuda", scale=3.0)
    t_row = rand(1, 1, width, dtype=torch.bfloat16, device="cuda")
    small_y, small_ty = silu_jvp(x_row, t_row)
    y, ty = silu_jvp(x_row.expand(1, rows, width), t_row.expand(1, rows, width))
    assert y.numel() > 2**31
    assert torch.equal(y, small_y.expand_as(y)) and torch.equal(ty, small_ty.expand_as(ty))
