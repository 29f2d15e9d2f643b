"""Norm-family JVP ops (CUDA kernel, csrc/norms) against the alternatives, in the same run: eager torch.func.jvp
of the reference (facm_ext.reference.norms) and torch.compile of it (fullgraph; a compile failure is recorded).

Every row counts the bytes the op must move once: read x, x' and every modulation / tangent / weight tensor at its
own size (a [B, C] modulation is tiny, a per-token one is [B, L, C]), write y and y' in x's dtype. GB/s is then
compared with the card's measured copy bandwidth (%copy). Target: >= 80% of copy bandwidth at Wan shapes.

Shapes: LightningDiT-XL/1 (B=64, L=256, C=1152, bf16 with [B, C] modulation; qk-norm rows of 72 channels) and
Wan 2.2 (B=1, L=32760, C=5120, bf16; adaLN and modulate also with fp32 x and fp32 per-token modulation sliced from
a [B, L, 6, C] tensor, and bf16 x with that fp32 modulation).

Times are kernel times for ours and both baselines alike (`_harness.kernel_ms`: the call captured in a CUDA graph
and replayed), so Python launch overhead does not hide the kernels; our eager call time is in the row's note.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import _harness
from facm_ext.ops import norms as norm_ops
from facm_ext.ops.norms import adaln_jvp, layer_norm_jvp, modulate_jvp, rms_norm_jvp
from facm_ext.reference import norms as ref

BF16, F32 = torch.bfloat16, torch.float32
EPS = 1e-6
STAGING_ENV = "FACM_EXT_NORMS_ROW_STAGING"  # "registers" forces the register-resident kernel

# case -> (op, x shape, x dtype, modulation kind or None, modulation dtype)
CASES = {
    "layer_norm lightningdit B64 L256 C1152 bf16 (weight+bias)": ("layer", (64, 256, 1152), BF16, None, None),
    "layer_norm wan B1 L32760 C5120 bf16 (weight+bias)": ("layer", (1, 32760, 5120), BF16, None, None),
    "rms_norm lightningdit B64 L256 C1152 bf16 (weight)": ("rms", (64, 256, 1152), BF16, None, None),
    "rms_norm qk-norm lightningdit [64,256,16,72] bf16 view of qkv": ("rms_qk", (64, 256, 16, 72), BF16, None, None),
    "rms_norm wan qk B1 L32760 C5120 bf16 (weight)": ("rms", (1, 32760, 5120), BF16, None, None),
    "modulate lightningdit B64 L256 C1152 bf16 [B,C]": ("modulate", (64, 256, 1152), BF16, "bc", BF16),
    "modulate wan B1 L32760 C5120 bf16 per-token": ("modulate", (1, 32760, 5120), BF16, "per_token", BF16),
    "modulate wan B1 L32760 C5120 fp32 per-token fp32": ("modulate", (1, 32760, 5120), F32, "per_token", F32),
    "adaln layer dit B64 L256 C1152 bf16 [B,C]": ("adaln_layer", (64, 256, 1152), BF16, "bc", BF16),
    "adaln rms lightningdit B64 L256 C1152 bf16 [B,C] (weight)": ("adaln_rms", (64, 256, 1152), BF16, "bc", BF16),
    "adaln layer wan B1 L32760 C5120 bf16 per-token": ("adaln_layer", (1, 32760, 5120), BF16, "per_token", BF16),
    "adaln layer wan B1 L32760 C5120 fp32 per-token fp32": ("adaln_layer", (1, 32760, 5120), F32, "per_token", F32),
    "adaln layer wan B1 L32760 C5120 bf16 x, per-token fp32": ("adaln_layer", (1, 32760, 5120), BF16, "per_token",
                                                                F32),
}


def _nbytes(*tensors) -> int:
    """Bytes of the distinct elements each tensor addresses (a strided view counts its own elements only)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _inputs(op, shape, dtype, kind, mod_dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*s, dt=dtype):
        return torch.randn(*s, generator=gen, device="cuda", dtype=dt)

    inputs = {}
    if op == "rms_qk":
        b, l, h, d = shape
        qkv, tqkv = rand(b, l, 3, h, d), rand(b, l, 3, h, d)
        inputs["x"], inputs["tx"] = qkv[:, :, 0], tqkv[:, :, 0]
        inputs["weight"] = rand(d, dt=F32)
        return inputs
    inputs["x"], inputs["tx"] = rand(*shape), rand(*shape)
    b, l, c = shape
    if op in ("layer", "rms", "adaln_rms"):
        inputs["weight"] = rand(c, dt=F32)
    if op == "layer":
        inputs["bias"] = rand(c, dt=F32)
    if kind == "bc":
        for name in ("shift", "tshift", "scale", "tscale"):
            inputs[name] = rand(b, c, dt=mod_dtype)
    elif kind == "per_token":
        mods, tmods = rand(b, l, 6, c, dt=mod_dtype), rand(b, l, 6, c, dt=mod_dtype)  # Wan's [B, L, 6, C]
        inputs["shift"], inputs["scale"] = mods[:, :, 0], mods[:, :, 1]
        inputs["tshift"], inputs["tscale"] = tmods[:, :, 0], tmods[:, :, 1]
    return inputs


def _ours(op, i):
    if op == "layer":
        return functools.partial(layer_norm_jvp, i["x"], i["tx"], i["weight"], i["bias"], EPS)
    if op in ("rms", "rms_qk"):
        return functools.partial(rms_norm_jvp, i["x"], i["tx"], i["weight"], EPS)
    if op == "modulate":
        return functools.partial(modulate_jvp, i["x"], i["tx"], i["shift"], i["tshift"], i["scale"], i["tscale"])
    norm = op.split("_")[1]
    return functools.partial(adaln_jvp, i["x"], i["tx"], i["shift"], i["tshift"], i["scale"], i["tscale"],
                             norm=norm, weight=i.get("weight"), eps=EPS)


def _reference_jvp(op):
    """(function of the inputs dict running torch.func.jvp of the reference, names of its primal inputs)."""
    if op == "layer":
        return lambda i: torch.func.jvp(lambda x: ref.layer_norm(x, i["weight"], i["bias"], EPS), (i["x"],),
                                        (i["tx"],))
    if op in ("rms", "rms_qk"):
        return lambda i: torch.func.jvp(lambda x: ref.rms_norm(x, i["weight"], EPS), (i["x"],), (i["tx"],))
    if op == "modulate":
        return lambda i: torch.func.jvp(ref.modulate, (i["x"], i["shift"], i["scale"]),
                                        (i["tx"], i["tshift"], i["tscale"]))
    norm = op.split("_")[1]
    return lambda i: torch.func.jvp(lambda x, s, k: ref.adaln(x, s, k, norm, i.get("weight"), EPS),
                                    (i["x"], i["shift"], i["scale"]), (i["tx"], i["tshift"], i["tscale"]))


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_bench_norms(benchmark, case):
    _harness.require_cuda()
    op, shape, dtype, kind, mod_dtype = CASES[case]
    group = "norms"
    i = _inputs(op, shape, dtype, kind, mod_dtype)
    out_bytes = 2 * i["x"].numel() * i["x"].element_size()
    bytes_moved = _nbytes(*i.values()) + out_bytes

    with torch.no_grad():
        ours = _ours(op, i)
        y, ty = ours()
        backend = norm_ops.backend_for(*[t for t in i.values()])
        ref_fn = functools.partial(_reference_jvp(op), i)
        ref_y, ref_ty = ref_fn()
        err = max(_rel(y, ref_y), _rel(ty, ref_ty))
        del y, ty, ref_y, ref_ty
        ms_ours = _harness.timed_ms(benchmark, ours, kernel_only=True)
        _harness.record(group, case, f"facm_ext ({backend})", ms_ours, bytes_moved=bytes_moved,
                        peak_gib=_harness.peak_extra_memory_gib(ours),
                        note=f"rel. diff vs eager jvp {err:.1e}; eager call {_harness.median_ms(ours):.3f} ms")
        if backend == "cuda" and i["x"].shape[-1] > 1024:
            # A/B of the row staging: rows of > 128 vectors run shared-memory-staged by default.
            os.environ[STAGING_ENV] = "registers"
            try:
                ms = _harness.kernel_ms(ours)
            finally:
                del os.environ[STAGING_ENV]
            _harness.record(group, case, "facm_ext (cuda, rows in registers)", ms, bytes_moved=bytes_moved,
                            note=f"default staging {ms / ms_ours:.2f}x faster")

        torch._dynamo.reset()  # each case's lambda shares one code object: a fresh cache, not a recompile limit
        compiled = torch.compile(_reference_jvp(op), fullgraph=True, dynamic=False)
        alternatives = {
            "torch.func.jvp(reference) eager": ref_fn,
            "torch.compile(torch.func.jvp(reference))": functools.partial(compiled, i),
        }
        _harness.record_alternatives(group, case, alternatives, ms_ours, ours_label="ours", bytes_moved=bytes_moved,
                                     kernel_only=True)
