"""Pointwise JVP ops (gated residual, GELU, SiLU, SwiGLU) against the alternatives in the same run: eager
torch.func.jvp of the reference (facm_ext.reference.pointwise) and torch.compile of it. Memory-bound: every row
reports GB/s of the bytes the op must move (each input read once, primal and tangent written once) against the
card's measured copy bandwidth.

Shapes: LightningDiT-XL/1 (B=64, L=256, C=1152, bf16; SwiGLU on the two halves of a [64, 256, 6144] Linear output)
and Wan 2.2 (B=1, L=32760, C=5120; GELU on the 13824-wide FFN hidden; gated residual with fp32 x, bf16 y and an
fp32 per-token gate sliced from a [1, L, 6, C] modulation tensor).

Times are kernel times for ours and both baselines alike (`_harness.kernel_ms`: the call captured in a CUDA graph
and replayed), so Python launch overhead does not hide the kernels; our eager call time is in the row's note.
"""

from __future__ import annotations

import functools

import pytest
import torch

import _harness
from facm_ext.ops import gated_residual_jvp, gelu_jvp, silu_jvp, swiglu_jvp
from facm_ext.reference import pointwise as ref

BF16, F32 = torch.bfloat16, torch.float32


def _rand(*shape, dtype=BF16, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda", dtype=torch.float32)).to(dtype)


def _bytes(*tensors):
    """Bytes an ideal kernel moves: every element of every tensor touched once (a strided view counts its own
    elements, a broadcast gate its [B, C] elements)."""
    return float(sum(t.numel() * t.element_size() for t in tensors if t is not None))


def _case_gated(batch, tokens, width, wan):
    x_dtype = F32 if wan else BF16
    x, tx = _rand(batch, tokens, width, dtype=x_dtype), _rand(batch, tokens, width, dtype=x_dtype)
    y, ty = _rand(batch, tokens, width), _rand(batch, tokens, width)
    if wan:  # per-token fp32 gate: one of the six [B, L, C] slices of the modulation tensor
        modulation = _rand(batch, tokens, 6, width, dtype=F32)
        tmodulation = _rand(batch, tokens, 6, width, dtype=F32)
        gate, tgate = modulation[:, :, 2], tmodulation[:, :, 2]
    else:  # DiT / LightningDiT: [B, C] gate broadcast over tokens
        gate, tgate = _rand(batch, width), _rand(batch, width)
    ours = functools.partial(gated_residual_jvp, x, tx, gate, tgate, y, ty)
    ref_fn = functools.partial(torch.func.jvp, ref.gated_residual, (x, gate, y), (tx, tgate, ty))
    moved = _bytes(x, tx, gate, tgate, y, ty) + 2 * _bytes(x)
    return ours, ref_fn, moved, (ref.gated_residual, (x, gate, y), (tx, tgate, ty))


def _case_unary(op, fn, shape):
    x, tx = _rand(*shape, scale=2.0), _rand(*shape)
    moved = _bytes(x, tx) + 2 * _bytes(x)
    return functools.partial(op, x, tx), functools.partial(torch.func.jvp, fn, (x,), (tx,)), moved, (fn, (x,), (tx,))


def _case_swiglu(batch, tokens, width):
    h, th = _rand(batch, tokens, 2 * width, scale=2.0), _rand(batch, tokens, 2 * width)
    a, b = h.chunk(2, dim=-1)
    ta, tb = th.chunk(2, dim=-1)
    moved = _bytes(h, th) + 2 * _bytes(a)
    return (functools.partial(swiglu_jvp, a, ta, b, tb),
            functools.partial(torch.func.jvp, ref.swiglu, (a, b), (ta, tb)), moved, (ref.swiglu, (a, b), (ta, tb)))


CASES = {
    "lightningdit_gated_residual_B64_L256_C1152_bf16": lambda: _case_gated(64, 256, 1152, wan=False),
    "lightningdit_swiglu_B64_L256_6144split_bf16": lambda: _case_swiglu(64, 256, 3072),
    "lightningdit_gelu_tanh_B64_L256_C1152_bf16": lambda: _case_unary(gelu_jvp, ref.gelu, (64, 256, 1152)),
    "lightningdit_silu_B64_L256_C1152_bf16": lambda: _case_unary(silu_jvp, ref.silu, (64, 256, 1152)),
    "wan_gated_residual_L32760_C5120_x_fp32_y_bf16_gate_fp32_per_token":
        lambda: _case_gated(1, 32760, 5120, wan=True),
    "wan_gelu_tanh_L32760_C13824_bf16": lambda: _case_unary(gelu_jvp, ref.gelu, (1, 32760, 13824)),
    "wan_silu_L32760_C5120_bf16": lambda: _case_unary(silu_jvp, ref.silu, (1, 32760, 5120)),
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_bench_pointwise_jvp(benchmark, case):
    _harness.require_cuda()
    group = "pointwise_jvp"
    with torch.no_grad():
        ours, eager, moved, (fn, primals, tangents) = CASES[case]()
        out, tout = ours()
        ref_out, ref_tout = eager()
        err = max(_rel(out, ref_out), _rel(tout, ref_tout.to(tout.dtype)))
        del out, tout, ref_out, ref_tout
        ms_ours = _harness.timed_ms(benchmark, ours, kernel_only=True)
        _harness.record(group, case, "facm_ext (CUDA kernel)", ms_ours, bytes_moved=moved,
                        peak_gib=_harness.peak_extra_memory_gib(ours),
                        note=f"rel. diff vs eager jvp {err:.1e}; eager call {_harness.median_ms(ours):.3f} ms")

        def jvp_of_reference(*args):
            n = len(primals)
            return torch.func.jvp(fn, args[:n], args[n:])

        compiled = torch.compile(jvp_of_reference, fullgraph=True, dynamic=False)
        alternatives = {
            "torch.func.jvp(reference) eager": eager,
            "torch.compile(torch.func.jvp(reference))": functools.partial(compiled, *primals, *tangents),
        }
        _harness.record_alternatives(group, case, alternatives, ms_ours, ours_label="ours", bytes_moved=moved,
                                     kernel_only=True)
