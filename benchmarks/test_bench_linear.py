"""linear_jvp against the alternatives, bf16, in the same run: its default path (two cuBLAS GEMMs), its Triton dual
GEMM over the stacked rows [x; x'] (FACM_EXT_BACKEND=triton; TMA loads, and pointer loads with
FACM_EXT_DUAL_GEMM=pointer), plain two F.linear calls, the literally stacked
cuBLAS GEMM (cat + one mm, split), eager torch.func.jvp(F.linear), and torch.compile of it. The primal F.linear
alone is listed as the yardstick (an ideal JVP costs twice it). Every JVP row counts 2 * (2 M) * K * N FLOPs.

Shapes: the MLP projections of LightningDiT-XL/1 (M = 16384 = 64 x 256 tokens, 1152 -> 6144 and 3072 -> 1152) and
Wan 2.2 (M = 32760 tokens, 5120 -> 13824 and 13824 -> 5120).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import _harness
from facm_ext.kernels.mlp_jvp_triton import tuned_configs
from facm_ext.ops import linear_jvp
from facm_ext.reference.linear import linear

# name -> (M rows, K in, N out)
LINEAR_CASES = {
    "lightningdit_up_M16384_1152x6144": (16384, 1152, 6144),
    "lightningdit_down_M16384_3072x1152": (16384, 3072, 1152),
    "wan_up_M32760_5120x13824": (32760, 5120, 13824),
    "wan_down_M32760_13824x5120": (32760, 13824, 5120),
}


def _make(m, k, n):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    return rand(m, k), rand(m, k), rand(n, k, scale=k ** -0.5), rand(n)


def _two_gemms(x, tx, weight, bias):
    return F.linear(x, weight, bias), F.linear(tx, weight)


def _stacked_cublas(x, tx, weight, bias):
    out = torch.cat([x, tx]) @ weight.t()
    m = x.shape[0]
    return out[:m] + bias, out[m:]


def _func_jvp(x, tx, weight, bias):
    return torch.func.jvp(lambda z: linear(z, weight, bias), (x,), (tx,))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_bench_linear_jvp(benchmark, case, monkeypatch):
    _harness.require_cuda()
    monkeypatch.delenv("FACM_EXT_BACKEND", raising=False)
    m, k, n = LINEAR_CASES[case]
    flops = 2.0 * (2 * m) * k * n
    x, tx, weight, bias = _make(m, k, n)
    group = "linear_jvp"

    with torch.no_grad():
        ours = functools.partial(linear_jvp, x, tx, weight, bias)
        ours()
        ms_ours = _harness.timed_ms(benchmark, ours)
        _harness.record(group, case, "facm_ext linear_jvp (default: 2 cuBLAS GEMMs)", ms_ours, flops=flops,
                        peak_gib=_harness.peak_extra_memory_gib(ours))

        monkeypatch.setenv("FACM_EXT_BACKEND", "triton")
        y, ty = ours()  # autotune outside the timing
        ref_y, ref_ty = _two_gemms(x, tx, weight, bias)
        err = max(_rel(y, ref_y), _rel(ty, ref_ty))
        del y, ty
        ms_dual = _harness.median_ms(ours)
        _harness.record(group, case, "facm_ext linear_jvp, FACM_EXT_BACKEND=triton (dual GEMM, TMA loads)", ms_dual,
                        flops=flops, peak_gib=_harness.peak_extra_memory_gib(ours),
                        note=f"default {ms_dual / ms_ours:.2f}x faster; rel. diff vs cuBLAS {err:.1e}; "
                             f"{tuned_configs()}")
        monkeypatch.setenv("FACM_EXT_DUAL_GEMM", "pointer")
        y, ty = ours()
        err = max(_rel(y, ref_y), _rel(ty, ref_ty))
        del y, ty, ref_y, ref_ty
        ms_pointer = _harness.median_ms(ours)
        _harness.record(group, case, "facm_ext linear_jvp, FACM_EXT_BACKEND=triton FACM_EXT_DUAL_GEMM=pointer",
                        ms_pointer, flops=flops, peak_gib=_harness.peak_extra_memory_gib(ours),
                        note=f"default {ms_pointer / ms_ours:.2f}x faster; rel. diff vs cuBLAS {err:.1e}; "
                             f"{tuned_configs()}")
        monkeypatch.delenv("FACM_EXT_BACKEND")
        monkeypatch.delenv("FACM_EXT_DUAL_GEMM")

        alternatives = {
            "2x cuBLAS F.linear": functools.partial(_two_gemms, x, tx, weight, bias),
            "cat + 1 cuBLAS GEMM + split": functools.partial(_stacked_cublas, x, tx, weight, bias),
            "torch.func.jvp(F.linear) eager": functools.partial(_func_jvp, x, tx, weight, bias),
        }
        compiled_jvp = torch.compile(_func_jvp, fullgraph=True, dynamic=False)
        alternatives["torch.compile(torch.func.jvp(F.linear))"] = functools.partial(compiled_jvp, x, tx, weight, bias)
        _harness.record_alternatives(group, case, alternatives, ms_ours, ours_label="default", flops=flops)

        primal = functools.partial(F.linear, x, weight, bias)
        primal()
        _harness.record(group, case, "F.linear primal only (yardstick)", _harness.median_ms(primal),
                        flops=flops / 2, note="an ideal JVP takes 2x this")
