"""benchmarks/profile_host_cpu.py --fsdp: the host-cost profile runs a model sharded with FSDP2 over a fake process
group through facm_ext.jvp (the chain's FSDP2 handler) and reports it beside the unsharded model."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform != "linux", reason="the fake process group run is exercised on Linux CI")
def test_profile_host_cpu_reports_the_fsdp2_rows():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_host_cpu.py"), "--models", "lightningdit",
                           "--fsdp", "--iters", "1", "--top", "0"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^\| (lightningdit[^|]*) \| ([0-9.]+) \|", proc.stdout, flags=re.MULTILINE)
    assert [name.strip() for name, _ in rows] == ["lightningdit", "lightningdit (FSDP2, fake 2 ranks)"], proc.stdout
    # The sharded model's JVP goes through the chain's handler: FSDP2's copy-in/out makes more Python calls.
    calls = [int(m) for m in re.findall(r"^\| lightningdit[^|]*\|(?:[^|]*\|){4} (\d+) \|", proc.stdout,
                                          flags=re.MULTILINE)]
    assert len(calls) == 2 and calls[1] > calls[0], proc.stdout


def test_copy_call_sites_names_where_a_jvp_copies(monkeypatch):
    """benchmarks/profile_overhead.py --copy-sites, on the CPU: a strided-to-contiguous copy in the model shows up
    with the model's frame, once for the primal and once for the tangent."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import profile_overhead

    import facm_ext

    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def model_forward(a):
        return linear(a).t().contiguous()

    def call():
        with torch.no_grad():
            facm_ext.jvp(model_forward, (x,), (torch.randn(4, 8),))

    sites = profile_overhead.copy_call_sites(call, 10, cuda=False)
    model_sites = [(count, frames) for count, frames in sites if any("model_forward" in f for f in frames)]
    assert sum(count for count, _ in model_sites) == 2, sites
