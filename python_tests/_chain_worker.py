"""Multi-process worker for python_tests/test_chain.py (CPU, gloo): run it under ``torch.distributed.run``.

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT python_tests/_chain_worker.py OUT.json

Every rank builds the same float64 models from the same seed, keeps an unsharded copy as the single-process
reference (``torch.func.jvp`` of the whole chain of blocks, math SDPA), shards the other copy with FSDP2
``fully_shard`` per block plus the root, runs the scenario and measures relative errors of outputs, tangents and
gradients against the reference, FSDP all-gather counts and the most blocks gathered at once. Rank 0 writes
``{scenario: {rank: result}}`` as JSON; a scenario that raised records its traceback under "error".
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facm_ext.chain import ChainJVP, GatherMonitor  # noqa: E402
from facm_ext.models import LightningDiT, wan_small  # noqa: E402
from facm_ext._teardown import exit_without_teardown  # noqa: E402

BATCH = 2
# cuda:LOCAL_RANK under FACM_CHAIN_WORKER_BACKEND=nccl (2 GPUs), else the CPU (gloo).
DEVICE = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- helpers
def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    grad = param.grad
    if grad is None:
        return None
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def grad_report(sharded: nn.Module, reference: nn.Module) -> dict:
    """Largest relative gradient error over parameters (and which), and parameters whose gradient is missing."""
    worst, worst_name, missing, count = 0.0, "", [], 0
    ref_params = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        ref_grad = ref_params[name].grad
        grad = full_grad(param)
        if ref_grad is None:
            continue
        count += 1
        if grad is None:
            missing.append(name)
            continue
        err = rel(grad, ref_grad)
        if err > worst:
            worst, worst_name = err, name
    return {"grad_err": worst, "grad_err_param": worst_name, "grads_missing": missing, "grads_compared": count}


def randomize(model: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Random values everywhere (the official zero inits would make most gradients trivially zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def shard(model: nn.Module, *, mp_policy=None, root_mp_policy=None, root: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    if root:
        fully_shard(model, **({} if root_mp_policy is None else {"mp_policy": root_mp_policy}) or kwargs)
    return model


def all_blocks_resharded(blocks) -> bool:
    from facm_ext.chain._units import Fsdp2Unit

    for block in blocks:
        for group in Fsdp2Unit(block).groups:
            if not group.is_sharded or getattr(group, "_all_gather_result", None) is not None:
                return False
    return True


def tiny_lightningdit(depth: int = 4) -> LightningDiT:
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                         num_classes=10).double()
    randomize(model, 1)
    return model.to(DEVICE)


def tiny_wan(layers: int = 3):
    torch.manual_seed(0)
    model = wan_small(num_layers=layers).double()
    randomize(model, 2, scale=0.1)
    return model.to(DEVICE)


def reference_chain(blocks, step, carry, carry_tangent, context, context_tangents, kwargs):
    """torch.func.jvp of the whole unsharded chain at once (float64, math SDPA)."""
    live = [i for i, t in enumerate(context_tangents) if t is not None]

    def run(carry_value, *live_context):
        full = list(context)
        for i, value in zip(live, live_context):
            full[i] = value
        for block in blocks:
            carry_value = step(block, carry_value, *full, **kwargs)
        return carry_value

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(run, (carry, *[context[i] for i in live]),
                              (carry_tangent, *[context_tangents[i] for i in live]))


def lightningdit_step(block, x, c, rope):
    return block(x, c, rope)


def wan_step(block, x, e, context, rope_cos, rope_sin, seq_lens=None, context_lens=None):
    return block(x, e, seq_lens, rope_cos, rope_sin, context, context_lens)


# -------------------------------------------------------------------------------------- chain scenario driver
def _with_leaves(context, context_tangents, leaves) -> list:
    """``context`` with each entry that has a tangent replaced by the next of ``leaves`` (in order)."""
    leaves, result = iter(leaves), list(context)
    for i, t in enumerate(context_tangents):
        if t is not None:
            result[i] = next(leaves)
    return result


def run_chain_case(model, reference, step, carry, carry_tangent, context, context_tangents, kwargs, *, prefetch,
                   mode, grad_seed=5, raise_at=None):
    """One ChainJVP call on the sharded model vs the reference; returns errors and gather statistics."""
    generator = torch.Generator().manual_seed(grad_seed)
    leaf_inputs = [carry] + [c for c, t in zip(context, context_tangents) if t is not None]

    ref_inputs = [x.detach().clone().requires_grad_(True) for x in leaf_inputs]
    ref_context = _with_leaves(context, context_tangents, ref_inputs[1:])
    reference.zero_grad(set_to_none=True)
    ref_out, ref_tangent = reference_chain(reference.blocks, step, ref_inputs[0], carry_tangent, ref_context,
                                           context_tangents, kwargs)
    weight = torch.randn(ref_out.shape, generator=generator, dtype=ref_out.dtype).to(DEVICE)
    (ref_out * weight).sum().backward()

    inputs = [x.detach().clone().requires_grad_(mode != "tangent") for x in leaf_inputs]
    chain_context = _with_leaves(context, context_tangents, inputs[1:])
    model.zero_grad(set_to_none=True)
    seen_dtypes = set()

    def recording_step(block, *args, **kw):
        index = list(model.blocks).index(block)
        if raise_at is not None and index == raise_at:
            raise RuntimeError(f"planned failure in block {index}")
        seen_dtypes.update(str(p.dtype) for p in block.parameters())
        return step(block, *args, **kw)

    chain = ChainJVP(model.blocks, step=recording_step, prefetch=prefetch, mode=mode, root=model)
    result = {}
    with GatherMonitor(model.blocks) as forward_monitor:
        out, tangent = chain(inputs[0], carry_tangent, *chain_context, context_tangents=context_tangents, **kwargs)
    result.update(out_err=rel(out, ref_out), tangent_err=rel(tangent, ref_tangent),
                  out_dtype=str(out.dtype), tangent_dtype=str(tangent.dtype),
                  tangent_has_graph=tangent.requires_grad or tangent.grad_fn is not None,
                  out_requires_grad=out.requires_grad, param_dtypes_in_step=sorted(seen_dtypes),
                  forward_gathers=[forward_monitor.gathers[b] for b in model.blocks],
                  forward_max_gathered=forward_monitor.max_gathered,
                  resharded_after_forward=all_blocks_resharded(model.blocks))
    if mode != "tangent":
        with GatherMonitor(model.blocks) as backward_monitor:
            (out * weight.to(out.dtype)).sum().backward()
        result.update(grad_report(model, reference))
        result["backward_gathers"] = [backward_monitor.gathers[b] for b in model.blocks]
        result["input_grad_err"] = max(rel(x.grad, r.grad) for x, r in zip(inputs, ref_inputs))
        result["resharded_after_backward"] = all_blocks_resharded(model.blocks)
    return result


def lightningdit_chain_inputs(model):
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(BATCH, 16, 32, generator=generator, dtype=torch.float64).to(DEVICE)
    c = torch.randn(BATCH, 32, generator=generator, dtype=torch.float64).to(DEVICE)
    return tokens, torch.randn_like(tokens), (c, model.feat_rope), (torch.randn_like(c), None), {}


def wan_chain_inputs(reference):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(BATCH, 4, 2, 4, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    t = torch.rand(BATCH, generator=generator, dtype=torch.float64).to(DEVICE)
    context = torch.randn(BATCH, 8, 32, generator=generator, dtype=torch.float64).to(DEVICE)
    with torch.no_grad():
        tokens, _, kw = reference.prepare(x, t, context, seq_len=10,
                                          context_lens=torch.tensor([8, 5], device=DEVICE))
    e = kw["e"]
    positional = (e, kw["context"], kw["rope_cos"], kw["rope_sin"])
    tangents = (torch.randn_like(e), None, None, None)
    return tokens, torch.randn_like(tokens), positional, tangents, {"seq_lens": kw["seq_lens"],
                                                                    "context_lens": kw["context_lens"]}


# ------------------------------------------------------------------------------------------------- scenarios
def scenario_lightningdit_chain():
    results = {}
    for prefetch, mode in ((0, "grad"), (1, "grad"), (2, "grad"), (1, "tangent"), (1, "hybrid")):
        model = tiny_lightningdit()
        reference = copy.deepcopy(model)
        shard(model)
        carry, carry_tangent, context, context_tangents, kwargs = lightningdit_chain_inputs(model)
        case = run_chain_case(model, reference, lightningdit_step, carry, carry_tangent, context, context_tangents,
                              kwargs, prefetch=prefetch, mode=mode)
        results[f"{mode}_prefetch{prefetch}"] = case
    return results


def scenario_wan_chain():
    results = {}
    for prefetch, mode in ((1, "grad"), (1, "tangent")):
        model = tiny_wan()
        reference = copy.deepcopy(model)
        shard(model)
        carry, carry_tangent, context, context_tangents, kwargs = wan_chain_inputs(reference)
        results[f"{mode}_prefetch{prefetch}"] = run_chain_case(model, reference, wan_step, carry, carry_tangent,
                                                               context, context_tangents, kwargs,
                                                               prefetch=prefetch, mode=mode)
    return results


def scenario_mixed_precision():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = tiny_lightningdit()
    reference = copy.deepcopy(model)
    model.feat_rope.float()  # buffers are not cast by FSDP; float64 RoPE tables would promote q and k
    shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    carry, carry_tangent, context, context_tangents, kwargs = lightningdit_chain_inputs(model)
    return {"grad_prefetch1": run_chain_case(model, reference, lightningdit_step, carry, carry_tangent, context,
                                             context_tangents, kwargs, prefetch=1, mode="grad")}


def scenario_exception_safety():
    model = tiny_lightningdit()
    reference = copy.deepcopy(model)
    shard(model)
    carry, carry_tangent, context, context_tangents, kwargs = lightningdit_chain_inputs(model)
    result = {}
    try:
        run_chain_case(model, reference, lightningdit_step, carry, carry_tangent, context, context_tangents, kwargs,
                       prefetch=2, mode="grad", raise_at=2)
        result["raised"] = False
    except RuntimeError as exc:
        result["raised"] = "planned failure" in str(exc)
    result["resharded_after_error"] = all_blocks_resharded(model.blocks)
    # The same chain must work afterwards (no stale FSDP state, no collective left unmatched).
    result["after"] = run_chain_case(model, reference, lightningdit_step, carry, carry_tangent, context,
                                     context_tangents, kwargs, prefetch=1, mode="grad")
    return result


def scenario_errors():
    from torch.distributed.fsdp import fully_shard

    result = {}
    model = tiny_lightningdit(depth=2)
    fully_shard(model)  # root only: the blocks' parameters are sharded, but the blocks are not units
    try:
        ChainJVP(model.blocks)
        result["not_units"] = "no error"
    except ValueError as exc:
        result["not_units"] = str(exc)
    model = tiny_lightningdit(depth=2)
    shard(model)
    carry, carry_tangent, context, context_tangents, kwargs = lightningdit_chain_inputs(model)
    chain = ChainJVP(model.blocks, step=lightningdit_step, root=model)
    try:
        chain((carry, carry), (carry_tangent,), *context, context_tangents=context_tangents)
        result["tangent_structure"] = "no error"
    except ValueError as exc:
        result["tangent_structure"] = str(exc)
    result["resharded_after_error"] = all_blocks_resharded(model.blocks)
    return result


def scenario_transform(kind: str):
    """facm_ext.jvp(model, ...) on the whole sharded model: the FSDP2 module-call handler streams the blocks."""
    try:
        import facm_ext.jvp as transform
    except ImportError as exc:
        return {"skip": f"facm_ext.jvp is not importable ({exc})"}
    if not callable(getattr(transform, "jvp", None)) or not hasattr(transform, "register_module_call_handler"):
        return {"skip": "facm_ext.jvp has no jvp/register_module_call_handler yet"}
    from facm_ext.chain import _handler

    generator = torch.Generator().manual_seed(6)
    if kind == "lightningdit":
        model = tiny_lightningdit()
        x = torch.randn(BATCH, 4, 4, 4, generator=generator, dtype=torch.float64).to(DEVICE)
        y = torch.tensor([1, 10], device=DEVICE)

        def make_fn(net):
            return lambda x_, t_: net(x_, t_, y)
    else:
        model = tiny_wan()
        x = torch.randn(BATCH, 4, 2, 4, 4, generator=generator, dtype=torch.float64).to(DEVICE)
        context = torch.randn(BATCH, 8, 32, generator=generator, dtype=torch.float64).to(DEVICE)
        context_lens = torch.tensor([8, 5], device=DEVICE)

        def make_fn(net):
            return lambda x_, t_: net(x_, t_, context, seq_len=10, context_lens=context_lens)
    t = torch.rand(BATCH, generator=generator, dtype=torch.float64).to(DEVICE)
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    reference = copy.deepcopy(model)
    shard(model)
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_tangent = torch.func.jvp(make_fn(reference), (x, t), (v, torch.ones_like(t)))
    weight = torch.randn(ref_out.shape, generator=generator, dtype=ref_out.dtype).to(DEVICE)
    (ref_out * weight).sum().backward()
    _handler.register_with_transform()
    _handler.set_prefetch(1)
    results = {}
    for attempt in ("first", "second"):  # the first pass records the unit order, the second prefetches with it
        model.zero_grad(set_to_none=True)
        with GatherMonitor(model.blocks) as forward_monitor:
            out, tangent = transform.jvp(make_fn(model), (x, t), (v, torch.ones_like(t)))
        case = dict(out_err=rel(out, ref_out), tangent_err=rel(tangent, ref_tangent),
                    forward_gathers=[forward_monitor.gathers[b] for b in model.blocks],
                    forward_max_gathered=forward_monitor.max_gathered,
                    resharded_after_forward=all_blocks_resharded(model.blocks),
                    tangent_has_graph=tangent.requires_grad)
        with GatherMonitor(model.blocks) as backward_monitor:
            (out * weight).sum().backward()
        case.update(grad_report(model, reference))
        case["backward_gathers"] = [backward_monitor.gathers[b] for b in model.blocks]
        results[attempt] = case
    # An exception inside a block (with the next block prefetched) on every rank: everything resharded, and the
    # next call exact again.
    # A registered module rule is what the transform runs first for a module (before patterns or forward).
    failing = model.blocks[1]

    def failing_rule(module, args, kwargs):
        if module is failing:
            raise RuntimeError("planned failure in block 1")
        return module.forward(*args, **kwargs)

    transform.register_jvp_rule(type(failing), failing_rule)
    try:
        transform.jvp(make_fn(model), (x, t), (v, torch.ones_like(t)))
        results["raised"] = False
    except RuntimeError as exc:
        results["raised"] = "planned failure" in str(exc)
    finally:
        transform.register_jvp_rule(type(failing), None)
    results["resharded_after_error"] = all_blocks_resharded(model.blocks)
    model.zero_grad(set_to_none=True)
    with GatherMonitor(model.blocks) as monitor:
        out, tangent = transform.jvp(make_fn(model), (x, t), (v, torch.ones_like(t)))
        (out * weight).sum().backward()
    results["after_error"] = dict(out_err=rel(out, ref_out), tangent_err=rel(tangent, ref_tangent),
                                  gathers=[monitor.gathers[b] for b in model.blocks], **grad_report(model, reference))
    with torch.no_grad():
        out, tangent = transform.jvp(make_fn(model), (x, t), (v, torch.ones_like(t)))
    results["no_grad"] = dict(out_err=rel(out, ref_out), tangent_err=rel(tangent, ref_tangent),
                              out_requires_grad=out.requires_grad,
                              resharded_after_forward=all_blocks_resharded(model.blocks))
    return results


def scenario_fsdp1():
    """FSDP1 units through summon_full_params(unit, recurse=False): tangent mode and hybrid (FSDP1 needs a GPU)."""
    if dist.get_backend() != "nccl" or not torch.cuda.is_available():
        return {"skip": "FSDP1 refuses CPU-only processes; run with FACM_CHAIN_WORKER_BACKEND=nccl on 2 GPUs"}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    device = DEVICE
    results = {}
    for mode in ("tangent", "hybrid"):
        model = tiny_lightningdit()
        reference = copy.deepcopy(model)
        model.blocks = nn.ModuleList(FSDP(block, use_orig_params=True, device_id=device) for block in model.blocks)
        carry, carry_tangent, context, context_tangents, kwargs = lightningdit_chain_inputs(model)
        carry, carry_tangent = carry.to(device), carry_tangent.to(device)
        c, c_tangent = context[0].to(device), context_tangents[0].to(device)
        generator = torch.Generator().manual_seed(5)
        ref_inputs = [carry.clone().requires_grad_(True), c.clone().requires_grad_(True)]
        ref_out, ref_tangent = reference_chain(reference.blocks, lightningdit_step, ref_inputs[0], carry_tangent,
                                               (ref_inputs[1], reference.feat_rope), (c_tangent, None), kwargs)
        weight = torch.randn(ref_out.shape, generator=generator, dtype=ref_out.dtype).to(device)
        (ref_out * weight).sum().backward()
        inputs = [carry.clone().requires_grad_(mode != "tangent"), c.clone().requires_grad_(mode != "tangent")]
        chain = ChainJVP(list(model.blocks), step=lightningdit_step, mode=mode)
        out, tangent = chain(inputs[0], carry_tangent, inputs[1], model.feat_rope, context_tangents=(c_tangent, None))
        case = dict(out_err=rel(out, ref_out), tangent_err=rel(tangent, ref_tangent),
                    out_requires_grad=out.requires_grad, tangent_has_graph=tangent.requires_grad)
        if mode == "hybrid":
            (out * weight).sum().backward()
            case["input_grad_err"] = max(rel(x.grad, r.grad) for x, r in zip(inputs, ref_inputs))
            worst, missing = 0.0, []
            ref_params = dict(reference.blocks.named_parameters())
            with FSDP.summon_full_params(model.blocks, with_grads=True):
                for name, param in model.blocks.named_parameters():
                    clean = name.replace("_fsdp_wrapped_module.", "")
                    if param.grad is None:
                        missing.append(clean)
                        continue
                    worst = max(worst, rel(param.grad, ref_params[clean].grad))
            case["grad_err"] = worst
            case["grads_missing"] = missing
        results[mode] = case
    return results


def with_torch_func_seam(scenario):
    """Run a scenario with the chain's per-block JVP forced to torch.func.jvp (the seam without the transform)."""

    def run():
        os.environ["FACM_EXT_CHAIN_SEAM"] = "torch_func"
        try:
            return scenario()
        finally:
            del os.environ["FACM_EXT_CHAIN_SEAM"]

    return run


def scenario_transform_mixed_precision():
    """facm_ext.jvp(model, ...) on a float64 LightningDiT with MixedPrecisionPolicy(param_dtype=float32) and, on the
    root, output_dtype=float64: blocks compute in fp32 on fp32-cast inputs (a registered module rule records what
    each block sees), the output and its tangent come back in fp64."""
    import facm_ext.jvp as transform
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from facm_ext.chain import _handler

    generator = torch.Generator().manual_seed(7)
    model = tiny_lightningdit()
    x = torch.randn(BATCH, 4, 4, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    y = torch.tensor([1, 10], device=DEVICE)
    t = torch.rand(BATCH, generator=generator, dtype=torch.float64).to(DEVICE)
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    # Two unsharded references: float64 (exact) and fp32 on fp32-cast inputs (what the policy computes).
    reference = copy.deepcopy(model)
    reference32 = copy.deepcopy(model).float()
    model.feat_rope.float()  # buffers are not cast by FSDP; float64 RoPE tables would promote q and k
    shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32),
          root_mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                              output_dtype=torch.float64))
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_tangent = torch.func.jvp(lambda a, b: reference(a, b, y), (x, t), (v, torch.ones_like(t)))
    # A registered module rule (what the transform runs first for a module) records what each block sees; the
    # blocks then run their own forward, with every function still fused by the transform.
    seen = set()
    original_forward = type(reference32.blocks[0]).forward

    def recording_rule(module, args, kwargs):
        seen.update(str(p.dtype) for p in module.parameters())
        seen.update(f"input {a.dtype}" for a in args if isinstance(a, torch.Tensor))
        return original_forward(module, *args, **kwargs)

    rule_types = (type(reference32.blocks[0]), type(model.blocks[0]))
    for rule_type in rule_types:
        transform.register_jvp_rule(rule_type, recording_rule)
    try:
        # The fp32 reference runs through the same transform and ops, unsharded.
        ref32_out, _ = transform.jvp(lambda a, b: reference32(a, b, y), (x.float(), t.float()),
                                     (v.float(), torch.ones_like(t, dtype=torch.float32)))
        seen.clear()
        _handler.register_with_transform()
        out, tangent = transform.jvp(lambda a, b: model(a, b, y), (x, t), (v, torch.ones_like(t)))
    finally:
        for rule_type in rule_types:
            transform.register_jvp_rule(rule_type, None)
    weight = torch.randn(ref_out.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    (ref_out * weight).sum().backward()
    (ref32_out * weight.float()).sum().backward()
    (out * weight).sum().backward()
    # Gradients against the unsharded fp32 model through the same ops: fp32 gradients of norm weights sum many
    # cancelling terms, so against float64 they differ by ~1e-4 whatever runs them; the chain must add nothing.
    return dict(out_err=rel(out, ref_out), tangent_err=rel(tangent, ref_tangent), out_dtype=str(out.dtype),
                tangent_dtype=str(tangent.dtype), block_dtypes=sorted(seen), **grad_report(model, reference32))


def scenario_facm_step():
    """FACM's step on the sharded model: the JVP with grad (facm_ext.jvp) and an ordinary forward of the same
    model (FSDP's own hooks) before one backward through both; gradients equal the unsharded reference."""
    import facm_ext.jvp as transform

    generator = torch.Generator().manual_seed(8)
    model = tiny_lightningdit()
    x = torch.randn(BATCH, 4, 4, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    y = torch.tensor([3, 10], device=DEVICE)
    t = torch.rand(BATCH, generator=generator, dtype=torch.float64).to(DEVICE)
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    weight_cm = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    weight_fm = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    reference = copy.deepcopy(model)
    shard(model)

    def step(net, jvp):
        out_cm, tangent = jvp(lambda a, b: net(a, b, y), (x, t), (v, torch.ones_like(t)))
        out_fm = net(x, 2 - t, y)
        loss = (out_cm * weight_cm * (1 + tangent.detach().tanh())).sum() + (out_fm * weight_fm).sum()
        loss.backward()
        return out_cm, tangent, out_fm

    with sdpa_kernel(SDPBackend.MATH):
        ref = step(reference, torch.func.jvp)
    results = {}
    for attempt in ("first", "second"):
        model.zero_grad(set_to_none=True)
        with GatherMonitor(model.blocks) as monitor:
            got = step(model, transform.jvp)
        results[attempt] = dict(out_err=rel(got[0], ref[0]), tangent_err=rel(got[1], ref[1]),
                                fm_err=rel(got[2], ref[2]), gathers=[monitor.gathers[b] for b in model.blocks],
                                resharded=all_blocks_resharded(model.blocks), **grad_report(model, reference))
    return results


SCENARIOS = {
    "facm_step": scenario_facm_step,
    "transform_mixed_precision": scenario_transform_mixed_precision,
    "lightningdit_chain": scenario_lightningdit_chain,
    "lightningdit_chain_torch_func": with_torch_func_seam(scenario_lightningdit_chain),
    "wan_chain": scenario_wan_chain,
    "mixed_precision": scenario_mixed_precision,
    "exception_safety": scenario_exception_safety,
    "errors": scenario_errors,
    "lightningdit_transform": lambda: scenario_transform("lightningdit"),
    "wan_transform": lambda: scenario_transform("wan"),
    "fsdp1": scenario_fsdp1,
}


def main() -> None:
    out_path = sys.argv[1]
    names = sys.argv[2:] or list(SCENARIOS)
    global DEVICE
    backend = os.environ.get("FACM_CHAIN_WORKER_BACKEND", "gloo")
    if backend == "nccl":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
        # fp32 scenarios compare at fp32 accuracy; TF32 convolutions (cuDNN's default) would not be.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group(backend)
    rank = dist.get_rank()
    results = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name]()
        except Exception:  # recorded for the test to report; the other ranks hit the same code path
            results[name] = {"error": traceback.format_exc()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {name: {str(r): gathered[r][name] for r in range(len(gathered))} for name in names}
        merged["_torch"] = torch.__version__
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1, default=str)
    # Both ranks leave together: a rank tearing gloo down while the other still writes can abort the process.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)
