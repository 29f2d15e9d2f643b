"""LightningDiT-XL/1 whole-model rows of issue 4 in one process, per batch size: plain forward, plain forward +
backward, ``facm_ext.jvp`` (no grad, also with every block on the per-op path and with every block native; with
grad + backward), ``facm_ext.jvp.graph`` (both), and the compiled
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
import test_bench_jvp_models as models_bench  # noqa: E402


def run_batch(model, batch: int, *, compiled_baseline: bool, started: float) -> None:
    steps = models_bench.lightningdit_steps(model, batch)
    case = steps.case
    fwd_ms, _ = models_bench._measure(case, "plain forward, no grad", steps.plain_forward, flops=steps.fwd_flops)
    fb_ms, fb_peak = models_bench._measure(case, "plain forward + backward", steps.plain_forward_backward,
                                           flops=3 * steps.fwd_flops)
    models_bench._measure(case, "facm_ext.jvp, no grad", steps.ours_no_grad, flops=steps.jvp_flops)
    models_bench.measure_native_block_variants(case, steps)
    gb_ms, gb_peak = models_bench._measure(case, "facm_ext.jvp with grad + backward", steps.ours_grad_backward,
                                           flops=steps.jvp_flops + 2 * steps.fwd_flops)
    _harness.RESULTS[-1]["note"] = f"{gb_ms / fb_ms:.2f}x time, {gb_peak / fb_peak:.2f}x peak of plain fwd+bwd"
    models_bench._measure_graphed(case, model, steps.func, steps.primals, steps.tangents, fwd_ms=fwd_ms, fb_ms=fb_ms,
                                  fb_peak=fb_peak, fwd_flops=steps.fwd_flops, jvp_flops=steps.jvp_flops)
    if not compiled_baseline:
        return
    print(f"[{time.time() - started:.0f} s] compiling torch.func.jvp at B={batch}", flush=True)
    models_bench._measure(case, "torch.compile(torch.func.jvp), math SDPA, no grad", steps.compiled_no_grad,
                          flops=steps.jvp_flops)
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
