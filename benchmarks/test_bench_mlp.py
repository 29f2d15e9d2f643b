"""mlp_jvp (fused: dual up-projection GEMM with the activation JVP in its epilogue, then the dual down-projection)
against, in the same run, bf16:
- unfused facm_ext ops: linear_jvp + swiglu_jvp / gelu_jvp + linear_jvp (the task's target: fused >= 1.2x faster),
- unfused on cuBLAS: F.linear x2 + the same activation op + F.linear x2,
- eager torch.func.jvp of the reference MLP, and torch.compile of it.
Every row counts the JVP's GEMM FLOPs: 2 (2 M) K N1 + 2 (2 M) H K_out.

Shapes: LightningDiT-XL/1 SwiGLU (M = 16384, w12 [6144, 1152], w3 [1152, 3072]) and Wan 2.2 GELU-tanh
(M = 32760, fc1 [13824, 5120], fc2 [5120, 13824]).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import _harness
from facm_ext.ops import gelu_jvp, linear_jvp, mlp_jvp, swiglu_jvp
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


def _activation_jvp(u, tu, activation):
    if activation == "swiglu":
        a, b = u.chunk(2, dim=-1)
        ta, tb = tu.chunk(2, dim=-1)
        return swiglu_jvp(a, ta, b, tb)
    return gelu_jvp(u, tu, approximate="tanh")


def _unfused_ops(x, tx, w1, b1, w2, b2, activation):
    u, tu = linear_jvp(x, tx, w1, b1)
    h, th = _activation_jvp(u, tu, activation)
    return linear_jvp(h, th, w2, b2)


def _unfused_cublas(x, tx, w1, b1, w2, b2, activation):
    u, tu = F.linear(x, w1, b1), F.linear(tx, w1)
    h, th = _activation_jvp(u, tu, activation)
    return F.linear(h, w2, b2), F.linear(th, w2)


def _func_jvp(x, tx, w1, b1, w2, b2, activation):
    return torch.func.jvp(lambda z: mlp(z, w1, b1, w2, b2, activation), (x,), (tx,))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_bench_mlp_jvp(benchmark, case):
    _harness.require_cuda()
    m, k, hidden, k_out, activation = MLP_CASES[case]
    n1 = 2 * hidden if activation == "swiglu" else hidden
    flops = 2.0 * (2 * m) * k * n1 + 2.0 * (2 * m) * hidden * k_out
    x, tx, params = _make(m, k, hidden, k_out, activation)
    group = "mlp_jvp"

    with torch.no_grad():
        ours = functools.partial(mlp_jvp, x, tx, *params, activation=activation)
        y, ty = ours()  # autotune outside the timing
        ref_y, ref_ty = _unfused_cublas(x, tx, *params, activation)
        err = max(_rel(y, ref_y), _rel(ty, ref_ty))
        del y, ty, ref_y, ref_ty

        def synced():
            ours()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=5, warmup_rounds=2)
        ms_ours = _harness.median_ms(ours)
        _harness.record(group, case, "facm_ext mlp_jvp (fused triton)", ms_ours, flops=flops,
                        peak_gib=_harness.peak_extra_memory_gib(ours),
                        note=f"no grad; rel. diff vs cuBLAS unfused {err:.1e}")

        alternatives = {
            "unfused: linear_jvp + act jvp + linear_jvp": functools.partial(_unfused_ops, x, tx, *params, activation),
            "unfused cuBLAS: 2x F.linear + act jvp + 2x F.linear":
                functools.partial(_unfused_cublas, x, tx, *params, activation),
            "torch.func.jvp(reference MLP) eager": functools.partial(_func_jvp, x, tx, *params, activation),
        }
        compiled_jvp = torch.compile(_func_jvp, fullgraph=True, dynamic=False)
        alternatives["torch.compile(torch.func.jvp(reference MLP))"] = functools.partial(
            compiled_jvp, x, tx, *params, activation)
        for impl, fn in alternatives.items():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - an alternative failing is itself the result to report
                _harness.record(group, case, impl, float("nan"),
                                note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            ms = _harness.median_ms(fn)
            note = f"fused {ms / ms_ours:.2f}x faster"
            if impl.startswith("unfused: linear_jvp"):
                met = "met" if ms / ms_ours >= TARGET_SPEEDUP else "NOT met"
                note += f" (target >= {TARGET_SPEEDUP}x: {met})"
            _harness.record(group, case, impl, ms, flops=flops, peak_gib=_harness.peak_extra_memory_gib(fn),
                            note=note)

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
