"""rope_jvp against the alternatives in the same run: eager torch.func.jvp of the reference
(facm_ext.reference.rope, cast back to x's dtype like the op) and torch.compile of it. Memory-bound: GB/s of the
bytes an ideal kernel moves (x and x' read once, primal and tangent written once, the tables read once) against
the card's measured copy bandwidth.

Shapes (bf16, interleaved pairs, fp32 tables): LightningDiT-XL/1 q or k [64, 16, 256, 72] with EVA's [256, 72]
per-channel tables; Wan 2.2 [1, 40, 32760, 128] with per-pair [32760, 64] tables, in both memory layouts
([B, H, L, D] and Wan's own [B, L, H, D]).

Times are kernel times for ours and both baselines alike (`_harness.kernel_ms`: the call captured in a CUDA graph
and replayed), so Python launch overhead does not hide the kernels; our eager call time is in the row's note.
"""

from __future__ import annotations

import functools

import pytest
import torch

import _harness
from facm_ext.ops import rope_jvp
from facm_ext.reference import rope as ref

# name -> (x shape, layout, tables: "channel" [L, D] pair-repeated (EVA) or "pair" [L, D/2])
CASES = {
    "lightningdit_B64_H16_L256_D72_eva_tables": ((64, 16, 256, 72), "BHLD", "channel"),
    "wan_B1_H40_L32760_D128_BHLD_pair_tables": ((1, 40, 32760, 128), "BHLD", "pair"),
    "wan_B1_L32760_H40_D128_BLHD_pair_tables": ((1, 32760, 40, 128), "BLHD", "pair"),
}


def _tables(tokens, head_dim, form):
    angles = torch.rand(tokens, head_dim // 2, device="cuda") * 6.28
    if form == "channel":
        angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_bench_rope_jvp(benchmark, case):
    _harness.require_cuda()
    shape, layout, form = CASES[case]
    tokens = shape[2] if layout == "BHLD" else shape[1]
    group = "rope_jvp"
    with torch.no_grad():
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        tx = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        cos, sin = _tables(tokens, shape[-1], form)
        moved = 4.0 * x.numel() * x.element_size() + 2.0 * cos.numel() * cos.element_size()

        def reference(a):
            return ref.rope(a, cos, sin, True, layout).to(a.dtype)

        def jvp_of_reference(a, ta):
            return torch.func.jvp(reference, (a,), (ta,))

        ours = functools.partial(rope_jvp, x, tx, cos, sin, True, layout=layout)
        eager = functools.partial(jvp_of_reference, x, tx)
        out, tout = ours()
        ref_out, ref_tout = eager()
        err = max(_rel(out, ref_out), _rel(tout, ref_tout))
        del out, tout, ref_out, ref_tout
        ms_ours = _harness.timed_ms(benchmark, ours, kernel_only=True)
        _harness.record(group, case, "facm_ext (CUDA kernel)", ms_ours, bytes_moved=moved,
                        peak_gib=_harness.peak_extra_memory_gib(ours),
                        note=f"rel. diff vs eager jvp {err:.1e}; eager call {_harness.median_ms(ours):.3f} ms")

        compiled = torch.compile(jvp_of_reference, fullgraph=True, dynamic=False)
        alternatives = {
            "torch.func.jvp(reference) eager": eager,
            "torch.compile(torch.func.jvp(reference))": functools.partial(compiled, x, tx),
        }
        _harness.record_alternatives(group, case, alternatives, ms_ours, ours_label="ours", bytes_moved=moved,
                                     kernel_only=True)
