"""benchmarks/chain_2gpu.py --smoke: the 2-GPU Chain-JVP benchmark runs end to end on 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_chain_2gpu_smoke_reports_every_mode():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "benchmarks" / "chain_2gpu.py"), "--smoke",
               "--host-profile", "5"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for mode in ("tangent", "grad", "hybrid", r"plain fwd \(no JVP\)", r"plain fwd\+bwd \(no JVP\)"):
        rows = re.findall(rf"^\| {mode} \|.*$", out, flags=re.MULTILINE)
        assert rows, f"no {mode} row in:\n{out[-3000:]}"
        # the last column is the most blocks gathered at once: never more than 1 + prefetch (prefetch 1)
        assert all(int(row.rstrip(" |").rsplit("|", 1)[-1]) <= 2 for row in rows), rows
    for label in ("grad step", r"plain fwd\+bwd step \(FSDP2 alone\)"):
        assert re.search(rf"^{label} profile: all-gather kernels", out, flags=re.MULTILINE), out[-3000:]
    for where in ("2 GPUs, FSDP2", "1 GPU"):
        assert re.search(rf"^host issue of the JVP forward call, {where}: tangent mode [0-9.]+ ms, grad mode", out,
                         flags=re.MULTILINE), out[-3000:]
    assert "Ordered by: internal time" in out and "Ordered by: cumulative time" in out


def test_chain_2gpu_smoke_runs_only_the_selected_modes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(ROOT / "benchmarks" / "chain_2gpu.py"), "--smoke",
               "--models", "wan", "--modes", "tangent,grad,plain", "--pin-cpus", "--block-graphs"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\| (tangent|grad|hybrid|plain fwd \(no JVP\)|plain fwd\+bwd \(no JVP\)) \|", proc.stdout,
                      flags=re.MULTILINE)
    assert rows == ["tangent", "grad", "plain fwd (no JVP)"], proc.stdout[-3000:]
    assert "FSDP2 alone) profile" not in proc.stdout  # plain_grad was not selected
    # CPU tensors: block graphs never engage, and none failed.
    assert "each block replayed from CUDA graphs" in proc.stdout, proc.stdout[-3000:]
    assert "every capture succeeded" in proc.stdout, proc.stdout[-3000:]
    pinned = re.findall(r"^rank (\d): pinned to CPUs \[(.*)\]$", proc.stdout, flags=re.MULTILINE)
    assert sorted(rank for rank, _ in pinned) == ["0", "1"], proc.stdout[-3000:]
    cpus = [set(map(int, cpu_list.split(", "))) for _, cpu_list in pinned if cpu_list]
    if len(os.sched_getaffinity(0)) >= 2:  # with one CPU the second rank's share is empty
        assert len(cpus) == 2 and not cpus[0] & cpus[1], pinned


def test_chain_2gpu_rejects_unknown_modes():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chain_2gpu.py"), "--modes", "tangent,fast"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--modes: expected a non-empty subset" in proc.stderr, proc.stderr[-2000:]
