"""Measurement helpers shared by the benchmarks: median times, peak memory, the card's measured ceilings, and a
result table that benchmarks/conftest.py prints at the end of the session and writes as JSON.

Timing: ``triton.testing.do_bench`` median (CUDA events, L2 flushed between runs). Single-op benchmarks of
memory-bound kernels time the kernels alone (:func:`kernel_ms`: the call captured in a CUDA graph and replayed), since
one eager call of a ~50 us op can take longer to issue from Python than its kernel takes to run. Ceilings are measured
in the same process: device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul rate.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import date

import torch

RESULTS: list[dict] = []


def require_cuda():
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("benchmarks need a CUDA device")


def median_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def kernel_ms(fn) -> float:
    """Median GPU milliseconds of one call of fn with the host out of the loop: fn is captured once in a CUDA graph
    (after two warm-up calls on a side stream) and the graph is replayed under do_bench, L2 flushed between
    replays. The graph launches fn's kernels back to back, so this is the kernels' time, whichever Python issued
    them (our op wrapper, eager torch.func.jvp or a compiled function)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return median_ms(graph.replay)
    finally:
        del graph


def event_median_ms(fn, *, iters: int) -> float:
    """Median CUDA-event milliseconds of ``iters`` synchronized calls (a fixed count, unlike :func:`median_ms`:
    collectives need every rank to run the same calls); host wall time without CUDA."""
    import statistics
    import time

    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_ms(benchmark, fn, *, kernel_only: bool = False) -> float:
    """Give pytest-benchmark a synchronized run of fn (its own statistics), return the do_bench median in ms
    (of the CUDA-graph replay, :func:`kernel_ms`, with ``kernel_only``)."""
    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=5, warmup_rounds=2)
    return kernel_ms(fn) if kernel_only else median_ms(fn)


def peak_extra_memory_gib(fn) -> float:
    """Peak memory allocated during one call of fn beyond what was allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written), 2 GiB buffers."""
    n = 2**30 // 2
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def matmul_tflops() -> float:
    """Measured bf16 matmul rate in TFLOP/s (8192^3, random data)."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def record(group: str, case: str, impl: str, ms: float, *, bytes_moved: float | None = None,
           flops: float | None = None, peak_gib: float | None = None, note: str = "") -> dict:
    """Add one row to the session's result table and return it."""
    row = {"group": group, "case": case, "impl": impl, "ms": ms, "peak_gib": peak_gib, "note": note,
           "device": device_name(), "torch": torch.__version__, "date": date.today().isoformat()}
    if bytes_moved is not None:
        gbs = bytes_moved / (ms * 1e-3) / 1e9
        row["GB/s"] = gbs
        row["%copy"] = 100 * gbs / copy_bandwidth_gbs()
    if flops is not None:
        tflops = flops / (ms * 1e-3) / 1e12
        row["TFLOP/s"] = tflops
        row["%mm"] = 100 * tflops / matmul_tflops()
    RESULTS.append(row)
    write_results()  # after every row, so a run cut short by a time limit still leaves its numbers
    return row


def record_alternatives(group: str, case: str, alternatives: dict, ours_ms: float, *, ours_label: str = "ours",
                        bytes_moved: float | None = None, flops: float | None = None,
                        kernel_only: bool = False) -> None:
    """Time each baseline ``{impl: fn}`` (as :func:`kernel_ms` with ``kernel_only``, the way ours was timed) and
    record it with how many times faster ours is; a baseline that fails (out of memory, no forward AD, a compile
    error) is recorded as a row saying so, since that is the result."""
    for impl, fn in alternatives.items():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - an alternative failing is itself the result to report
            record(group, case, impl, float("nan"),
                   note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        timing_note = ""
        if kernel_only:
            try:
                ms = kernel_ms(fn)
            except RuntimeError as exc:  # a baseline CUDA graphs cannot capture: time its eager calls, and say so
                ms = median_ms(fn)
                timing_note = f"; not capturable ({str(exc).splitlines()[0][:60]}), timed eagerly"
        else:
            ms = median_ms(fn)
        record(group, case, impl, ms, bytes_moved=bytes_moved, flops=flops, peak_gib=peak_extra_memory_gib(fn),
               note=f"{ours_label} {ms / ours_ms:.2f}x faster{timing_note}")


def format_table(rows: list[dict]) -> str:
    cols = ["group", "case", "impl", "ms", "GB/s", "%copy", "TFLOP/s", "%mm", "peak_gib", "note"]
    used = [c for c in cols if any(r.get(c) not in (None, "") for r in rows)]

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    out = ["| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in used) + " |" for r in rows]
    return "\n".join(out)


def write_results(path: str | None = None) -> str | None:
    path = path or os.environ.get("FACM_EXT_BENCH_JSON")
    if not path or not RESULTS:
        return None
    ceilings = {}
    if torch.cuda.is_available():
        ceilings = {"copy_GB/s": copy_bandwidth_gbs(), "bf16_mm_TFLOP/s": matmul_tflops()}
    with open(path, "w") as f:
        json.dump({"device": device_name(), "torch": torch.__version__, "ceilings": ceilings, "rows": RESULTS},
                  f, indent=1)
    return path


def _merge(intervals) -> list[list[float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _covered_us(start: float, end: float, merged: list[list[float]]) -> float:
    covered = 0.0
    for m_start, m_end in merged:
        if m_end <= start:
            continue
        if m_start >= end:
            break
        covered += min(end, m_end) - max(start, m_start)
    return covered


def nccl_kernel_overlap(trace_path: str) -> dict:
    """NCCL all-gather / reduce-scatter kernel time in a chrome trace (torch.profiler), and the share of it during
    which some compute (non-NCCL) kernel runs on the same GPU. Keys: compute_kernel_ms, allgather_kernel_ms,
    allgather_overlap, allgather_kernels, and the same three for reducescatter."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    merged = _merge((e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower())
    compute_us = sum(end - start for start, end in merged)

    def covered(pattern: str) -> tuple[float, float, int]:
        total, overlapped, count = 0.0, 0.0, 0
        for e in kernels:
            name = e["name"].lower()
            if "nccl" not in name or pattern not in name:
                continue
            start, end = e["ts"], e["ts"] + e["dur"]
            total += end - start
            count += 1
            overlapped += _covered_us(start, end, merged)
        return total / 1e3, (overlapped / total if total else float("nan")), count

    gather_ms, gather_share, gather_count = covered("allgather")
    scatter_ms, scatter_share, scatter_count = covered("reducescatter")
    return dict(compute_kernel_ms=compute_us / 1e3, allgather_kernel_ms=gather_ms, allgather_overlap=gather_share,
                allgather_kernels=gather_count, reducescatter_kernel_ms=scatter_ms,
                reducescatter_overlap=scatter_share, reducescatter_kernels=scatter_count)


def phase_timeline(trace_path: str) -> dict:
    """Where the GPU time of one training step goes, split into the forward and the backward phase.

    A kernel belongs to the phase of the host thread that launched it (the CUDA runtime/driver event with the same
    correlation id): the thread that launched the first kernel is the forward's, every other thread (autograd's
    engine thread) the backward's. Per phase (keys ``{phase}_...``, phase in forward/backward), in ms:

    - ``span``: first kernel start to last kernel end;
    - ``compute``: time during which some compute (non-NCCL) kernel runs;
    - ``exposed_comm``: time during which an NCCL kernel runs and no compute kernel does;
    - ``idle``: time during which no kernel runs at all (the GPU waits for the host);
    - ``allgather`` / ``reducescatter``: their kernel time; ``..._exposed``: the part not covered by compute.

    Also ``between_ms``: from the forward's last kernel end to the backward's first kernel start, and
    ``{phase}_kernels``: {kernel name (cut at 400 characters): total ms} of the phase, memory copies and sets
    (``gpu_memcpy`` / ``gpu_memset`` events, which are not kernels) under "[memcpy ...]" / "[memset]"."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    launch_thread = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in (e.get("args") or {}):
            launch_thread[e["args"]["correlation"]] = e.get("tid")
    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        return {}
    forward_thread = launch_thread.get((kernels[0].get("args") or {}).get("correlation"))
    phases: dict[str, list[dict]] = {"forward": [], "backward": []}
    for e in kernels:
        thread = launch_thread.get((e.get("args") or {}).get("correlation"))
        phases["forward" if thread == forward_thread else "backward"].append(e)
    result: dict[str, float] = {}
    for phase, members in phases.items():
        if not members:
            continue
        start = min(e["ts"] for e in members)
        end = max(e["ts"] + e["dur"] for e in members)
        compute = _merge((e["ts"], e["ts"] + e["dur"]) for e in members if "nccl" not in e["name"].lower())
        everything = _merge((e["ts"], e["ts"] + e["dur"]) for e in members)
        compute_us = sum(b - a for a, b in compute)
        busy_us = sum(b - a for a, b in everything)
        result[f"{phase}_span_ms"] = (end - start) / 1e3
        result[f"{phase}_compute_ms"] = compute_us / 1e3
        result[f"{phase}_exposed_comm_ms"] = (busy_us - compute_us) / 1e3
        result[f"{phase}_idle_ms"] = (end - start - busy_us) / 1e3
        for kind in ("allgather", "reducescatter"):
            mine = [(e["ts"], e["ts"] + e["dur"]) for e in members
                    if "nccl" in e["name"].lower() and kind in e["name"].lower()]
            total = sum(b - a for a, b in mine)
            exposed = sum((b - a) - _covered_us(a, b, compute) for a, b in mine)
            result[f"{phase}_{kind}_ms"] = total / 1e3
            result[f"{phase}_{kind}_exposed_ms"] = exposed / 1e3
    for e in copies:
        thread = launch_thread.get((e.get("args") or {}).get("correlation"))
        phase = "forward" if thread == forward_thread else "backward"
        name = "[memset]" if e["cat"] == "gpu_memset" else f"[memcpy {e['name']}]"
        totals = result.setdefault(f"{phase}_kernels", {})
        totals[name] = totals.get(name, 0.0) + e["dur"] / 1e3
    for phase, members in phases.items():
        totals = result.setdefault(f"{phase}_kernels", {})
        for e in members:
            name = e["name"][:400]
            totals[name] = totals.get(name, 0.0) + e["dur"] / 1e3
    if phases["forward"] and phases["backward"]:
        forward_end = max(e["ts"] + e["dur"] for e in phases["forward"])
        backward_start = min(e["ts"] for e in phases["backward"])
        result["between_ms"] = (backward_start - forward_end) / 1e3
    return result


def kernel_differences(timeline: dict, reference: dict, *, top: int = 15) -> str:
    """Per phase, the kernels whose total time differs most between two :func:`phase_timeline` results
    (``timeline`` minus ``reference``), as markdown-ish lines."""
    lines = []
    for phase in ("forward", "backward"):
        mine, theirs = timeline.get(f"{phase}_kernels") or {}, reference.get(f"{phase}_kernels") or {}
        if not mine and not theirs:
            continue
        delta = {name: mine.get(name, 0.0) - theirs.get(name, 0.0) for name in set(mine) | set(theirs)}
        lines.append(f"{phase}: total kernel+copy time {sum(mine.values()):.1f} ms vs {sum(theirs.values()):.1f} ms")
        for name in sorted(delta, key=lambda n: -abs(delta[n]))[:top]:
            lines.append(f"  {delta[name]:+8.2f} ms ({mine.get(name, 0.0):7.2f} vs "
                         f"{theirs.get(name, 0.0):7.2f})  {name}")
    return "\n".join(lines)


def format_phase_timeline(timeline: dict) -> str:
    """One line per phase of :func:`phase_timeline`'s result."""
    lines = []
    for phase in ("forward", "backward"):
        if f"{phase}_span_ms" not in timeline:
            continue
        lines.append(
            f"{phase}: span {timeline[phase + '_span_ms']:.1f} ms = compute {timeline[phase + '_compute_ms']:.1f} + "
            f"exposed comm {timeline[phase + '_exposed_comm_ms']:.1f} + idle {timeline[phase + '_idle_ms']:.1f}; "
            f"all-gather {timeline[phase + '_allgather_ms']:.1f} ms ({timeline[phase + '_allgather_exposed_ms']:.1f} "
            f"exposed), reduce-scatter {timeline[phase + '_reducescatter_ms']:.1f} ms "
            f"({timeline[phase + '_reducescatter_exposed_ms']:.1f} exposed)")
    if "between_ms" in timeline:
        lines.append(f"forward end to backward start: {timeline['between_ms']:.1f} ms")
    return "\n".join(lines)
