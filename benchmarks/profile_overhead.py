"""Where facm_ext.jvp spends its time on a whole model: GPU busy time against wall time and CPU issue time.

    python benchmarks/profile_overhead.py [--batch 16] [--cprofile 30] [--json PATH]

LightningDiT-XL/1 at 256 tokens under bf16 autocast (fp32 parameters, as FACM trains), for a plain forward, a plain
forward + backward, facm_ext.jvp without grad, and facm_ext.jvp with grad + backward:

- wall ms: CUDA-event median of the whole call;
- issue ms: host time until the call returns, without synchronizing (close to wall: the host is the bottleneck);
- kernel ms: the sum of GPU kernel durations from torch.profiler (how busy the GPU was);
- kernels: how many kernels one call launches.

With --cprofile N it prints the N functions with the most host time inside one facm_ext.jvp call (no grad); with
--copy-sites N, the N Python call sites that make the most tensor copies (casts, contiguous copies) in one such call.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness  # noqa: E402  (benchmarks/, the script's folder)
import facm_ext  # noqa: E402
from facm_ext.models import LightningDiT_XL_1  # noqa: E402


def wall_ms(fn, iters: int = 10) -> float:
    fn()
    return _harness.event_median_ms(fn, iters=iters)


def issue_ms(fn, iters: int = 10) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def kernel_profile(fn) -> tuple[float, int, list]:
    """(GPU kernel ms, kernel count, the 12 kernels with the most total time as (name, ms, count))."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:90], [0.0, 0])
        entry[0] += e.device_time / 1e3
        entry[1] += 1
    top = sorted(((name, ms, count) for name, (ms, count) in by_name.items()), key=lambda r: -r[1])[:12]
    return sum(e.device_time for e in kernels) / 1e3, len(kernels), top


COPY_OPS = ("aten::copy_",)


def copy_call_sites(fn, top: int, *, cuda: bool = True) -> list[tuple[int, list[str]]]:
    """Where one call of ``fn`` copies tensors (casts, ``.contiguous()``, strided reshapes: each ``aten::copy_`` is
    one copy kernel on the GPU): the ``top`` Python call sites as (count, the six innermost Python frames outside
    torch), most frequent first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with profile(activities=activities, with_stack=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    sites: dict[tuple[str, ...], int] = {}
    for event in prof.events():
        if event.name not in COPY_OPS or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        # with_stack records the Python frames ("path(line): function") as the op's enclosing events (recent
        # torch) or as the ``stack`` of the op or of an enclosing op (older torch): collect both, innermost first.
        chain, stack, parent = [], list(event.stack or []), event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            if not stack and parent.stack:
                stack = list(parent.stack)
            parent = parent.cpu_parent
        frames = [name for name in chain + stack if "): " in name and "torch/" not in name]  # not torch's own
        key = tuple((frames or chain or ["<no caller recorded>"])[:6])
        sites[key] = sites.get(key, 0) + 1
    return sorted(((count, list(key)) for key, count in sites.items()), key=lambda site: -site[0])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cprofile", type=int, default=0)
    parser.add_argument("--copy-sites", type=int, default=0, metavar="N",
                        help="also print the N Python call sites with the most tensor copies (casts, contiguous "
                             "copies) in one facm_ext.jvp call without grad")
    parser.add_argument("--skip-rows", action="store_true", help="only the --cprofile / --copy-sites parts")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_overhead.py needs a CUDA GPU")

    torch.manual_seed(0)
    model = LightningDiT_XL_1().cuda()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    batch = args.batch
    x = torch.randn(batch, 32, 16, 16, device="cuda")
    t = torch.rand(batch, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    v = torch.randn_like(x)
    one = torch.ones_like(t)

    def func(x_, t_):
        return model(x_, t_, y)

    def autocast():
        return torch.autocast("cuda", torch.bfloat16)

    def plain_forward():
        with torch.no_grad(), autocast():
            func(x, t)

    def plain_forward_backward():
        with autocast():
            out = func(x, t)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def jvp_no_grad():
        with torch.no_grad(), autocast():
            facm_ext.jvp(func, (x, t), (v, one))

    def jvp_grad_backward():
        with autocast():
            out, tangent = facm_ext.jvp(func, (x, t), (v, one))
        (out.float() - tangent.float()).square().mean().backward()
        model.zero_grad(set_to_none=True)

    rows = []
    variants = [("plain forward (no grad)", plain_forward), ("plain forward + backward", plain_forward_backward),
                ("facm_ext.jvp (no grad)", jvp_no_grad), ("facm_ext.jvp grad + backward", jvp_grad_backward)]
    for name, fn in [] if args.skip_rows else variants:
        wall = wall_ms(fn)
        issue = issue_ms(fn)
        busy, count, top = kernel_profile(fn)
        rows.append(dict(name=name, wall_ms=wall, issue_ms=issue, kernel_ms=busy, kernels=count, top=top))

    print(f"### LightningDiT-XL/1, B={batch}, 256 tokens, bf16 autocast, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    if rows:
        print("| call | wall ms | host issue ms | GPU kernel ms | GPU busy | kernels |")
        print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['wall_ms']:.1f} | {row['issue_ms']:.1f} | {row['kernel_ms']:.1f} | "
              f"{100 * row['kernel_ms'] / row['wall_ms']:.0f}% | {row['kernels']} |")
    for row in rows:
        print(f"top kernels, {row['name']}:")
        for name, ms, count in row["top"]:
            print(f"  {ms:8.2f} ms {count:5d}x  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                   batch=batch, rows=rows), indent=1))
    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            jvp_no_grad()
        torch.cuda.synchronize()
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.cprofile)
        print("host profile of 3 facm_ext.jvp calls (no grad), by own time:")
        print(stream.getvalue())
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(args.cprofile)
        print("by cumulative time:")
        print(stream.getvalue())
    if args.copy_sites:
        sites = copy_call_sites(jvp_no_grad, args.copy_sites)
        print(f"tensor copies in one facm_ext.jvp call (no grad): {sum(count for count, _ in sites)} at the "
              f"{len(sites)} most frequent call sites")
        for count, frames in sites:
            print(f"  {count:5d}x  " + "  <-  ".join(frames))


if __name__ == "__main__":
    main()
