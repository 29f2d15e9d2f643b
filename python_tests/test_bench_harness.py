"""The benchmark harness's bookkeeping (CPU): rows, ratios, failures recorded as results, JSON written per row."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _harness  # noqa: E402


@pytest.fixture
def harness(monkeypatch, tmp_path):
    monkeypatch.setattr(_harness, "RESULTS", [])
    monkeypatch.setattr(_harness, "median_ms", lambda fn, **kw: 2.0)
    monkeypatch.setattr(_harness, "peak_extra_memory_gib", lambda fn: 0.5)
    monkeypatch.setattr(_harness, "copy_bandwidth_gbs", lambda: 1000.0)
    monkeypatch.setattr(_harness, "matmul_tflops", lambda: 100.0)
    monkeypatch.setenv("FACM_EXT_BENCH_JSON", str(tmp_path / "bench.json"))
    return tmp_path / "bench.json"


def test_record_alternatives_times_baselines_and_records_failures(harness):
    calls = []

    def failing():
        raise RuntimeError("out of memory\nsecond line")

    _harness.record_alternatives("g", "case", {"fast": lambda: calls.append(1), "broken": failing}, 1.0,
                                 ours_label="ours", bytes_moved=4e9)
    fast, broken = _harness.RESULTS
    assert calls == [1]
    assert fast["impl"] == "fast" and fast["ms"] == 2.0 and fast["note"] == "ours 2.00x faster"
    assert fast["GB/s"] == pytest.approx(2000.0) and fast["%copy"] == pytest.approx(200.0)
    assert fast["peak_gib"] == 0.5
    assert broken["impl"] == "broken" and math.isnan(broken["ms"])
    assert broken["note"] == "failed: RuntimeError: out of memory"
    rows = json.loads(harness.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["fast", "broken"]


def test_flops_rows_report_tflops(harness):
    row = _harness.record("g", "case", "ours", 10.0, flops=5e11)
    assert row["TFLOP/s"] == pytest.approx(50.0) and row["%mm"] == pytest.approx(50.0)
    assert "| ours |" in _harness.format_table(_harness.RESULTS)


def test_event_median_ms_runs_a_fixed_count_and_takes_the_median(monkeypatch):
    monkeypatch.setattr(_harness.torch.cuda, "is_available", lambda: False)  # host timing (this path on the CPU)
    clock = iter([0.0, 0.003, 1.0, 1.001, 2.0, 2.010])  # three calls of 3, 1 and 10 ms
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    calls = []
    assert _harness.event_median_ms(lambda: calls.append(1), iters=3) == pytest.approx(3.0)
    assert len(calls) == 3


def test_nccl_kernel_overlap_of_a_trace(tmp_path):
    """Compute kernels [0, 10) and [20, 30) us; an all-gather [5, 25) is half covered, a reduce-scatter [40, 50) not."""
    def kernel(name, ts, dur):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        kernel("gemm", 0, 10), kernel("elementwise", 20, 10), kernel("gemm", 22, 3),
        kernel("ncclDevKernel_AllGather_RING", 5, 20), kernel("ncclDevKernel_ReduceScatter_RING", 40, 10),
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
    ]}))
    overlap = _harness.nccl_kernel_overlap(str(trace))
    assert overlap["compute_kernel_ms"] == pytest.approx(0.020)
    assert overlap["allgather_kernel_ms"] == pytest.approx(0.020) and overlap["allgather_kernels"] == 1
    assert overlap["allgather_overlap"] == pytest.approx(0.5)
    assert overlap["reducescatter_kernel_ms"] == pytest.approx(0.010) and overlap["reducescatter_overlap"] == 0.0


def test_phase_timeline_splits_forward_and_backward_by_launching_thread(tmp_path):
    """Forward (thread 1): compute [0, 10), all-gather [8, 14) (4 us exposed), compute [16, 20) (2 us idle before).
    Backward (thread 2): compute [30, 40), reduce-scatter [38, 45) (5 us exposed), compute [50, 60) (5 us idle)."""
    events = []

    def kernel(name, ts, dur, thread):
        correlation = len(events)
        events.append({"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts - 1, "dur": 1, "tid": thread,
                       "args": {"correlation": correlation}})
        events.append({"cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7,
                       "args": {"correlation": correlation}})

    kernel("gemm", 0, 10, 1)
    kernel("ncclDevKernel_AllGather_RING", 8, 6, 1)
    kernel("layer_norm", 16, 4, 1)
    kernel("gemm_backward", 30, 10, 2)
    kernel("ncclDevKernel_ReduceScatter_RING", 38, 7, 2)
    kernel("gemm_backward", 50, 10, 2)
    events.append({"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 60, "dur": 1, "tid": 2,
                   "args": {"correlation": 99}})
    events.append({"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 61, "dur": 3, "tid": 7,
                   "args": {"correlation": 99}})
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    timeline = _harness.phase_timeline(str(trace))
    approx = pytest.approx
    assert timeline["forward_span_ms"] == approx(0.020) and timeline["forward_compute_ms"] == approx(0.014)
    assert timeline["forward_exposed_comm_ms"] == approx(0.004) and timeline["forward_idle_ms"] == approx(0.002)
    assert timeline["forward_allgather_ms"] == approx(0.006)
    assert timeline["forward_allgather_exposed_ms"] == approx(0.004)
    assert timeline["backward_span_ms"] == approx(0.030) and timeline["backward_compute_ms"] == approx(0.020)
    assert timeline["backward_exposed_comm_ms"] == approx(0.005) and timeline["backward_idle_ms"] == approx(0.005)
    assert timeline["backward_reducescatter_exposed_ms"] == approx(0.005)
    assert timeline["backward_allgather_ms"] == 0.0
    assert timeline["between_ms"] == approx(0.010)
    assert "forward: span 0.0 ms" in _harness.format_phase_timeline(timeline)
    # Per-kernel totals per phase (copies are not kernels: they count there, not in the spans above).
    assert timeline["forward_kernels"] == approx({"gemm": 0.010, "ncclDevKernel_AllGather_RING": 0.006,
                                                  "layer_norm": 0.004})
    assert timeline["backward_kernels"] == approx({"gemm_backward": 0.020, "ncclDevKernel_ReduceScatter_RING": 0.007,
                                                   "[memcpy Memcpy DtoD (Device -> Device)]": 0.003})
    reference = {"forward_kernels": {"gemm": 0.002, "layer_norm": 0.004}, "backward_kernels": {"gemm_backward": 0.020}}
    lines = _harness.kernel_differences(timeline, reference, top=2).splitlines()
    assert lines[0].startswith("forward: total kernel+copy time 0.0 ms")
    assert lines[1].split() == ["+0.01", "ms", "(", "0.01", "vs", "0.00)", "gemm"]  # the largest difference first
    assert lines[2].endswith("ncclDevKernel_AllGather_RING") and lines[3].startswith("backward:")
