"""facm_ext.chain: the streamed Chain-JVP runtime.

Single-process tests (plain blocks, no FSDP) compare ChainJVP with ``torch.func.jvp`` of the whole chain in
float64 and check its argument errors. The FSDP2 tests launch ``python_tests/_chain_worker.py`` once under
``torch.distributed.run`` with 2 CPU processes (gloo; and again on 2 GPUs over NCCL where there are 2 GPUs) and
assert on what it measured: outputs, tangents and gradients against an unsharded single-process float64
reference (tiny LightningDiT and Wan models), the number of all-gathers per block and the most blocks gathered at
once. A worker that hangs fails its test after WORKER_TIMEOUT_S.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import REL_TOL, assert_rel_close

from facm_ext.chain import ChainJVP
from facm_ext.models import LightningDiT

WORKER = Path(__file__).with_name("_chain_worker.py")
WORKER_TIMEOUT_S = 300
F64 = REL_TOL[torch.float64]
LIGHTNINGDIT_DEPTH = 4
WAN_DEPTH = 3


# ------------------------------------------------------------------------------------------------ single process
def _tiny_lightningdit(depth: int = 3) -> LightningDiT:
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                         num_classes=10).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.2)
    return model


def _step(block, x, c, rope):
    return block(x, c, rope)


def _reference(model, x, tx, c, tc):
    def run(x_, c_):
        for block in model.blocks:
            x_ = block(x_, c_, model.feat_rope)
        return x_

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(run, (x, c), (tx, tc))


@pytest.fixture(params=["transform", "torch_func"])
def seam(request, monkeypatch):
    if request.param == "torch_func":
        monkeypatch.setenv("FACM_EXT_CHAIN_SEAM", "torch_func")
    else:
        monkeypatch.delenv("FACM_EXT_CHAIN_SEAM", raising=False)
    return request.param


@pytest.mark.parametrize("mode", ["grad", "tangent", "hybrid"])
def test_plain_chain_matches_torch_func_jvp(mode, seam):
    model = _tiny_lightningdit()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    tx, c, tc = torch.randn_like(x), torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    weight = torch.randn_like(x)

    ref_x, ref_c = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    ref_out, ref_tangent = _reference(reference, ref_x, tx, ref_c, tc)
    (ref_out * weight).sum().backward()

    track = mode != "tangent"
    in_x, in_c = x.clone().requires_grad_(track), c.clone().requires_grad_(track)
    chain = ChainJVP(model.blocks, step=_step, mode=mode, model=None)
    out, tangent = chain(in_x, tx, in_c, model.feat_rope, context_tangents=(tc, None))
    assert_rel_close(out, ref_out, torch.float64, what="out")
    assert_rel_close(tangent, ref_tangent, torch.float64, what="tangent")
    assert not tangent.requires_grad and tangent.grad_fn is None
    assert out.requires_grad == track
    if not track:
        return
    (out * weight).sum().backward()
    assert_rel_close(in_x.grad, ref_x.grad, torch.float64, what="grad x")
    assert_rel_close(in_c.grad, ref_c.grad, torch.float64, what="grad c")
    ref_params = dict(reference.blocks.named_parameters())
    for name, param in model.blocks.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert_rel_close(param.grad, ref_params[name].grad, torch.float64, what=f"grad {name}")


def test_plain_chain_pytree_carry_and_none_tangents():
    """A (tokens, scalar-per-sample) tuple carry; a None tangent leaf is a zero tangent; kwargs reach the step."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 6).double()

        def forward(self, carry, scale, *, shift):
            x, s = carry
            return torch.tanh(self.linear(x) * scale + shift) + s[:, None, None], s * 1.5

    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Block(), Block()])
    x, s = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    scale, shift = torch.randn(6, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    tx = torch.randn_like(x)

    def run(x_):
        carry = (x_, s)
        for block in blocks:
            carry = block(carry, scale, shift=shift)
        return carry

    ref_out, ref_tangent = torch.func.jvp(run, (x,), (tx,))
    out, tangent = ChainJVP(blocks, mode="tangent")((x, s), (tx, None), scale, shift=shift)
    assert_rel_close(out[0], ref_out[0], torch.float64, what="out x")
    assert_rel_close(out[1], ref_out[1], torch.float64, what="out s")
    assert_rel_close(tangent[0], ref_tangent[0], torch.float64, what="tangent x")
    assert torch.count_nonzero(tangent[1]) == 0  # s does not depend on x


def test_block_list_errors():
    model = _tiny_lightningdit(depth=2)
    blocks = list(model.blocks)
    with pytest.raises(ValueError, match=r"blocks: blocks\[2\] is the same module as blocks\[0\]"):
        ChainJVP(blocks + [blocks[0]])
    shared = nn.Module()
    shared.weight = blocks[0].attn.qkv.weight
    with pytest.raises(ValueError, match="also .* of blocks"):
        ChainJVP(blocks + [shared])
    with pytest.raises(ValueError, match=r"blocks: miss \d+ parameter\(s\) of model .*x_embedder"):
        ChainJVP(blocks, model=model)
    with pytest.raises(ValueError, match="not a parameter of model"):
        ChainJVP([blocks[0], nn.Linear(2, 2)], model=nn.ModuleList([blocks[0]]))
    with pytest.raises(ValueError, match="blocks: expected at least one"):
        ChainJVP([])
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected an nn.Module"):
        ChainJVP([blocks[0], "block"])
    with pytest.raises(ValueError, match="expected a sequence of nn.Module"):
        ChainJVP(blocks[0])
    with pytest.raises(ValueError, match="prefetch: expected an int >= 0"):
        ChainJVP(blocks, prefetch=-1)
    with pytest.raises(ValueError, match="mode: expected one of"):
        ChainJVP(blocks, mode="both")
    with pytest.raises(ValueError, match="root: expected the fully_shard root"):
        ChainJVP(blocks, root=model)
    # Covering the model exactly is accepted.
    everything = [model.x_embedder, model.t_embedder, model.y_embedder, *model.blocks, model.final_layer]
    ChainJVP(everything, model=model)


def test_call_errors():
    model = _tiny_lightningdit(depth=2)
    chain = ChainJVP(model.blocks, step=_step, mode="tangent")
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    c = torch.randn(2, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="carry_tangent: tangent structure"):
        chain(x, (x, x), c, model.feat_rope)
    with pytest.raises(ValueError, match=r"carry_tangent \(leaf 0\): tangent shape \(2, 16\)"):
        chain(x, x[:, :, 0], c, model.feat_rope)
    with pytest.raises(ValueError, match="context_tangents: expected 2 entries"):
        chain(x, x, c, model.feat_rope, context_tangents=(c,))
    with pytest.raises(ValueError, match=r"context_tangents\[1\]: context argument 1 is a VisionRotaryEmbedding2D"):
        chain(x, x, c, model.feat_rope, context_tangents=(None, c))
    with pytest.raises(ValueError, match=r"context_tangents\[0\]: tangent shape"):
        chain(x, x, c, model.feat_rope, context_tangents=(x, None))
    with pytest.raises(ValueError, match="expected a floating-point tangent"):
        chain(x, x.long(), c, model.feat_rope)
    bad = ChainJVP(model.blocks, step=lambda block, x_, c_, rope: (block(x_, c_, rope), x_), mode="tangent")
    with pytest.raises(ValueError, match="step: block 0 .* returned a carry of structure"):
        bad(x, x, c, model.feat_rope)


def test_suspended_fsdp_hooks_come_back_in_order():
    """While the chain runs a unit's forward, FSDP's forward hooks are off; afterwards they are back at their
    positions (FSDP's pre-hook first), other hooks untouched."""
    from types import SimpleNamespace

    from facm_ext.chain._units import Fsdp2Unit

    module = nn.Linear(2, 2)
    user_pre = module.register_forward_pre_hook(lambda m, a: None)
    fsdp_pre = module.register_forward_pre_hook(lambda m, a, k: None, prepend=True, with_kwargs=True)
    fsdp_post = module.register_forward_hook(lambda m, a, o: None)
    unit = Fsdp2Unit.__new__(Fsdp2Unit)
    unit.module = module
    unit.state = SimpleNamespace(_pre_forward_hook_handle=fsdp_pre, _post_forward_hook_handle=fsdp_post)
    before = (list(module._forward_pre_hooks), list(module._forward_pre_hooks_with_kwargs),
              list(module._forward_hooks))
    assert before[0] == [fsdp_pre.id, user_pre.id]
    with unit.hooks_suspended():
        assert list(module._forward_pre_hooks) == [user_pre.id]
        assert fsdp_pre.id not in module._forward_pre_hooks_with_kwargs and not module._forward_hooks
    assert (list(module._forward_pre_hooks), list(module._forward_pre_hooks_with_kwargs),
            list(module._forward_hooks)) == before


def test_transform_registers_the_fsdp2_handler_by_itself():
    """The unchanged call needs no import of facm_ext.chain: once FSDP2 is loaded, facm_ext.jvp's first call
    imports it, which registers the handler (checked in a fresh interpreter)."""
    code = (
        "import sys, torch\n"
        "import torch.distributed.fsdp\n"
        "import facm_ext\n"
        "assert 'facm_ext.chain' not in sys.modules\n"
        "facm_ext.jvp(lambda a: a.sin(), (torch.ones(2),), (torch.ones(2),))\n"
        "assert 'facm_ext.chain' in sys.modules, 'facm_ext.jvp did not import facm_ext.chain'\n"
        "from facm_ext.jvp import _modules\n"
        "from facm_ext.chain import fsdp2_module_call\n"
        "assert [h for _, h in _modules._HANDLERS].count(fsdp2_module_call) == 1, _modules._HANDLERS\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=WORKER.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------- 2 processes (gloo or NCCL)
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_dir: Path, scenarios: list[str], *, env_extra: dict | None = None) -> dict:
    """Run the worker under torch.distributed.run (2 processes) and return its JSON; a hang fails the test."""
    out_path = tmp_dir / "chain_results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("FACM_EXT_CHAIN_SEAM", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(out_path), *scenarios]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                              cwd=WORKER.parent.parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chain worker did not finish within {WORKER_TIMEOUT_S} s (hang?):\n{(exc.stderr or '')[-4000:]}")
    if proc.returncode != 0 or not out_path.exists():
        pytest.fail(f"chain worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


FSDP2_SCENARIOS = ["lightningdit_chain", "lightningdit_chain_torch_func", "wan_chain", "mixed_precision",
                   "exception_safety", "errors", "lightningdit_transform", "wan_transform",
                   "transform_mixed_precision", "facm_step"]


@pytest.fixture(scope="module", params=["gloo", "nccl"])
def dist_results(request, tmp_path_factory):
    """The worker's results: 2 CPU processes over gloo (CI), or 2 GPUs over NCCL (real all-gather streams and
    prefetch overlap; the ops forced to their reference path so the float64 comparison stays exact)."""
    tmp_dir = tmp_path_factory.mktemp(f"chain_{request.param}")
    if request.param == "gloo":
        if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
            pytest.skip("torch.distributed with gloo is not available")
        # The CPU configuration (CI's): FSDP2's default mesh would pick up a visible GPU and move the sharded
        # model there while the float64 reference stays on the CPU.
        return run_worker(tmp_dir, FSDP2_SCENARIOS, env_extra={"CUDA_VISIBLE_DEVICES": ""})
    if torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available():
        pytest.skip("needs 2 GPUs with NCCL")
    return run_worker(tmp_dir, FSDP2_SCENARIOS + ["fsdp1"],
                      env_extra={"FACM_CHAIN_WORKER_BACKEND": "nccl", "FACM_EXT_BACKEND": "reference",
                                 "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})


def ranks(results: dict, scenario: str) -> list[dict]:
    assert results["_torch"] == torch.__version__, "the worker ran another torch than the test"
    if scenario not in results:
        pytest.skip(f"{scenario} runs only in the NCCL (2-GPU) worker")
    per_rank = results[scenario]
    assert set(per_rank) == {"0", "1"}, f"{scenario}: results from ranks {sorted(per_rank)}"
    for rank, result in per_rank.items():
        if "error" in result:
            pytest.fail(f"{scenario} raised on rank {rank}:\n{result['error']}")
        if "skip" in result:
            pytest.skip(f"{scenario}: {result['skip']}")
    return list(per_rank.values())


def check_case(case: dict, *, depth: int, prefetch: int, mode: str, tol: float = F64):
    assert case["out_err"] <= tol, case
    assert case["tangent_err"] <= tol, case
    assert case["tangent_has_graph"] is False
    assert case["out_requires_grad"] == (mode != "tangent")
    assert case["resharded_after_forward"] is True
    # Each block gathered once for the JVP (hybrid: once more for its ordinary forward with grad).
    assert case["forward_gathers"] == [2 if mode == "hybrid" else 1] * depth, case["forward_gathers"]
    if mode == "hybrid":
        assert case["forward_max_gathered"] <= 1 + prefetch
    else:
        # Exactly 1 + prefetch: the bound holds and the prefetch really runs ahead.
        assert case["forward_max_gathered"] == min(1 + prefetch, depth), case["forward_max_gathered"]
    if mode == "tangent":
        return
    assert case["grads_missing"] == [], case["grads_missing"]
    assert case["grads_compared"] > 0
    assert case["grad_err"] <= tol, case
    assert case["input_grad_err"] <= tol, case
    assert case["backward_gathers"] == [1] * depth, case["backward_gathers"]
    assert case["resharded_after_backward"] is True


LIGHTNINGDIT_CASES = [("grad", 0), ("grad", 1), ("grad", 2), ("tangent", 1), ("hybrid", 1)]


@pytest.mark.parametrize("scenario", ["lightningdit_chain", "lightningdit_chain_torch_func"])
@pytest.mark.parametrize("mode,prefetch", LIGHTNINGDIT_CASES)
def test_fsdp2_chain_lightningdit(dist_results, scenario, mode, prefetch):
    for result in ranks(dist_results, scenario):
        check_case(result[f"{mode}_prefetch{prefetch}"], depth=LIGHTNINGDIT_DEPTH, prefetch=prefetch, mode=mode)


@pytest.mark.parametrize("mode", ["grad", "tangent"])
def test_fsdp2_chain_wan(dist_results, mode):
    for result in ranks(dist_results, "wan_chain"):
        check_case(result[f"{mode}_prefetch1"], depth=WAN_DEPTH, prefetch=1, mode=mode)


def test_fsdp2_chain_mixed_precision(dist_results):
    """param_dtype=float32 on a float64 model: blocks compute with fp32 gathered parameters on fp32 inputs."""
    for result in ranks(dist_results, "mixed_precision"):
        case = result["grad_prefetch1"]
        assert case["param_dtypes_in_step"] == ["torch.float32"]
        assert case["out_dtype"] == "torch.float32" and case["tangent_dtype"] == "torch.float32"
        check_case(case, depth=LIGHTNINGDIT_DEPTH, prefetch=1, mode="grad", tol=REL_TOL[torch.float32] * 5)


def test_transform_mixed_precision(dist_results):
    """The unchanged call honours FSDP's MixedPrecisionPolicy: blocks see fp32 parameters and fp32 inputs, the
    root's output_dtype=float64 casts the output and its tangent. Outputs and tangents are within fp32 accuracy
    of the float64 reference; gradients equal (to fp32 accuracy) those of the unsharded model run in fp32 through
    the same transform (against float64, fp32 gradients of norm weights, sums of many cancelling terms, differ
    by ~1e-4 whatever computes them)."""
    for result in ranks(dist_results, "transform_mixed_precision"):
        assert result["block_dtypes"] == ["input torch.float32", "torch.float32"], result
        assert result["out_dtype"] == "torch.float64" and result["tangent_dtype"] == "torch.float64", result
        tol = REL_TOL[torch.float32] * 5
        assert result["out_err"] <= tol and result["tangent_err"] <= tol, result
        assert result["grads_missing"] == [] and result["grads_compared"] > 0, result
        assert result["grad_err"] <= tol, result


@pytest.mark.parametrize("scenario,depth", [("lightningdit_transform", LIGHTNINGDIT_DEPTH),
                                            ("wan_transform", WAN_DEPTH)])
def test_transform_streams_fsdp2_model(dist_results, scenario, depth):
    """facm_ext.jvp(model, ...) on the whole fully_shard model, unchanged call: exact outputs, tangents and every
    parameter's gradient; one all-gather per block each way; the second call prefetches one block ahead."""
    for result in ranks(dist_results, scenario):
        for attempt, max_gathered in (("first", 1), ("second", 2)):
            case = result[attempt]
            assert case["out_err"] <= F64 and case["tangent_err"] <= F64, case
            assert case["grads_missing"] == [] and case["grads_compared"] > 0, case
            assert case["grad_err"] <= F64, case
            assert case["tangent_has_graph"] is False
            assert case["forward_gathers"] == [1] * depth and case["backward_gathers"] == [1] * depth, case
            assert case["forward_max_gathered"] == max_gathered, case
            assert case["resharded_after_forward"] is True
        assert result["raised"] is True and result["resharded_after_error"] is True, result
        after = result["after_error"]
        assert after["out_err"] <= F64 and after["tangent_err"] <= F64 and after["grad_err"] <= F64, after
        assert after["grads_missing"] == [] and after["gathers"] == [2] * depth, after
        no_grad = result["no_grad"]
        assert no_grad["out_err"] <= F64 and no_grad["tangent_err"] <= F64
        assert no_grad["out_requires_grad"] is False and no_grad["resharded_after_forward"] is True


def test_facm_step_on_fsdp2(dist_results):
    """FACM's step: facm_ext.jvp with grad plus an ordinary forward of the same sharded model, one backward through
    both (the loss also uses the detached tangent): outputs and every gradient equal the unsharded reference."""
    for result in ranks(dist_results, "facm_step"):
        for attempt in ("first", "second"):
            case = result[attempt]
            assert max(case["out_err"], case["tangent_err"], case["fm_err"], case["grad_err"]) <= F64, case
            assert case["grads_missing"] == [] and case["grads_compared"] > 0, case
            # JVP pass and FM forward gather each block once each; FSDP's backward gathers it once per use.
            assert case["gathers"] == [4] * LIGHTNINGDIT_DEPTH, case
            assert case["resharded"] is True


def test_fsdp2_exception_leaves_blocks_resharded(dist_results):
    """A step raising in block 2 (with blocks 3 prefetched) on every rank: all blocks resharded, no hang, and the
    next call is exact with one all-gather per block in backward (no stale prefetch order)."""
    for result in ranks(dist_results, "exception_safety"):
        assert result["raised"] is True
        assert result["resharded_after_error"] is True
        check_case(result["after"], depth=LIGHTNINGDIT_DEPTH, prefetch=1, mode="grad")


def test_fsdp2_errors(dist_results):
    for result in ranks(dist_results, "errors"):
        assert "is not an FSDP unit" in result["not_units"], result["not_units"]
        assert result["tangent_structure"].startswith("carry_tangent: tangent structure"), result
        assert result["resharded_after_error"] is True


def test_fsdp1_units(dist_results):
    """FSDP1 units (GPU only: FSDP1 refuses CPU-only processes): tangent mode and hybrid, exact."""
    for result in ranks(dist_results, "fsdp1"):
        for mode in ("tangent", "hybrid"):
            case = result[mode]
            assert case["out_err"] <= F64 and case["tangent_err"] <= F64, case
            assert case["tangent_has_graph"] is False
            assert case["out_requires_grad"] == (mode == "hybrid")
        hybrid = result["hybrid"]
        assert hybrid["grads_missing"] == [] and hybrid["grad_err"] <= F64 and hybrid["input_grad_err"] <= F64
