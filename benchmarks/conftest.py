"""Prints the session's benchmark table last (and writes it to $FACM_EXT_BENCH_JSON when set)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _harness.RESULTS:
        return
    import torch

    terminalreporter.section("facm_ext benchmark summary")
    if torch.cuda.is_available():
        terminalreporter.write_line(
            f"{_harness.device_name()}, torch {torch.__version__}: measured copy bandwidth "
            f"{_harness.copy_bandwidth_gbs():.0f} GB/s, bf16 matmul {_harness.matmul_tflops():.0f} TFLOP/s")
    terminalreporter.write_line(_harness.format_table(_harness.RESULTS))
    path = _harness.write_results()
    if path:
        terminalreporter.write_line(f"written to {path}")
