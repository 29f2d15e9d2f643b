"""rms_norm_rope_jvp (qk RMSNorm + RoPE, primal and tangent in one pass) against the alternatives in the same run:

- ``unfused fp32 rms_norm_jvp -> rope_jvp``: the path the JVP transform took before the fused op, and still the
  one an attention layer under autocast describes: q, q' widened to fp32 (the fp32 norm weight promotes), the fp32
  norm op, the fp32 rope op, both results narrowed back to bf16 (SDPA's autocast cast). Four casts, a norm and a
  rotation per tensor, each a round trip through memory;
- eager ``torch.func.jvp`` of the reference (facm_ext.reference.rope.rms_norm_rope, cast back to x's dtype like
  the op) and ``torch.compile`` of it (fullgraph; a compile failure is recorded as the row). The reference computes
  in its inputs' promoted dtypes (the norm of bf16 x in bf16, fp32 from the weight on), so it differs from ours by
  a few bf16 roundings; the unfused path matches ours to within one.

Memory-bound: GB/s of the bytes an ideal kernel moves, x and x' read once and the primal and tangent written once,
in the input dtype (the [D] weight and the tables are left out: 0.15 MB for LightningDiT, 17 MB against 1.3 GB for
Wan), against the card's measured copy bandwidth (%copy). Peak memory beyond the inputs is recorded for every row.

Each row is one attention layer's qk step: q and k, two calls with their own fp32 norm weights (q_norm, k_norm).

Shapes (bf16, interleaved pairs, fp32 weight and tables, eps 1e-6):
- LightningDiT-XL/1: q and k the [B, L, H, D] slices of the qkv projection output [B, 256, 3, 16, 72], B = 16 and
  64, passed as the [B, H, L, D] transposes (strided views read in place); at B = 64 also as the [B, L, H, D]
  slices themselves (layout "BLHD", the form facm_ext/jvp/_blocks.py passes); EVA's [256, 72] per-channel tables.
- Wan-like per-head norm: q and k [1, 32760, 40, 128] contiguous (layout "BLHD"), per-pair [32760, 64] tables.

Times are kernel times for ours and every baseline alike (`_harness.kernel_ms`: the calls captured in a CUDA graph
and replayed), so Python launch overhead does not hide the kernels; our eager call time is in the row's note.
"""

from __future__ import annotations

import functools

import pytest
import torch

import _harness
from facm_ext.ops import rms_norm_jvp, rms_norm_rope_jvp, rope_jvp
from facm_ext.reference import rope as ref

BF16, F32 = torch.bfloat16, torch.float32
EPS = 1e-6

# name -> (source: "qkv" [B, L, 3, H, D] slices or "dense" [B, L, H, D] tensors, (B, L, H, D), layout,
#          tables: "channel" [L, D] pair-repeated (EVA) or "pair" [L, D/2])
CASES = {
    "lightningdit_B16_L256_H16_D72_qkv_slices_BHLD_eva_tables": ("qkv", (16, 256, 16, 72), "BHLD", "channel"),
    "lightningdit_B64_L256_H16_D72_qkv_slices_BHLD_eva_tables": ("qkv", (64, 256, 16, 72), "BHLD", "channel"),
    "lightningdit_B64_L256_H16_D72_qkv_slices_BLHD_eva_tables": ("qkv", (64, 256, 16, 72), "BLHD", "channel"),
    "wan_like_B1_L32760_H40_D128_BLHD_pair_tables": ("dense", (1, 32760, 40, 128), "BLHD", "pair"),
}


def _inputs(source, shape, layout, form):
    """([(x, x', weight) for q and k], cos, sin): x, x' bf16 in the case's layout (strided views for "qkv"),
    weight fp32 [D], tables fp32."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*s, dtype=BF16):
        return torch.randn(*s, generator=gen, device="cuda", dtype=dtype)

    batch, tokens, heads, head_dim = shape
    if source == "qkv":
        qkv, tqkv = randn(batch, tokens, 3, heads, head_dim), randn(batch, tokens, 3, heads, head_dim)
        view = (lambda t: t.transpose(1, 2)) if layout == "BHLD" else (lambda t: t)
        pairs = [(view(qkv[:, :, i]), view(tqkv[:, :, i])) for i in (0, 1)]
    else:
        pairs = [(randn(*shape), randn(*shape)) for _ in range(2)]
    operands = [(x, tx, 1 + 0.1 * randn(head_dim, dtype=F32)) for x, tx in pairs]
    angles = torch.rand(tokens, head_dim // 2, generator=gen, device="cuda") * 6.28
    if form == "channel":
        angles = angles.repeat_interleave(2, dim=-1)
    return operands, angles.cos(), angles.sin()


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _max_rel(outs, refs) -> float:
    """Largest relative difference over the (primal, tangent) pairs of q and k."""
    return max(_rel(o, r) for pair, ref_pair in zip(outs, refs) for o, r in zip(pair, ref_pair))


@pytest.mark.parametrize("case", list(CASES))
def test_bench_rms_norm_rope_jvp(benchmark, case):
    _harness.require_cuda()
    source, shape, layout, form = CASES[case]
    group = "rms_norm_rope_jvp"
    with torch.no_grad():
        operands, cos, sin = _inputs(source, shape, layout, form)
        moved = float(sum(4 * x.numel() * x.element_size() for x, _, _ in operands))

        def fused():
            return [rms_norm_rope_jvp(x, tx, w, cos, sin, eps=EPS, interleaved=True, layout=layout)
                    for x, tx, w in operands]

        def unfused_one(x, tx, w):
            n, tn = rms_norm_jvp(x.to(F32), tx.to(F32), w, EPS)
            r, tr = rope_jvp(n, tn, cos, sin, True, layout=layout)
            return r.to(x.dtype), tr.to(x.dtype)

        def unfused():
            return [unfused_one(x, tx, w) for x, tx, w in operands]

        def jvp_of_reference(a, ta, w):
            """torch.func.jvp of the reference for one tensor: a, ta [B, H, L, D] or [B, L, H, D] bf16, w [D]."""
            return torch.func.jvp(lambda y: ref.rms_norm_rope(y, w, cos, sin, EPS, True, layout).to(y.dtype),
                                  (a,), (ta,))

        def eager():
            return [jvp_of_reference(x, tx, w) for x, tx, w in operands]

        out, ref_unfused, ref_eager = fused(), unfused(), eager()
        err_unfused, err_eager = _max_rel(out, ref_unfused), _max_rel(out, ref_eager)
        del out, ref_unfused, ref_eager
        ms_ours = _harness.timed_ms(benchmark, fused, kernel_only=True)
        _harness.record(group, case, "facm_ext rms_norm_rope_jvp (fused)", ms_ours, bytes_moved=moved,
                        peak_gib=_harness.peak_extra_memory_gib(fused),
                        note=f"rel. diff vs unfused {err_unfused:.1e}, vs eager jvp {err_eager:.1e}; "
                             f"eager call {_harness.median_ms(fused):.3f} ms")

        torch._dynamo.reset()  # each case's closures share code objects: a fresh cache, not a recompile limit
        compiled_one = torch.compile(jvp_of_reference, fullgraph=True, dynamic=False)

        def compiled():
            return [compiled_one(x, tx, w) for x, tx, w in operands]

        alternatives = {
            "unfused fp32 rms_norm_jvp -> rope_jvp (+4 casts)": unfused,
            "torch.func.jvp(reference) eager": eager,
            "torch.compile(torch.func.jvp(reference))": compiled,
        }
        _harness.record_alternatives(group, case, alternatives, ms_ours, ours_label="fused", bytes_moved=moved,
                                     kernel_only=True)
