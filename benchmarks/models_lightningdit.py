"""LightningDiT-XL/1 whole-model rows of issue 4 in one process, per batch size: plain forward, plain forward +
backward, ``facm_ext.jvp`` (no grad; with grad + backward), ``facm_ext.jvp.graph`` (both), and the compiled
``torch.func.jvp`` (math SDPA, no grad) last, since compiling it takes minutes. The rows are those of
``test_bench_jvp_models.py`` (same model, inputs, measurement and FLOP counts), without pytest's ordering, so a
run under a time limit reaches the compiled baseline of the first batch size.

    python benchmarks/models_lightningdit.py --batches 64,16 --json out.json [--skip-compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
import test_bench_jvp_models as models_bench  # noqa: E402

import facm_ext  # noqa: E402


def run_batch(model, batch: int, *, compiled_baseline: bool, started: float) -> None:
    case = f"LightningDiT-XL/1 B={batch} L=256 bf16-autocast"
    gen = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, 32, 16, 16, device="cuda", generator=gen)
    t = torch.rand(batch, device="cuda", generator=gen)
    y = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    v = torch.randn(x.shape, device="cuda", generator=gen)
    one = torch.ones_like(t)
    fwd_flops, jvp_flops = models_bench._lightningdit_flops(model, batch)

    def func(x, t):
        return model(x, t, y)

    def plain_forward():
        with torch.no_grad(), models_bench._autocast():
            func(x, t)

    def plain_forward_backward():
        with models_bench._autocast():
            out = func(x, t)
        models_bench._loss(out).backward()
        model.zero_grad(set_to_none=True)

    def ours_no_grad():
        with torch.no_grad(), models_bench._autocast():
            facm_ext.jvp(func, (x, t), (v, one))

    def ours_grad_backward():
        with models_bench._autocast():
            out, tangent = facm_ext.jvp(func, (x, t), (v, one))
        models_bench._loss(out, tangent).backward()
        model.zero_grad(set_to_none=True)

    fwd_ms, _ = models_bench._measure(case, "plain forward, no grad", plain_forward, flops=fwd_flops)
    fb_ms, fb_peak = models_bench._measure(case, "plain forward + backward", plain_forward_backward,
                                           flops=3 * fwd_flops)
    models_bench._measure(case, "facm_ext.jvp, no grad", ours_no_grad, flops=jvp_flops)
    gb_ms, gb_peak = models_bench._measure(case, "facm_ext.jvp with grad + backward", ours_grad_backward,
                                           flops=jvp_flops + 2 * fwd_flops)
    _harness.RESULTS[-1]["note"] = f"{gb_ms / fb_ms:.2f}x time, {gb_peak / fb_peak:.2f}x peak of plain fwd+bwd"
    models_bench._measure_graphed(case, model, func, (x, t), (v, one), fwd_ms=fwd_ms, fb_ms=fb_ms, fb_peak=fb_peak,
                                  fwd_flops=fwd_flops, jvp_flops=jvp_flops)
    if not compiled_baseline:
        return
    compiled_jvp = torch.compile(lambda x, t, v, one: torch.func.jvp(func, (x, t), (v, one)), dynamic=False)

    def compiled_no_grad():
        with torch.no_grad(), models_bench._autocast(), sdpa_kernel(SDPBackend.MATH):
            compiled_jvp(x, t, v, one)

    print(f"[{time.time() - started:.0f} s] compiling torch.func.jvp at B={batch}", flush=True)
    models_bench._measure(case, "torch.compile(torch.func.jvp), math SDPA, no grad", compiled_no_grad,
                          flops=jvp_flops)
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="64,16")
    parser.add_argument("--json", default="")
    parser.add_argument("--skip-compiled", action="store_true", help="leave out the compiled torch.func.jvp rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("models_lightningdit.py needs a CUDA device")
    started = time.time()
    model = models_bench._lightningdit()

    def dump() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": _harness.RESULTS}, f, indent=1, default=str)

    for batch in (int(b) for b in args.batches.split(",")):
        run_batch(model, batch, compiled_baseline=not args.skip_compiled, started=started)
        dump()
        for row in _harness.RESULTS:
            if row["case"].startswith(f"LightningDiT-XL/1 B={batch} "):
                print(f"{row['impl'][:60]:60s} {row['ms']:8.1f} ms  peak {row.get('peak_gib') or 0:.2f} GiB  "
                      f"{row.get('note', '')}", flush=True)


if __name__ == "__main__":
    main()
