"""benchmarks/wan14b_chain.py: its --smoke run (2 CPU processes, gloo, tiny Wan) and its own checks.

The smoke run checks numbers, not only code paths: output, tangent and gradients of the FSDP2-sharded Chain-JVP
(with and without the script's per-block checkpointing, which saves block inputs aside and recomputes in backward)
against an unsharded single-process reference, one all-gather per block in forward and in backward, at most
1 + prefetch blocks gathered in forward, and the OOM fallback of the token search (a simulated OOM first).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "wan14b_chain.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_script_module():
    """The script as a module, without letting its environment defaults (NCCL, allocator settings for the run it
    was written for) leak into this test session."""
    import importlib.util

    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("wan14b_chain", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan14b") / "wan14b.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(SCRIPT), "--smoke", "--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_smoke_run_passes(smoke):
    proc, results = smoke
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert results is not None
    assert "| tokens per GPU (one sample) | 32" in proc.stdout
    assert "whole-model torch.func.jvp" in proc.stdout


def test_smoke_numbers_against_unsharded_reference(smoke):
    _, results = smoke
    ref = results["verify"]["vs_unsharded_reference"]
    for key in ("chain_out_rel_err", "chain_tangent_rel_err", "chain_grad_rel_err", "checkpoint_out_rel_err",
                "checkpoint_tangent_rel_err", "checkpoint_grad_rel_err"):
        assert ref[key] < 1e-4, (key, ref[key])
    assert ref["chain_grads_missing"] == [] and ref["checkpoint_grads_missing"] == []
    verify = results["verify"]
    assert verify["recomputes_per_step"] == verify["blocks"] == 3
    assert verify["offload"] is True  # the host-copy path of the saved inputs ran


def test_smoke_search_and_gathers(smoke):
    _, results = smoke
    outcomes = [(a["tokens"], a["outcome"].split(":")[0]) for a in results["attempts"]]
    assert outcomes == [(48, "failed"), (32, "fits")]
    m = results["measurement"]
    assert m["tokens"] == 32 and m["grid"] == [2, 4, 4]
    assert m["forward_gathers"] == [1] and m["backward_gathers"] == [1]
    assert 1 <= m["forward_max_gathered"] <= 1 + results["prefetch"]
    assert m["timed_steps"] >= 1 and m["step_ms"] > 0
    assert "torch_func_jvp" in results


def test_smoke_checks_catch_failures():
    """The exit status of --smoke comes from smoke_failures: each kind of wrong result must be reported."""
    module = _load_script_module()
    good = dict(
        prefetch=1,
        verify=dict(grad_rel_err=1e-7, params_with_one_sided_grad=0, recomputes_per_step=3, blocks=3,
                    vs_unsharded_reference=dict(chain_out_rel_err=1e-7, chain_tangent_rel_err=1e-7,
                                                chain_grad_rel_err=1e-6, checkpoint_out_rel_err=1e-7,
                                                checkpoint_tangent_rel_err=1e-7, checkpoint_grad_rel_err=1e-6,
                                                chain_grads_missing=[], checkpoint_grads_missing=[])),
        attempts=[dict(tokens=48, outcome="failed: OOM"), dict(tokens=32, outcome="fits")],
        measurement=dict(forward_gathers=[1], backward_gathers=[1], forward_max_gathered=2, finite=True),
    )
    assert module.smoke_failures(good) == []
    bad_cases = [
        ("verify", "vs_unsharded_reference", "checkpoint_grad_rel_err", 0.3),
        ("verify", "vs_unsharded_reference", "chain_tangent_rel_err", float("nan")),
        ("verify", "vs_unsharded_reference", "checkpoint_grads_missing", ["blocks.0.block.ffn.0.weight"]),
        ("verify", None, "recomputes_per_step", 0),
        ("verify", None, "grad_rel_err", 0.1),
        ("measurement", None, "backward_gathers", [1, 2]),
        ("measurement", None, "forward_max_gathered", 3),
        ("measurement", None, "finite", False),
    ]
    for section, sub, key, value in bad_cases:
        bad = json.loads(json.dumps(good))
        target = bad[section] if sub is None else bad[section][sub]
        target[key] = value
        assert module.smoke_failures(bad), (section, sub, key, value)
    bad = json.loads(json.dumps(good))
    bad["attempts"] = [dict(tokens=48, outcome="fits")]
    assert module.smoke_failures(bad)


def test_grid_for_token_counts():
    module = _load_script_module()
    assert module.grid_for(32760) == (21, 30, 52)  # 480x832, 81 frames
    assert module.grid_for(16384) == (16, 32, 32)
    assert module.grid_for(2048) == (2, 32, 32)
    assert module.grid_for(48) == (3, 4, 4)
    assert module.grid_for(7) == (7, 1, 1)
