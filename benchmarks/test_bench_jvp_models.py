"""facm_ext.jvp on whole models, against every alternative in the same run (bf16 autocast, fp32 parameters, as
FACM trains):

- LightningDiT-XL/1 (675M parameters, 256 tokens) at B=16 and B=64: plain forward (no grad), plain forward +
  backward, facm_ext.jvp (no grad), facm_ext.jvp with grad + backward of a loss on the primal output, eager
  torch.func.jvp with the math SDPA backend (no grad, and with grad + backward: the official FACM path), and
  torch.compile(torch.func.jvp) (no grad, and with grad + backward).
- One Wan 2.2 A14B block (dim 5120, 40 heads of 128, FFN 13824) at 32,760 tokens (480x832, 81 frames) with a
  512-token text context: plain forward, plain forward + backward, facm_ext.jvp (no grad and with grad +
  backward) and the math-path torch.func.jvp.

Targets (issue 4): no-grad JVP at or below compiled torch.func.jvp; JVP with grad + backward within 1.6x the time
and 1.3x the peak memory of a plain forward + backward; B=64 fits on an 80 GB card. A failing or out-of-memory
alternative is recorded as a row with the reason, never a crash.

FLOP counts (for the TFLOP/s column): forward = 2 * (Linear parameters) * tokens + 4 B H L^2 D per attention;
JVP = twice the Linear FLOPs of the paths that carry a tangent + 3x attention (8NMd/4NMd = 2x for a query-only
cross-attention tangent); backward = 2x forward.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import _harness
import facm_ext
from facm_ext.jvp import JVPReport
from facm_ext.models import LightningDiT_XL_1, WanBlock, wan_rope_tables

GROUP = "jvp_models"
LIGHTNINGDIT_BATCHES = (16, 64)
WAN_GRID = (21, 30, 52)  # latent 21x60x104 with patch (1, 2, 2): 32,760 tokens
WAN_DIM, WAN_FFN, WAN_HEADS, WAN_TEXT = 5120, 13824, 40, 512


@contextlib.contextmanager
def native_blocks(mode: str):
    """FACM_EXT_NATIVE_BLOCKS=mode for the calls inside (facm_ext.jvp reads it once per call)."""
    before = os.environ.get("FACM_EXT_NATIVE_BLOCKS")
    os.environ["FACM_EXT_NATIVE_BLOCKS"] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ["FACM_EXT_NATIVE_BLOCKS"]
        else:
            os.environ["FACM_EXT_NATIVE_BLOCKS"] = before


def _autocast():
    return torch.autocast("cuda", torch.bfloat16)


def _failure_note(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"failed: {type(exc).__name__}: {first[:100]}"


def _release():
    gc.collect()
    torch.cuda.empty_cache()


def _measure(case: str, impl: str, fn, *, flops: float | None = None, note: str = "", benchmark=None):
    """Warm fn up, then record its do_bench median and peak extra memory; an exception becomes a row with the
    reason (the alternative failing is the result). Returns (ms, peak GiB) or (nan, nan)."""
    failure = None
    try:
        fn()
        torch.cuda.synchronize()
        if benchmark is not None:
            def synced():
                fn()
                torch.cuda.synchronize()

            benchmark.pedantic(synced, rounds=3, warmup_rounds=1)
        ms = _harness.median_ms(fn, warmup_ms=50, rep_ms=500)
        peak = _harness.peak_extra_memory_gib(fn)
    except Exception as exc:  # noqa: BLE001 - an alternative failing (OOM, no forward AD, compile error) is a result
        failure = _failure_note(exc)
    if failure is not None:
        # Outside the except block, so the exception's frames (holding partial activations) are gone first.
        _release()
        _harness.record(GROUP, case, impl, float("nan"), note=failure)
        return float("nan"), float("nan")
    _harness.record(GROUP, case, impl, ms, flops=flops, peak_gib=peak, note=note)
    _release()
    return ms, peak


def _record_fusion(case: str, func, primals, tangents) -> None:
    """One row saying whether every recognized op ran fused on this card (and why not, if not)."""
    report = JVPReport()
    with torch.no_grad(), _autocast():
        facm_ext.jvp(func, primals, tangents, report=report)
    fused = sum(report.fused.values())
    declined = "; ".join(f"{what}: {', '.join(sorted(why))}" for what, why in sorted(report.reasons.items()))
    _harness.record(GROUP, case, "facm_ext.jvp fusion check (report)", float("nan"),
                    note=f"{fused} fused calls; " + (f"declined: {declined[:300]}" if declined else "none declined"))


def _randomize_zero_init(model: nn.Module) -> None:
    """The adaLN-Zero init makes every block an identity; give the zero-initialized weights small values so the
    timed work has realistic magnitudes (the timing itself does not depend on the values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any():
                p.normal_(0.0, 0.02)


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@functools.lru_cache(maxsize=1)
def _lightningdit():
    torch.manual_seed(0)
    model = LightningDiT_XL_1().cuda()
    _randomize_zero_init(model)
    return model


def _lightningdit_flops(model, batch: int) -> tuple[float, float]:
    """(forward FLOPs, JVP FLOPs) of LightningDiT-XL/1 at 256 tokens."""
    tokens = batch * 256
    linear = 2.0 * _linear_params(model.blocks) * tokens + 2.0 * _linear_params(model.final_layer) * tokens
    heads, head_dim = model.num_heads, model.hidden_size // model.num_heads
    attention = 4.0 * batch * heads * 256 * 256 * head_dim * len(model.blocks)
    return linear + attention, 2 * linear + 3 * attention


def _loss(out: torch.Tensor, tangent: torch.Tensor | None = None) -> torch.Tensor:
    """A FACM-like loss on the primal output (the tangent enters the target without gradient)."""
    target = out.detach() if tangent is None else (out.detach() - 0.5 * tangent.float())
    return (out.float() - target.float() - 0.01).square().mean()


def _measure_graphed(case, model, func, primals, tangents, *, fwd_ms, fb_ms, fb_peak, fwd_flops, jvp_flops):
    """facm_ext.jvp.graph rows: the JVP replayed from a CUDA graph (no grad; grad with the backward captured),
    with the memory the graph keeps reserved between calls (its private pool) added to the peak."""
    def cast():
        return torch.autocast("cuda", torch.bfloat16, cache_enabled=False)

    for grad in (False, True):
        _release()
        # The graph keeps its private memory pool (static inputs, outputs, activations) reserved between calls.
        before = torch.cuda.memory_reserved()
        try:
            with torch.set_grad_enabled(grad), cast():
                graphed = facm_ext.jvp.graph(func, primals, tangents, module=model)
        except Exception as exc:  # noqa: BLE001 - a capture failure is recorded as the row's result
            _harness.record(GROUP, case, f"facm_ext.jvp.graph, {'grad + backward' if grad else 'no grad'}",
                            float("nan"), note=_failure_note(exc))
            continue
        _release()
        pool_gib = (torch.cuda.memory_reserved() - before) / 2**30

        if grad:
            def fn():
                with cast():
                    out, tangent = graphed(primals, tangents)
                _loss(out, tangent).backward()
                model.zero_grad(set_to_none=True)
        else:
            def fn():
                with torch.no_grad():
                    graphed(primals, tangents)

        impl = f"facm_ext.jvp.graph (CUDA graph), {'with grad + backward' if grad else 'no grad'}"
        ms, peak = _measure(case, impl, fn, flops=jvp_flops + (2 * fwd_flops if grad else 0))
        row = _harness.RESULTS[-1]
        if ms == ms:
            row["peak_gib"] = peak + pool_gib
            base_ms, base_peak = (fb_ms, fb_peak) if grad else (fwd_ms, None)
            row["note"] = (f"{ms / base_ms:.2f}x time of plain {'fwd+bwd' if grad else 'forward'}"
                           + (f", {(peak + pool_gib) / base_peak:.2f}x its peak memory" if base_peak else "")
                           + f"; graph pool {pool_gib:.2f} GiB")
        del graphed
        _release()


def lightningdit_steps(model, batch: int) -> SimpleNamespace:
    """The LightningDiT-XL/1 case at ``batch``: inputs (seeded by the batch size), FLOP counts and one callable per
    timed variant (plain forward / forward + backward, facm_ext.jvp, eager and compiled torch.func.jvp with math
    SDPA, each without grad and with grad + backward), all under bf16 autocast. Shared with models_lightningdit.py."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, 32, 16, 16, device="cuda", generator=gen)
    t = torch.rand(batch, device="cuda", generator=gen)
    y = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    v = torch.randn(x.shape, device="cuda", generator=gen)
    one = torch.ones_like(t)
    fwd_flops, jvp_flops = _lightningdit_flops(model, batch)

    def func(x, t):
        return model(x, t, y)

    def plain_forward():
        with torch.no_grad(), _autocast():
            func(x, t)

    def plain_forward_backward():
        with _autocast():
            out = func(x, t)
        _loss(out).backward()
        model.zero_grad(set_to_none=True)

    def ours_no_grad():
        with torch.no_grad(), _autocast():
            facm_ext.jvp(func, (x, t), (v, one))

    def ours_no_grad_per_op():
        with native_blocks("0"), torch.no_grad(), _autocast():
            facm_ext.jvp(func, (x, t), (v, one))

    def ours_no_grad_native():
        with native_blocks("1"), torch.no_grad(), _autocast():
            facm_ext.jvp(func, (x, t), (v, one))

    def ours_grad_backward():
        with _autocast():
            out, tangent = facm_ext.jvp(func, (x, t), (v, one))
        _loss(out, tangent).backward()
        model.zero_grad(set_to_none=True)

    def torch_func_no_grad():
        with torch.no_grad(), _autocast(), sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(func, (x, t), (v, one))

    def torch_func_grad_backward():
        with _autocast(), sdpa_kernel(SDPBackend.MATH):
            out, tangent = torch.func.jvp(func, (x, t), (v, one))
        _loss(out, tangent).backward()
        model.zero_grad(set_to_none=True)

    compiled_jvp = torch.compile(lambda x, t, v, one: torch.func.jvp(func, (x, t), (v, one)), dynamic=False)

    def compiled_no_grad():
        with torch.no_grad(), _autocast(), sdpa_kernel(SDPBackend.MATH):
            compiled_jvp(x, t, v, one)

    def compiled_grad_backward():
        with _autocast(), sdpa_kernel(SDPBackend.MATH):
            out, tangent = compiled_jvp(x, t, v, one)
        _loss(out, tangent).backward()
        model.zero_grad(set_to_none=True)

    return SimpleNamespace(
        case=f"LightningDiT-XL/1 B={batch} L=256 bf16-autocast", func=func, primals=(x, t), tangents=(v, one),
        fwd_flops=fwd_flops, jvp_flops=jvp_flops, plain_forward=plain_forward,
        plain_forward_backward=plain_forward_backward, ours_no_grad=ours_no_grad,
        ours_no_grad_per_op=ours_no_grad_per_op, ours_no_grad_native=ours_no_grad_native,
        ours_grad_backward=ours_grad_backward, torch_func_no_grad=torch_func_no_grad,
        torch_func_grad_backward=torch_func_grad_backward, compiled_no_grad=compiled_no_grad,
        compiled_grad_backward=compiled_grad_backward)


def measure_native_block_variants(case: str, steps: SimpleNamespace) -> None:
    """The no-grad JVP with every block on the per-op path and with every block as the native C++ op, beside the
    default (auto: native up to facm_ext.jvp._blocks.NATIVE_BLOCK_MAX_ROWS rows)."""
    _measure(case, "facm_ext.jvp, no grad, per-op path (FACM_EXT_NATIVE_BLOCKS=0)", steps.ours_no_grad_per_op,
             flops=steps.jvp_flops)
    _measure(case, "facm_ext.jvp, no grad, native blocks at any size (FACM_EXT_NATIVE_BLOCKS=1)",
             steps.ours_no_grad_native, flops=steps.jvp_flops)


@pytest.mark.parametrize("batch", LIGHTNINGDIT_BATCHES)
def test_bench_jvp_lightningdit_xl(benchmark, batch):
    _harness.require_cuda()
    model = _lightningdit()
    steps = lightningdit_steps(model, batch)
    case, func, fwd_flops, jvp_flops = steps.case, steps.func, steps.fwd_flops, steps.jvp_flops
    (x, t), (v, one) = steps.primals, steps.tangents
    plain_forward, plain_forward_backward = steps.plain_forward, steps.plain_forward_backward
    ours_no_grad, ours_grad_backward = steps.ours_no_grad, steps.ours_grad_backward
    torch_func_no_grad, torch_func_grad_backward = steps.torch_func_no_grad, steps.torch_func_grad_backward
    compiled_no_grad, compiled_grad_backward = steps.compiled_no_grad, steps.compiled_grad_backward

    _record_fusion(case, func, (x, t), (v, one))
    fwd_ms, _ = _measure(case, "plain forward, no grad", plain_forward, flops=fwd_flops)
    fb_ms, fb_peak = _measure(case, "plain forward + backward", plain_forward_backward, flops=3 * fwd_flops)
    # Ours before the baselines: compiling torch.func.jvp of the XL model takes minutes, and a run cut short by a
    # time limit must still have measured the library.
    ours_ms, _ = _measure(case, "facm_ext.jvp, no grad", ours_no_grad, flops=jvp_flops, benchmark=benchmark,
                          note="")
    ours_row = _harness.RESULTS[-1]
    measure_native_block_variants(case, steps)
    grad_ms, grad_peak = _measure(case, "facm_ext.jvp with grad + backward", ours_grad_backward,
                                  flops=jvp_flops + 2 * fwd_flops)
    if grad_ms == grad_ms and fb_ms == fb_ms and fb_peak > 0:
        _harness.RESULTS[-1]["note"] = (f"{grad_ms / fb_ms:.2f}x time (target <= 1.6), "
                                        f"{grad_peak / fb_peak:.2f}x peak memory (target <= 1.3) of plain fwd+bwd")
    _measure_graphed(case, model, func, (x, t), (v, one), fwd_ms=fwd_ms, fb_ms=fb_ms, fb_peak=fb_peak,
                     fwd_flops=fwd_flops, jvp_flops=jvp_flops)
    _measure(case, "torch.func.jvp eager, math SDPA, no grad", torch_func_no_grad, flops=jvp_flops)
    _measure(case, "torch.func.jvp eager, math SDPA, with grad + backward (official FACM)",
             torch_func_grad_backward, flops=jvp_flops + 2 * fwd_flops)
    compiled_ms, _ = _measure(case, "torch.compile(torch.func.jvp), math SDPA, no grad", compiled_no_grad,
                              flops=jvp_flops)
    if ours_ms == ours_ms and compiled_ms == compiled_ms:
        ours_row["note"] = (f"{ours_ms / compiled_ms:.2f}x compiled torch.func.jvp (target <= 1), "
                            f"{ours_ms / fwd_ms:.2f}x plain forward")
    _measure(case, "torch.compile(torch.func.jvp) with grad + backward", compiled_grad_backward,
             flops=jvp_flops + 2 * fwd_flops)


# ------------------------------------------------------------------------------------------------ Wan block
def _wan_flops(block: WanBlock, tokens: int) -> tuple[float, float]:
    """(forward FLOPs, JVP FLOPs) of one Wan block: the cross-attention K/V projections of the text carry no
    tangent, the cross-attention has a query-only tangent."""
    dim, ffn, heads = WAN_DIM, WAN_FFN, WAN_HEADS
    head_dim = dim // heads
    token_linear = 2.0 * tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn)  # self q,k,v,o; cross q,o; FFN
    text_linear = 2.0 * WAN_TEXT * 2 * dim * dim  # cross k, v
    self_attention = 4.0 * heads * tokens * tokens * head_dim
    cross_attention = 4.0 * heads * tokens * WAN_TEXT * head_dim
    forward = token_linear + text_linear + self_attention + cross_attention
    jvp = 2 * token_linear + text_linear + 3 * self_attention + 2 * cross_attention
    return forward, jvp


def test_bench_jvp_wan_block_32760_tokens(benchmark):
    _harness.require_cuda()
    _lightningdit.cache_clear()
    _release()
    torch.manual_seed(0)
    block = WanBlock(WAN_DIM, WAN_FFN, WAN_HEADS).cuda()
    tokens = WAN_GRID[0] * WAN_GRID[1] * WAN_GRID[2]
    case = f"Wan2.2 block L={tokens} dim 5120 bf16-autocast"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, tokens, WAN_DIM, device="cuda", generator=gen)
    e = torch.randn(1, tokens, 6, WAN_DIM, device="cuda", generator=gen) * 0.1
    tx = torch.randn(x.shape, device="cuda", generator=gen)
    te = torch.randn(e.shape, device="cuda", generator=gen) * 0.1
    context = torch.randn(1, WAN_TEXT, WAN_DIM, device="cuda", generator=gen)
    rope_cos, rope_sin = wan_rope_tables(WAN_DIM // WAN_HEADS, WAN_GRID, device="cuda")
    fwd_flops, jvp_flops = _wan_flops(block, tokens)

    def func(x, e):
        return block(x, e, None, rope_cos, rope_sin, context, None)

    def plain_forward():
        with torch.no_grad(), _autocast():
            func(x, e)

    def plain_forward_backward():
        with _autocast():
            out = func(x, e)
        _loss(out).backward()
        block.zero_grad(set_to_none=True)

    def ours_no_grad():
        with torch.no_grad(), _autocast():
            facm_ext.jvp(func, (x, e), (tx, te))

    def ours_grad_backward():
        with _autocast():
            out, tangent = facm_ext.jvp(func, (x, e), (tx, te))
        _loss(out, tangent).backward()
        block.zero_grad(set_to_none=True)

    def math_no_grad():
        with torch.no_grad(), _autocast(), sdpa_kernel(SDPBackend.MATH):
            torch.func.jvp(func, (x, e), (tx, te))

    _record_fusion(case, func, (x, e), (tx, te))
    fwd_ms, _ = _measure(case, "plain forward, no grad", plain_forward, flops=fwd_flops)
    fb_ms, fb_peak = _measure(case, "plain forward + backward", plain_forward_backward, flops=3 * fwd_flops)
    ours_ms, _ = _measure(case, "facm_ext.jvp, no grad", ours_no_grad, flops=jvp_flops, benchmark=benchmark)
    if ours_ms == ours_ms:
        _harness.RESULTS[-1]["note"] = f"{ours_ms / fwd_ms:.2f}x plain forward"
    grad_ms, grad_peak = _measure(case, "facm_ext.jvp with grad + backward", ours_grad_backward,
                                  flops=jvp_flops + 2 * fwd_flops)
    if grad_ms == grad_ms and fb_ms == fb_ms and fb_peak > 0:
        _harness.RESULTS[-1]["note"] = (f"{grad_ms / fb_ms:.2f}x time, {grad_peak / fb_peak:.2f}x peak memory of "
                                        "plain fwd+bwd")
    _measure(case, "torch.func.jvp eager, math SDPA, no grad", math_no_grad, flops=jvp_flops)
