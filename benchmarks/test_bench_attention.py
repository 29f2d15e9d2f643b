"""attention_jvp (one-pass flash JVP: the CUDA C++ kernel and the Triton kernel where both apply) against SDPA
forward (best backend), and the math-path JVP (torch.func.jvp of the reference attention) eager and compiled, bf16,
in the same run. Also the backward of the primal output against SDPA's backward.

Throughput of every JVP row counts 12 N M d FLOPs per batch and head (N = Lq, M = Lk), the work of the full JVP
(primal 4 N M d + tangent 8 N M d), also for the cross-attention case where only tq is given (actual work 8 N M d).
SDPA forward rows count its own 4 N M d. Backward rows count 10 N M d (recompute S, dV, dP, dQ, dK: 5 GEMMs).

Forward rows (ours, SDPA, the math path) are kernel times (`_harness.kernel_ms`: CUDA-graph replay), so the ~0.03 ms
SDPA call and our ~0.1 ms call at the LightningDiT shape are compared without Python launch overhead; backward
rows are event times of eager calls.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import _harness
from facm_ext.ops import attention as attention_ops
from facm_ext.ops import attention_jvp
from facm_ext.reference.attention import attention

# name -> (B, H, Lq, Lk, D, tangents given for (q, k, v))
CASES = {
    "B1_L4096_D128": (1, 16, 4096, 4096, 128, (True, True, True)),
    "lightningdit_B16": (16, 16, 256, 256, 72, (True, True, True)),
    "lightningdit_B64": (64, 16, 256, 256, 72, (True, True, True)),
    "dit_xl2_512px_B16": (16, 16, 1024, 1024, 72, (True, True, True)),
    "wan_cross_Lk512_tq_only": (1, 40, 32760, 512, 128, (True, False, False)),
    "wan_self_L32760": (1, 40, 32760, 32760, 128, (True, True, True)),
}
# The math path materializes about six [B, H, Lq, Lk] bf16/fp32 tensors; skip it above this budget.
MATH_PATH_BUDGET_GIB = 40.0


def _make(batch, heads, len_q, len_k, head_dim, tangents, *, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    q = rand(batch, heads, len_q, head_dim)
    k, v = rand(batch, heads, len_k, head_dim), rand(batch, heads, len_k, head_dim)
    tq, tk, tv = (rand(*x.shape) if use else None for x, use in zip((q, k, v), tangents))
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, tq, tk, tv


def _row(*args, **kwargs) -> dict:
    """_harness.record, also printed as it comes (with -s), so a run cut short still reports what it measured."""
    row = _harness.record(*args, **kwargs)
    print("ROW", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                  if k not in ("device", "torch", "date")}, flush=True)
    return row


def _jvp_flops(batch, heads, len_q, len_k, head_dim):
    return 12.0 * batch * heads * len_q * len_k * head_dim


def _math_jvp_fn(q, k, v, tq, tk, tv):
    tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), (tq, tk, tv)))

    def run(q, k, v, tq, tk, tv):
        return torch.func.jvp(attention, (q, k, v), (tq, tk, tv))

    return run, (q, k, v, *tangents)


def _timed(benchmark, fn, *, use_benchmark: bool, kernel_only: bool = False):
    def synced():
        fn()
        torch.cuda.synchronize()

    if use_benchmark:
        benchmark.pedantic(synced, rounds=5, warmup_rounds=2)
    return _harness.kernel_ms(fn) if kernel_only else _harness.median_ms(fn)


def _kernel_detail(kernel: str, head_dim: int) -> str:
    if kernel == "cuda":
        return f"mma.sync, score GEMMs {(head_dim + 15) // 16 * 16} wide, 64x64 tiles, 4 warps"
    from facm_ext.kernels import attention_jvp_triton

    best = getattr(attention_jvp_triton._attention_jvp_fwd_autotuned, "best_config", None)
    config = f"{best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']} w{best.num_warps} s{best.num_stages}" if best else "-"
    return f"head split {attention_jvp_triton.split_head_dim(head_dim)}; config {config}"


def _time_kernels(benchmark, monkeypatch, inputs, *, flops, group, case, note) -> dict:
    """attention_jvp with each GPU kernel that takes ``inputs`` (the CUDA one where it applies: head_dim 64/72/80/96
    with a score tangent; the Triton one always), kernel times, the default through pytest-benchmark; one row each
    with ``note(kernel, ms)`` and peak extra memory. -> {kernel: ms}."""
    q, k, v, tq, tk, tv = inputs
    default = attention_ops._forward_backend(q, tq, tk)
    kernels = ["cuda", "triton"] if attention_ops._cuda_kernel_applies(q, tq, tk) else ["triton"]
    times = {}
    for kernel in kernels:
        monkeypatch.setenv("FACM_EXT_ATTN_KERNEL", kernel)
        ours = functools.partial(attention_jvp, q, k, v, tq, tk, tv)
        ours()  # autotune and compile outside the timing
        ms = _timed(benchmark, ours, use_benchmark=kernel == default, kernel_only=True)
        times[kernel] = ms
        _row(group, case, f"facm_ext attention_jvp ({kernel}{', default' if kernel == default else ''})", ms,
             flops=flops, peak_gib=_harness.peak_extra_memory_gib(ours),
             note=f"{note(kernel, ms)}; {_kernel_detail(kernel, q.shape[-1])}")
    monkeypatch.delenv("FACM_EXT_ATTN_KERNEL")
    return times


@pytest.mark.parametrize("case", list(CASES))
def test_bench_attention_jvp(benchmark, case, monkeypatch):
    _harness.require_cuda()
    batch, heads, len_q, len_k, head_dim, tangents = CASES[case]
    flops = _jvp_flops(batch, heads, len_q, len_k, head_dim)
    q, k, v, tq, tk, tv = _make(batch, heads, len_q, len_k, head_dim, tangents)
    group = "attention_jvp"

    with torch.no_grad():
        counted = f"12NMd counted{' (only tq: 8NMd done)' if tangents == (True, False, False) else ''}"
        ms_by_kernel = _time_kernels(benchmark, monkeypatch, (q, k, v, tq, tk, tv), flops=flops, group=group,
                                     case=case, note=lambda kernel, ms: counted)

        sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v)
        sdpa()
        ms_sdpa = _harness.kernel_ms(sdpa)
        _row(group, case, "SDPA forward (primal only)", ms_sdpa, flops=flops / 3,
             peak_gib=_harness.peak_extra_memory_gib(sdpa),
             note="; ".join(f"{name}/SDPA fwd = {ms / ms_sdpa:.2f}x" for name, ms in ms_by_kernel.items()))

        math_gib = 6 * batch * heads * len_q * len_k * 4 / 2**30
        if math_gib > MATH_PATH_BUDGET_GIB:
            for impl in ("math-path torch.func.jvp eager", "math-path torch.func.jvp compiled"):
                _row(group, case, impl, float("nan"),
                     note=f"skipped: needs ~{math_gib:.0f} GiB ([B,H,Lq,Lk] scores)")
            return
        run, args = _math_jvp_fn(q, k, v, tq, tk, tv)
        eager = functools.partial(run, *args)
        eager()
        _row(group, case, "math-path torch.func.jvp eager", _harness.kernel_ms(eager), flops=flops,
             peak_gib=_harness.peak_extra_memory_gib(eager))
        compiled_run = torch.compile(run, fullgraph=True, dynamic=False)
        compiled = functools.partial(compiled_run, *args)
        try:
            compiled()
        except Exception as exc:  # noqa: BLE001 - the alternative failing to compile is itself the result to report
            _row(group, case, "math-path torch.func.jvp compiled", float("nan"),
                 note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            return
        _row(group, case, "math-path torch.func.jvp compiled", _harness.kernel_ms(compiled), flops=flops,
             peak_gib=_harness.peak_extra_memory_gib(compiled))


# Head dims the CUDA kernel also compiles (64, 80, 96), timed against the Triton kernel and SDPA forward to decide
# which kernel is the default for them (attention._CUDA_DEFAULT_HEAD_DIMS). No math-path rows: not a target shape.
HEAD_DIM_CASES = {f"B16_H16_L{length}_D{head_dim}": (16, 16, length, length, head_dim, (True, True, True))
                  for head_dim in (64, 80, 96) for length in (256, 1024)}


@pytest.mark.parametrize("case", list(HEAD_DIM_CASES))
def test_bench_attention_jvp_head_dims(benchmark, case, monkeypatch):
    _harness.require_cuda()
    flops = _jvp_flops(*HEAD_DIM_CASES[case][:5])
    inputs = _make(*HEAD_DIM_CASES[case])
    with torch.no_grad():
        sdpa = functools.partial(F.scaled_dot_product_attention, *inputs[:3])
        sdpa()
        ms_sdpa = _harness.kernel_ms(sdpa)
        _row("attention_jvp_head_dims", case, "SDPA forward (primal only)", ms_sdpa, flops=flops / 3)
        _time_kernels(benchmark, monkeypatch, inputs, flops=flops, group="attention_jvp_head_dims", case=case,
                      note=lambda kernel, ms: f"{ms / ms_sdpa:.2f}x SDPA fwd")


BACKWARD_CASES = ["B1_L4096_D128", "lightningdit_B64", "dit_xl2_512px_B16", "wan_cross_Lk512_tq_only"]


def _backward_timer(o, inputs):
    grad = torch.randn_like(o)
    return lambda: torch.autograd.grad(o, inputs, grad, retain_graph=True)


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_bench_attention_backward(benchmark, case, monkeypatch):
    _harness.require_cuda()
    batch, heads, len_q, len_k, head_dim, tangents = CASES[case]
    bwd_flops = 10.0 * batch * heads * len_q * len_k * head_dim
    q, k, v, tq, tk, tv = _make(batch, heads, len_q, len_k, head_dim, tangents, requires_grad=True)
    group = "attention_backward"

    o_sdpa = F.scaled_dot_product_attention(q, k, v)
    sdpa_bwd = _backward_timer(o_sdpa, (q, k, v))
    sdpa_bwd()
    ms_sdpa = _harness.median_ms(sdpa_bwd)
    _row(group, case, "SDPA backward", ms_sdpa, flops=bwd_flops)
    del o_sdpa, sdpa_bwd

    for backend in ("default", "flash", "triton", "cudnn"):
        if backend == "default":
            monkeypatch.delenv("FACM_EXT_ATTN_BACKWARD", raising=False)
        else:
            monkeypatch.setenv("FACM_EXT_ATTN_BACKWARD", backend)
        o, _ = attention_jvp(q, k, v, tq, tk, tv)
        ours_bwd = _backward_timer(o, (q, k, v))
        if backend == "default":
            ours_bwd()
        else:
            try:
                ours_bwd()
            except (RuntimeError, TypeError) as exc:  # a forced aten backward may reject our inputs: report it
                _row(group, case, f"facm_ext backward ({backend})", float("nan"),
                     note=f"failed: {str(exc).splitlines()[0][:80]}")
                continue
        ms = _timed(benchmark, ours_bwd, use_benchmark=backend == "default")
        _row(group, case, f"facm_ext backward ({backend})", ms, flops=bwd_flops,
             note=f"vs SDPA backward {ms / ms_sdpa:.2f}x")
        del o, ours_bwd
    monkeypatch.delenv("FACM_EXT_ATTN_BACKWARD", raising=False)

