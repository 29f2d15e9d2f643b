"""mlp_jvp against the alternatives, bf16, in the same run:
- mlp_jvp default: fused up-projection (dual GEMM with the activation JVP in its epilogue, TMA loads) + cuBLAS
  down-projection;
- mlp_jvp variants: FACM_EXT_MLP_UP=cublas (cuBLAS up-projection + a separate Triton activation-JVP pass),
  FACM_EXT_BACKEND=triton (the down-projection on the dual GEMM too) and FACM_EXT_DUAL_GEMM=pointer (pointer loads
  instead of the default TMA descriptors);
- unfused facm_ext ops: linear_jvp + swiglu_jvp / gelu_jvp + linear_jvp (the note says whether the activation op
  ran its compiled CUDA kernel or its PyTorch fallback);
- unfused with a compiled activation pass: linear_jvp + torch.compile(activation JVP formulas) + linear_jvp;
  the task's target (fused >= 1.2x faster than unfused) is judged against the faster of the two unfused rows;
- eager torch.func.jvp of the reference MLP, and torch.compile of it;
- with grad on: the forward that also stores the pre-activation, and the primal backward vs the reference's
  autograd backward.
Every JVP row counts the GEMM FLOPs 2 (2 M) K N1 + 2 (2 M) H K_out; backward rows the same (4 GEMMs of M rows).

Shapes: LightningDiT-XL/1 SwiGLU (M = 16384, w12 [6144, 1152], w3 [1152, 3072]) and Wan 2.2 GELU-tanh
(M = 32760, fc1 [13824, 5120], fc2 [5120, 13824]).
"""

from __future__ import annotations

import functools

import pytest
import torch

import _harness
from facm_ext import _extension
from facm_ext.kernels.mlp_jvp_triton import tuned_configs
from facm_ext.ops import gelu_jvp, linear_jvp, mlp_jvp, swiglu_jvp
from facm_ext.ops import mlp as mlp_ops
from facm_ext.reference.mlp import mlp

TARGET_SPEEDUP = 1.2
# name -> (M rows, K in, H hidden, K_out, activation)
MLP_CASES = {
    "lightningdit_swiglu_M16384_1152-2x3072-1152": (16384, 1152, 3072, 1152, "swiglu"),
    "wan_gelu_M32760_5120-13824-5120": (32760, 5120, 13824, 5120, "gelu_tanh"),
}


def _make(m, k, hidden, k_out, activation):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    n1 = 2 * hidden if activation == "swiglu" else hidden
    params = (rand(n1, k, scale=k ** -0.5), rand(n1), rand(k_out, hidden, scale=hidden ** -0.5), rand(k_out))
    return rand(m, k), rand(m, k), params


def _activation_ops(u, tu, activation):
    if activation == "swiglu":
        a, b = u.chunk(2, dim=-1)
        ta, tb = tu.chunk(2, dim=-1)
        return swiglu_jvp(a, ta, b, tb)
    return gelu_jvp(u, tu, approximate="tanh")


def _unfused_ops(x, tx, w1, b1, w2, b2, activation):
    u, tu = linear_jvp(x, tx, w1, b1)
    h, th = _activation_ops(u, tu, activation)
    return linear_jvp(h, th, w2, b2)


def _unfused_compiled_activation(compiled_activation, x, tx, w1, b1, w2, b2):
    u, tu = linear_jvp(x, tx, w1, b1)
    h, th = compiled_activation(u, tu)
    return linear_jvp(h, th, w2, b2)


def _func_jvp(x, tx, w1, b1, w2, b2, activation):
    return torch.func.jvp(lambda z: mlp(z, w1, b1, w2, b2, activation), (x,), (tx,))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _record_alternative(group, case, impl, fn, flops, ms_ours, note=""):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - an alternative failing is itself the result to report
        _harness.record(group, case, impl, float("nan"),
                        note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        return None
    ms = _harness.median_ms(fn)
    _harness.record(group, case, impl, ms, flops=flops, peak_gib=_harness.peak_extra_memory_gib(fn),
                    note=f"default {ms / ms_ours:.2f}x faster" + (f"; {note}" if note else ""))
    return ms


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_bench_mlp_jvp(benchmark, case, monkeypatch):
    _harness.require_cuda()
    for var in ("FACM_EXT_BACKEND", "FACM_EXT_MLP_UP"):
        monkeypatch.delenv(var, raising=False)
    m, k, hidden, k_out, activation = MLP_CASES[case]
    n1 = 2 * hidden if activation == "swiglu" else hidden
    flops = 2.0 * (2 * m) * k * n1 + 2.0 * (2 * m) * hidden * k_out
    x, tx, params = _make(m, k, hidden, k_out, activation)
    group = "mlp_jvp"

    with torch.no_grad():
        ours = functools.partial(mlp_jvp, x, tx, *params, activation=activation)
        y, ty = ours()  # autotune outside the timing
        ref_y, ref_ty = _func_jvp(x, tx, *params, activation)
        err = max(_rel(y, ref_y), _rel(ty, ref_ty))
        del y, ty, ref_y, ref_ty

        def synced():
            ours()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=5, warmup_rounds=2)
        ms_ours = _harness.median_ms(ours)
        _harness.record(group, case, "facm_ext mlp_jvp (default: fused up + cuBLAS down)", ms_ours, flops=flops,
                        peak_gib=_harness.peak_extra_memory_gib(ours),
                        note=f"no grad; rel. diff vs torch.func.jvp {err:.1e}; {tuned_configs()}")

        for impl, (var, value) in {
            "facm_ext mlp_jvp, FACM_EXT_MLP_UP=cublas (cuBLAS up + Triton act pass)": ("FACM_EXT_MLP_UP", "cublas"),
            "facm_ext mlp_jvp, FACM_EXT_BACKEND=triton (dual GEMM down too)": ("FACM_EXT_BACKEND", "triton"),
            "facm_ext mlp_jvp, FACM_EXT_DUAL_GEMM=pointer (fused up with pointer loads + cuBLAS down)":
                ("FACM_EXT_DUAL_GEMM", "pointer"),
        }.items():
            monkeypatch.setenv(var, value)
            y, ty = ours()
            ref_y, ref_ty = _func_jvp(x, tx, *params, activation)
            variant_err = max(_rel(y, ref_y), _rel(ty, ref_ty))
            del y, ty, ref_y, ref_ty
            _record_alternative(group, case, impl, ours, flops, ms_ours,
                                note=f"rel. diff {variant_err:.1e}; {tuned_configs()}")
            monkeypatch.delenv(var)

        act_backend = "CUDA kernel" if _extension.has_kernel(
            "swiglu_jvp_cuda" if activation == "swiglu" else "gelu_jvp_cuda") else "PyTorch fallback (no _C)"
        unfused_rows = []
        if _record_alternative(group, case, "unfused: linear_jvp + act jvp op + linear_jvp",
                               functools.partial(_unfused_ops, x, tx, *params, activation), flops, ms_ours,
                               note=f"act op: {act_backend}") is not None:
            unfused_rows.append(_harness.RESULTS[-1])

        compiled_activation = torch.compile(
            functools.partial(mlp_ops._activation_jvp, activation=activation), fullgraph=True, dynamic=False)
        if _record_alternative(group, case, "unfused: linear_jvp + compiled act jvp + linear_jvp",
                               functools.partial(_unfused_compiled_activation, compiled_activation, x, tx, *params),
                               flops, ms_ours) is not None:
            unfused_rows.append(_harness.RESULTS[-1])
        # The target is judged against the faster unfused row only: both run the same cuBLAS GEMMs and an
        # activation pass at the copy bandwidth, and whole-call timings of the two differ by a few ms from run to
        # run at the Wan shape with identical kernel times (results/2026-11-26m_h100_mlp_unfused_timing_check.txt).
        if unfused_rows:
            strongest = min(unfused_rows, key=lambda row: row["ms"])
            met = "met" if strongest["ms"] / ms_ours >= TARGET_SPEEDUP else "NOT met"
            strongest["note"] += f"; strongest unfused; target >= {TARGET_SPEEDUP}x: {met}"

        _record_alternative(group, case, "torch.func.jvp(reference MLP) eager",
                            functools.partial(_func_jvp, x, tx, *params, activation), flops, ms_ours)
        compiled_jvp = torch.compile(_func_jvp, fullgraph=True, dynamic=False)
        _record_alternative(group, case, "torch.compile(torch.func.jvp(reference MLP))",
                            functools.partial(compiled_jvp, x, tx, *params, activation), flops, ms_ours)

    # With grad on (the FACM training path): the kernel also stores the primal pre-activation for the backward.
    leaves = [p.clone().requires_grad_() for p in params]
    with_grad = functools.partial(mlp_jvp, x, tx, *leaves, activation=activation)
    with_grad()
    _harness.record(group, case, "facm_ext mlp_jvp, grad on (stores pre-activation)", _harness.median_ms(with_grad),
                    flops=flops, peak_gib=_harness.peak_extra_memory_gib(with_grad))
    y, _ = with_grad()
    grad_out = torch.randn_like(y)
    backward = functools.partial(torch.autograd.grad, y, leaves, grad_out, retain_graph=True)
    backward()
    ms_backward = _harness.median_ms(backward)
    _harness.record(group, case, "facm_ext mlp_jvp primal backward", ms_backward,
                    flops=flops, note="dx, dW1, dW2 (+ biases): 4 GEMMs of M rows")
    ref_y = mlp(x, *leaves, activation)
    ref_backward = functools.partial(torch.autograd.grad, ref_y, leaves, grad_out, retain_graph=True)
    ref_backward()
    ms_ref = _harness.median_ms(ref_backward)
    _harness.record(group, case, "reference MLP autograd backward", ms_ref, flops=flops,
                    note=f"ours {ms_ref / ms_backward:.2f}x faster")
