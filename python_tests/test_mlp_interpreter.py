"""Runs mlp_interpreter_cases.py (the Triton dual GEMM of linear_jvp / mlp_jvp under Triton's CPU interpreter) in a
subprocess with TRITON_INTERPRET=1, so the flag, read when the kernels are defined, never reaches GPU tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_triton_dual_gemm_in_interpreter():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", FACM_EXT_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "mlp_interpreter_cases.py")],
        cwd=here.parent, env=env, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"interpreter cases failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
