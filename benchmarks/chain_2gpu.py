"""Chain-JVP over FSDP2 on 2 GPUs (NCCL): memory against the streaming bound, time against one GPU, overlap.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc_per_node 2 benchmarks/chain_2gpu.py [--models lightningdit,wan] [--prefetch 1]

What it does, per model (LightningDiT-XL/1 at 16 samples per GPU as FACM trains it; a Wan-2.2-style model with
A14B blocks and as many blocks as make gathering the whole model on one GPU impossible while the chain fits):

- shards the model with ``fully_shard`` per block plus the root, ``MixedPrecisionPolicy(bf16 params, fp32
  reduce)``, and runs the unchanged call ``facm_ext.jvp(model, (x, t), (v, 1))`` (the FSDP2 module-call handler
  streams the blocks), in two modes: tangent-only (no grad) and grad (JVP with a differentiable output, then
  backward: FACM's step without the optimizer); plus the hybrid fallback (JVP under no_grad, then an ordinary
  forward with grad, then backward) as the alternative; plus, as the reference for what FSDP2 itself costs, a
  plain forward (no JVP, no grad) and a plain forward + backward of the same sharded model;
- times each with fixed iteration counts (collectives forbid per-rank adaptive repetition; CUDA-event medians);
- reports peak memory against the bound: sharded parameters (+ sharded gradients) + the root's gathered
  parameters + (1 + prefetch) gathered blocks + activations (one block's transient peak; in grad mode plus the
  saved activations of every block), the activation terms measured on one unsharded block on this GPU;
- counts all-gathers per block and the most blocks gathered at once (GatherMonitor);
- profiles one grad-mode iteration and one plain forward + backward of the same FSDP2 model (torch.profiler) and
  reports how much of the NCCL all-gather / reduce-scatter kernel time overlaps compute kernels on the GPU timeline,
  and splits each step's GPU timeline into forward and backward (compute, exposed communication, idle GPU), for
  the same two steps on one GPU too, so a lost overlap can be located;
- on rank 0 alone, without FSDP, runs the same per-GPU batch through a bf16 copy of the model (for Wan, of as
  many blocks as fit on one GPU, compared per block) and reports chain speed relative to it (target >= 0.9x); the
  plain rows' ratio is FSDP2's own speed against one GPU, the ceiling the chain's ratio can be read against.

Prints one table per model (and JSON with --json PATH). Needs 2 GPUs; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness  # noqa: E402  (benchmarks/, the script's folder)
import facm_ext  # noqa: E402
import facm_ext.chain  # noqa: E402  (registers the FSDP2 handler with facm_ext.jvp)
from facm_ext.chain import GatherMonitor  # noqa: E402
from facm_ext._teardown import exit_without_teardown  # noqa: E402

GIB = 2**30
# bf16 compute on GPUs; --smoke (CPU, gloo, tiny models: checks the script's code paths only) keeps fp32.
COMPUTE_DTYPE = torch.bfloat16


# ------------------------------------------------------------------------------------------------------ models
def lightningdit_spec(args):
    from facm_ext.models import LightningDiT, LightningDiT_XL_1

    hidden = 64 if args.smoke else 1152
    grid = 4 if args.smoke else 16

    def build():
        if args.smoke:
            return LightningDiT(input_size=grid, patch_size=1, in_channels=32, hidden_size=hidden, depth=3,
                                num_heads=2)
        return LightningDiT_XL_1()

    def inputs(device, dtype):
        batch = args.lightningdit_batch
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, 32, grid, grid, device=device, generator=generator).to(dtype)
        t = torch.rand(batch, device=device, generator=generator).to(dtype)
        y = torch.randint(0, 1000, (batch,), device=device, generator=generator)
        v = torch.randn(x.shape, device=device, generator=generator).to(dtype)
        return (x, t), (v, torch.ones_like(t)), (y,)

    def call(model, x, t, y):
        return model(x, t, y)

    def block_inputs(model, device):
        batch, tokens = args.lightningdit_batch, grid * grid
        x = torch.randn(batch, tokens, hidden, device=device, dtype=COMPUTE_DTYPE)
        c = torch.randn(batch, hidden, device=device, dtype=COMPUTE_DTYPE)
        return (x, c), (torch.randn_like(x), torch.randn_like(c)), lambda block, x_, c_: block(x_, c_, model.feat_rope)

    def after_init(model):
        model.reset_buffers()
        # Parameters compute in bf16 (FSDP's param_dtype); the RoPE tables would otherwise promote q and k to fp32.
        model.feat_rope.to(COMPUTE_DTYPE)

    return dict(name="LightningDiT (smoke)" if args.smoke else "LightningDiT-XL/1", build=build, inputs=inputs,
                call=call, block_inputs=block_inputs, after_init=after_init, block_cast_forward_inputs=True, layers=3 if args.smoke else 28,
                baseline_layers=None)


def wan_spec(args, total_memory: int):
    from facm_ext.models import Wan22_A14B_config, WanModel, wan_rope_tables

    config = dict(Wan22_A14B_config)
    config.update(dim=args.wan_dim, ffn_dim=args.wan_ffn, num_heads=args.wan_heads)
    if args.smoke:
        config.update(dim=64, ffn_dim=128, num_heads=2, text_len=8, text_dim=32, freq_dim=32, in_dim=4, out_dim=4)
    with torch.device("meta"):
        probe = WanModel(**dict(config, num_layers=1))
    block_params = sum(p.numel() for p in probe.blocks[0].parameters())
    # Per block and GPU, grad mode: sharded fp32 parameters and gradients (2 x 4 bytes / 2 ranks); gathering the
    # whole model adds every block in bf16 (2 bytes), the chain only 1 + prefetch of them. Just enough blocks that
    # the whole-model gather exceeds the card, leaving the chain about a quarter of it for activations.
    layers = args.wan_layers or (3 if args.smoke else math.ceil(1.06 * total_memory / (block_params * (4 + 2))))
    config["num_layers"] = layers
    frames, side = args.wan_frames, args.wan_side

    def build():
        return WanModel(**config)

    def inputs(device, dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, config["in_dim"], frames, side, side, device=device, generator=generator)
        t = torch.rand(1, device=device, generator=generator)
        context = torch.randn(1, config["text_len"], config["text_dim"], device=device, generator=generator)
        v = torch.randn(x.shape, device=device, generator=generator)
        return (x, t), (v, torch.ones_like(t)), (context,)

    def call(model, x, t, context):
        return model(x, t, context)

    def after_init(model):
        return None

    def block_inputs(model, device):
        grid = (frames, side // 2, side // 2)
        tokens, dim = math.prod(grid), config["dim"]
        x = torch.randn(1, tokens, dim, device=device)
        e = torch.randn(1, tokens, 6, dim, device=device) * 0.1
        cos, sin = wan_rope_tables(dim // config["num_heads"], grid, device=device)
        context = torch.randn(1, config["text_len"], dim, device=device, dtype=COMPUTE_DTYPE)
        step = lambda block, x_, e_: block(x_, e_, None, cos, sin, context, None)  # noqa: E731
        return (x, e), (torch.randn_like(x), torch.randn_like(e)), step

    baseline_layers = max(1, min(layers, int(0.45 * total_memory / (block_params * 2 + 1))))
    return dict(name=f"Wan-style ({layers} x A14B blocks, {frames}x{side}x{side} latent)", build=build,
                inputs=inputs, call=call, block_inputs=block_inputs, after_init=after_init,
                block_cast_forward_inputs=False, layers=layers, baseline_layers=min(baseline_layers, 8),
                config=config, block_params=block_params)


# --------------------------------------------------------------------------------------------------- utilities
def pin_to_cpus(local_rank: int, local_world: int) -> list[int]:
    """Give each local rank its own contiguous share of the physical cores this process may use (hyperthread
    siblings kept together), so that two ranks' Python threads never share a core. Returns the CPUs kept."""
    cores: dict[str, list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                key = f.read().strip()
        except OSError:
            key = str(cpu)
        cores.setdefault(key, []).append(cpu)
    groups = list(cores.values())
    share = groups[local_rank * len(groups) // local_world:(local_rank + 1) * len(groups) // local_world]
    mine = sorted(cpu for group in share for cpu in group)
    if mine:
        os.sched_setaffinity(0, mine)
    return mine


def init_parameters(model: nn.Module, seed: int) -> None:
    """Random N(0, 0.02) values in every (local shard of a) parameter: timing does not depend on the values."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + dist.get_rank() if dist.is_initialized() else seed)
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.copy_(torch.randn(local.shape, device=local.device, generator=generator) * 0.02)


def timed(fn, *, warmup: int, iters: int) -> float:
    """Median milliseconds of fn over ``iters`` calls (fixed counts: every rank must run the same collectives)."""
    for _ in range(warmup):
        fn()
    return _harness.event_median_ms(fn, iters=iters)


def peak_gib(fn) -> tuple[float, float]:
    """(peak allocated, peak reserved) GiB of one call. Reserved counts too: a CUDA graph's pool keeps memory for
    its intermediates that the allocator does not count as allocated between replays."""
    if not torch.cuda.is_available():
        fn()
        return float("nan"), float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def local_bytes(params) -> int:
    total = 0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def profile_step(step, device, rank: int) -> tuple[dict, dict]:
    """One call of ``step`` under torch.profiler: (NCCL kernel overlap, forward/backward phase timeline)."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, f"trace{rank}.json")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        prof.export_chrome_trace(trace)
        timeline = _harness.phase_timeline(trace)
        timeline["fsdp_host_ms"] = fsdp_host_ms(trace)
        return kernel_overlap(trace), timeline


def link_bandwidth(device, numel: int, *, iters: int = 5) -> dict:
    """The interconnect as the chain sees it: ``all_gather_into_tensor`` of ``numel`` bf16 elements (one block's
    parameters gathered) and ``reduce_scatter_tensor`` of ``numel`` fp32 elements (its gradient), each timed alone;
    algorithm bandwidth (bytes of the full tensor per second) and NCCL's bus bandwidth (algbw * (world - 1) /
    world), GB/s."""
    world = dist.get_world_size()
    if device.type != "cuda" or world < 2:
        return {}
    result = {"numel": numel}
    for name, dtype in (("allgather", torch.bfloat16), ("reducescatter", torch.float32)):
        per_rank = max(1, numel // world)
        full = torch.empty(per_rank * world, dtype=dtype, device=device)
        shard = torch.empty(per_rank, dtype=dtype, device=device)

        def collective():
            if name == "allgather":
                dist.all_gather_into_tensor(full, shard)
            else:
                dist.reduce_scatter_tensor(shard, full)

        for _ in range(2):
            collective()
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            collective()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / iters
        algbw = full.numel() * full.element_size() / seconds / 1e9
        result[f"{name}_ms"] = seconds * 1e3
        result[f"{name}_algbw_gbps"] = algbw
        result[f"{name}_busbw_gbps"] = algbw * (world - 1) / world
        del full, shard
    return result


def fsdp_host_ms(trace_path: str) -> dict:
    """Host milliseconds of FSDP2's own annotated regions (``FSDP::...`` record_function ranges) by name."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    totals: dict[str, float] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "user_annotation" and name.startswith("FSDP::") and "dur" in e:
            totals[name] = totals.get(name, 0.0) + e["dur"] / 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def host_profile(primals_call, top: int, rank: int, *, distributed: bool = True) -> dict:
    """Host cost of the JVP forward call alone (no synchronization inside it), tangent vs grad mode, and a cProfile
    of the grad-mode forward call. Every rank runs the same calls (collectives); rank 0's numbers are kept."""
    import cProfile
    import io
    import pstats

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    result = {}
    for mode in ("tangent", "grad"):
        issue = []
        for _ in range(3):
            synchronize()
            if distributed:
                dist.barrier()
            started = time.perf_counter()
            with torch.set_grad_enabled(mode == "grad"):
                out, tangent = primals_call()
            issue.append((time.perf_counter() - started) * 1e3)
            if mode == "grad":
                loss_backward(out, tangent)
            del out, tangent
        result[f"{mode}_forward_issue_ms"] = sorted(issue)[1]
    if not top:
        return result
    synchronize()
    if distributed:
        dist.barrier()
    profiler = cProfile.Profile()
    profiler.enable()
    out, tangent = primals_call()
    profiler.disable()
    loss_backward(out, tangent)
    synchronize()
    if rank == 0:
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(top)
            result[f"cprofile_{order}"] = text.getvalue()
    return result


def loss_backward(out: torch.Tensor, tangent: torch.Tensor) -> None:
    """The backward of the loss every grad-mode step here uses, a stand-in for FACM's (the tangent carries no
    graph, so the gradient flows through ``out`` only, as in the FACM objective)."""
    (out.float() * tangent.float()).mean().backward()


def kernel_overlap(trace_path: str) -> dict:
    """All-gather / reduce-scatter kernel time of a chrome trace and the share overlapped by compute kernels."""
    overlap = _harness.nccl_kernel_overlap(trace_path)
    return dict(allgather_ms=overlap["allgather_kernel_ms"], allgather_overlap=overlap["allgather_overlap"],
                reducescatter_ms=overlap["reducescatter_kernel_ms"],
                reducescatter_overlap=overlap["reducescatter_overlap"])


# ------------------------------------------------------------------------------------------------- the runs
def make_steps(model, spec, primals, tangents, extra):
    fn = lambda *p: spec["call"](model, *p, *extra)  # noqa: E731

    def tangent_step():
        with torch.no_grad():
            return facm_ext.jvp(fn, primals, tangents)

    def grad_step():
        out, tangent = facm_ext.jvp(fn, primals, tangents)
        loss_backward(out, tangent)

    def hybrid_step():
        with torch.no_grad():
            _, tangent = facm_ext.jvp(fn, primals, tangents)
        out = fn(*primals)
        loss_backward(out, tangent)

    def plain_step():
        with torch.no_grad():
            return fn(*primals)

    def plain_grad_step():
        fn(*primals).float().square().mean().backward()

    return dict(tangent=tangent_step, grad=grad_step, hybrid=hybrid_step, plain=plain_step,
                plain_grad=plain_grad_step, jvp=lambda: facm_ext.jvp(fn, primals, tangents), fn=fn)


# Table rows: the chain's modes, then the plain (no JVP) reference rows, with their labels.
MODE_LABELS = {"tangent": "tangent", "grad": "grad", "hybrid": "hybrid", "plain": "plain fwd (no JVP)",
               "plain_grad": "plain fwd+bwd (no JVP)"}


def activation_terms(spec, model: nn.Module, device) -> dict:
    """Measured on the first block of the unsharded bf16 model: the transient peak of its JVP (no grad, and with
    grad) and the activations its grad-mode JVP keeps for backward."""
    if device.type != "cuda":
        return {}
    primals, tangents, step = spec["block_inputs"](model, device)
    block = model.blocks[0]
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    fn = lambda *p: step(block, *p)  # noqa: E731
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        facm_ext.jvp(fn, primals, tangents)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    out = facm_ext.jvp(fn, primals, tangents)
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base
    transient_grad = torch.cuda.max_memory_allocated() - base
    del out
    return dict(block_bytes_bf16=params, transient=transient, saved=saved, transient_grad=transient_grad)


def run_model(spec, args, rank: int, device) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    with torch.device("meta"):
        model = spec["build"]()
    block_policy = MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPE, reduce_dtype=torch.float32,
                                        cast_forward_inputs=spec["block_cast_forward_inputs"])
    for block in model.blocks:
        fully_shard(block, mp_policy=block_policy)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPE, reduce_dtype=torch.float32))
    model.to_empty(device=device)
    init_parameters(model, 0)
    spec["after_init"](model)
    facm_ext.chain.set_prefetch(args.prefetch)
    facm_ext.chain.set_block_graphs(args.block_graphs)

    input_dtype = torch.float32
    primals, tangents, extra = spec["inputs"](device, input_dtype)
    steps = make_steps(model, spec, primals, tangents, extra)
    block_param_ids = {id(p) for b in model.blocks for p in b.parameters()}
    root_params = [p for p in model.parameters() if id(p) not in block_param_ids]
    sharded = local_bytes(model.parameters())
    itemsize = COMPUTE_DTYPE.itemsize
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks) * itemsize  # gathered
    root_gathered = sum(p.numel() for p in root_params) * itemsize
    full_bf16 = sum(p.numel() for p in model.parameters()) * itemsize
    result = dict(model=spec["name"], layers=spec["layers"], rank=rank, block_graphs=args.block_graphs,
                  sharded_gib=sharded / GIB,
                  block_gathered_gib=largest_block / GIB, root_gathered_gib=root_gathered / GIB,
                  whole_gather_gib=(sharded + full_bf16) / GIB,
                  whole_gather_grad_gib=(2 * sharded + full_bf16) / GIB,
                  device_gib=(torch.cuda.get_device_properties(device).total_memory / GIB
                              if device.type == "cuda" else float("nan")))

    # One gathered block's bytes, through this machine's interconnect, before anything else runs.
    result["link"] = link_bandwidth(device, largest_block // itemsize)
    modes = [mode for mode in MODE_LABELS if mode in args.modes]
    steps["tangent"]()  # records the unit order; the later calls prefetch with it
    if "grad" in modes:
        steps["grad"]()
    model.zero_grad(set_to_none=True)
    for mode in modes:
        with GatherMonitor(model.blocks) as monitor:
            steps[mode]()
        result[f"{mode}_gathers_per_block"] = sorted(set(monitor.gathers[b] for b in model.blocks))
        result[f"{mode}_max_gathered"] = monitor.max_gathered
        model.zero_grad(set_to_none=True)
    for mode in modes:
        result[f"{mode}_ms"] = timed(steps[mode], warmup=args.warmup, iters=args.iters)
        result[f"{mode}_peak_gib"], result[f"{mode}_reserved_gib"] = peak_gib(steps[mode])
        model.zero_grad(set_to_none=True)

    # The grad step and FSDP2's own forward + backward of the same model, so their overlap can be compared.
    for mode, prefix in (("grad", ""), ("plain_grad", "plain_grad_")):
        if mode not in modes:
            continue
        overlap, timeline = profile_step(steps[mode], device, rank)
        result.update({prefix + key: value for key, value in overlap.items()})
        result[f"{mode}_timeline"] = timeline
        model.zero_grad(set_to_none=True)
    if args.host_profile:
        result["host_profile"] = host_profile(steps["jvp"], args.host_profile, rank)
        model.zero_grad(set_to_none=True)
    if args.block_graphs:
        result["block_graph_failures"] = facm_ext.chain.block_graph_failures()
        facm_ext.chain.set_block_graphs(False)
        facm_ext.chain.reset_block_graphs()
    del model, steps, primals, tangents, extra
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_baseline(spec, args, device) -> dict:
    """Rank 0 alone, no FSDP: the same per-GPU batch through a bf16 model (Wan: fewer blocks, per-block time)."""
    torch.manual_seed(0)
    layers = spec["baseline_layers"] or spec["layers"]
    build = spec["build"]
    if spec.get("config") is not None:
        from facm_ext.models import WanModel

        config = dict(spec["config"], num_layers=layers)
        build = lambda: WanModel(**config)  # noqa: E731
    with torch.device("meta"):
        model = build()
    model.to_empty(device=device)
    model.to(COMPUTE_DTYPE)
    init_parameters(model, 0)
    spec["after_init"](model)
    primals, tangents, extra = spec["inputs"](device, COMPUTE_DTYPE)  # what the root's input cast gives the chain
    steps = make_steps(model, spec, primals, tangents, extra)
    result = dict(baseline_layers=layers)
    modes = [mode for mode in ("tangent", "grad", "plain", "plain_grad") if mode in args.modes]
    for mode in modes:
        steps[mode]()
        result[f"baseline_{mode}_ms"] = timed(steps[mode], warmup=args.warmup, iters=args.iters)
        result[f"baseline_{mode}_peak_gib"], result[f"baseline_{mode}_reserved_gib"] = peak_gib(steps[mode])
        model.zero_grad(set_to_none=True)
    if args.block_graphs and device.type == "cuda":
        # The chain replays CUDA graphs then: compare it with one GPU's whole-model graph as well.
        if "tangent" in modes:
            with torch.no_grad():
                graphed = facm_ext.jvp.graph(steps["fn"], primals, tangents, module=model)
                result["baseline_tangent_graph_ms"] = timed(lambda: graphed(primals, tangents),
                                                            warmup=args.warmup, iters=args.iters)
            del graphed
        if "grad" in modes:
            graphed = facm_ext.jvp.graph(steps["fn"], primals, tangents, module=model)

            def graphed_grad_step():
                out, tangent = graphed(primals, tangents)
                loss_backward(out, tangent)

            result["baseline_grad_graph_ms"] = timed(graphed_grad_step, warmup=args.warmup, iters=args.iters)
            model.zero_grad(set_to_none=True)
            del graphed, graphed_grad_step
    for mode in ("grad", "plain_grad"):
        if mode not in modes:
            continue
        result[f"baseline_{mode}_timeline"] = profile_step(steps[mode], device, 0)[1]
        model.zero_grad(set_to_none=True)
    if args.host_profile:
        result["baseline_host_profile"] = host_profile(steps["jvp"], 0, 0, distributed=False)
        model.zero_grad(set_to_none=True)
    result["activations"] = activation_terms(spec, model, device)
    del model, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def bound_gib(r: dict, mode: str, prefetch: int) -> float | None:
    act = r.get("activations") or {}
    if not act:
        return None
    params = r["sharded_gib"] * (2 if mode == "grad" else 1)  # grad mode: sharded fp32 gradients too
    gathered = r["root_gathered_gib"] + (1 + prefetch) * r["block_gathered_gib"]
    if mode == "tangent":
        activations = act["transient"] / GIB
    else:
        activations = (r["layers"] * act["saved"] + act["transient_grad"]) / GIB
    return params + gathered + activations


def print_table(r: dict, prefetch: int) -> None:
    per_block = r["baseline_layers"] != r["layers"]
    print(f"\n### {r['model']} on 2 GPUs ({r['device_gib']:.0f} GiB each), torch {torch.__version__}, "
          f"prefetch {prefetch}")
    def fits(gib):
        return "does not fit" if gib > r["device_gib"] else "fits"

    print(f"sharded params {r['sharded_gib']:.2f} GiB/GPU, one block gathered {r['block_gathered_gib']:.2f} GiB, "
          f"root gathered {r['root_gathered_gib']:.2f} GiB; gathering the whole model needs "
          f"{r['whole_gather_gib']:.1f} GiB without gradients ({fits(r['whole_gather_gib'])}), "
          f"{r['whole_gather_grad_gib']:.1f} GiB with sharded gradients ({fits(r['whole_gather_grad_gib'])}), "
          "before activations")
    link = r.get("link") or {}
    if link:
        # What the step's collectives cost at that rate with nothing else running: a floor for the chain's time.
        gathers = r["layers"] * link["allgather_ms"]
        print(f"interconnect: all-gather of one block ({link['numel'] * 2 / 2**20:.0f} MiB bf16) "
              f"{link['allgather_ms']:.2f} ms = {link['allgather_busbw_gbps']:.0f} GB/s bus bandwidth; "
              "reduce-scatter of its fp32 gradient "
              f"{link['reducescatter_ms']:.2f} ms = {link['reducescatter_busbw_gbps']:.0f} GB/s. Communication "
              f"alone per step: tangent {gathers:.0f} ms (one gather per block), grad "
              f"{2 * gathers + r['layers'] * link['reducescatter_ms']:.0f} ms (two gathers and one reduce-scatter)")
    print("| mode | chain ms | 1-GPU no-FSDP ms | speed vs 1 GPU | peak GiB | bound GiB | AG/block | max gathered |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, label in MODE_LABELS.items():
        if f"{mode}_ms" not in r:
            continue
        chain_ms = r[f"{mode}_ms"]
        base = r.get(f"baseline_{mode}_ms")
        if base is not None and per_block:
            base_cmp, chain_cmp = base / r["baseline_layers"], chain_ms / r["layers"]
            base_txt = f"{base:.1f} ({r['baseline_layers']} blocks)"
        else:
            base_cmp, chain_cmp, base_txt = base, chain_ms, ("-" if base is None else f"{base:.1f}")
        speed = "-" if base is None else f"{base_cmp / chain_cmp:.2f}x" + (" per block" if per_block else "")
        # The bound is the chain's (a JVP's activations); the plain rows have none.
        bound = None if mode.startswith("plain") else bound_gib(r, "tangent" if mode == "tangent" else "grad",
                                                                prefetch)
        print(f"| {label} | {chain_ms:.1f} | {base_txt} | {speed} | {r[f'{mode}_peak_gib']:.2f} | "
              f"{'-' if bound is None else f'{bound:.2f}'} | {r[f'{mode}_gathers_per_block']} | "
              f"{r[f'{mode}_max_gathered']} |")
    if r.get("block_graphs"):
        failures = r.get("block_graph_failures") or {}
        print("each block replayed from CUDA graphs (facm_ext.chain.set_block_graphs; grad mode: forward and "
              "backward graphs)" + (f"; captures failed: {failures}" if failures else "; every capture succeeded"))
        for mode in ("tangent", "grad"):
            base = r.get(f"baseline_{mode}_graph_ms")
            if base and f"{mode}_ms" in r and not per_block:
                print(f"{mode}: 1 GPU, whole-model CUDA graph (facm_ext.jvp.graph) {base:.1f} ms, chain speed vs it "
                      f"{base / r[f'{mode}_ms']:.2f}x")
    reserved = [f"{mode} {r[f'{mode}_reserved_gib']:.2f}" for mode in MODE_LABELS if f"{mode}_reserved_gib" in r]
    if reserved:
        print("peak reserved GiB (allocator and graph pools): " + ", ".join(reserved))
    for label, prefix in (("grad step", ""), ("plain fwd+bwd step (FSDP2 alone)", "plain_grad_")):
        if prefix + "allgather_ms" not in r:
            continue
        print(f"{label} profile: all-gather kernels {r[prefix + 'allgather_ms']:.1f} ms, "
              f"{100 * r[prefix + 'allgather_overlap']:.0f}% overlapped with compute; reduce-scatter "
              f"{r[prefix + 'reducescatter_ms']:.1f} ms, {100 * r[prefix + 'reducescatter_overlap']:.0f}% overlapped")
    for mode, label in (("grad", "grad step"), ("plain_grad", "plain fwd+bwd step")):
        for where, key in (("2 GPUs, FSDP2", f"{mode}_timeline"), ("1 GPU", f"baseline_{mode}_timeline")):
            if r.get(key):
                print(f"{label} timeline, {where}:")
                print(_harness.format_phase_timeline(r[key]))
                fsdp = r[key].get("fsdp_host_ms") or {}
                if fsdp:
                    print("FSDP host ms: " + ", ".join(f"{name} {ms:.1f}" for name, ms in list(fsdp.items())[:8]))
    for mode, label in (("grad", "grad step"), ("plain_grad", "plain fwd+bwd step")):
        if r.get(f"{mode}_timeline") and r.get(f"baseline_{mode}_timeline"):
            print(f"{label}, kernels whose time differs most, 2 GPUs (FSDP2) minus 1 GPU:")
            print(_harness.kernel_differences(r[f"{mode}_timeline"], r[f"baseline_{mode}_timeline"]))
    host = r.get("host_profile")
    for where, key in (("2 GPUs, FSDP2", "host_profile"), ("1 GPU", "baseline_host_profile")):
        if r.get(key):
            print(f"host issue of the JVP forward call, {where}: tangent mode "
                  f"{r[key]['tangent_forward_issue_ms']:.1f} ms, grad mode {r[key]['grad_forward_issue_ms']:.1f} ms")
    if host:
        for order in ("tottime", "cumulative"):
            print(host.get(f"cprofile_{order}", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lightningdit,wan")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--lightningdit-batch", type=int, default=16)
    parser.add_argument("--wan-layers", type=int, default=0, help="0: enough that a whole-model gather cannot fit")
    parser.add_argument("--wan-dim", type=int, default=5120)
    parser.add_argument("--wan-ffn", type=int, default=13824)
    parser.add_argument("--wan-heads", type=int, default=40)
    parser.add_argument("--wan-frames", type=int, default=1)
    # 32 -> 256 tokens: with 76 blocks sized so the whole-model gather cannot fit a 140 GiB card, the grad mode's
    # saved activations at 1024 tokens (--wan-side 64) ran out of memory on an H200 (2026-11-26).
    parser.add_argument("--wan-side", type=int, default=32, help="latent height = width (tokens: frames*(side/2)^2)")
    parser.add_argument("--modes", default=",".join(MODE_LABELS),
                        help=f"comma-separated subset of {','.join(MODE_LABELS)} (e.g. tangent,plain for a token "
                             "count whose grad-mode activations do not fit)")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="pin each local rank to its own share of the physical cores (before any thread starts)")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also time the host issue of the JVP forward call (tangent vs grad mode) and print the "
                             "N functions with the most host time in a grad-mode forward (cProfile, rank 0)")
    parser.add_argument("--block-graphs", action="store_true",
                        help="replay each FSDP2 block from CUDA graphs, in tangent and grad mode "
                             "(facm_ext.chain.set_block_graphs)")
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU + gloo with tiny models: exercises the script, measures nothing meaningful")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="compute (FSDP param) dtype; default bfloat16 (float32 with --smoke)")
    args = parser.parse_args()
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(args.modes) - set(MODE_LABELS))
    if unknown or not args.modes:
        parser.error(f"--modes: expected a non-empty subset of {','.join(MODE_LABELS)}, got {unknown or 'nothing'}")
    if args.host_profile and "grad" not in args.modes:
        parser.error("--host-profile compares tangent and grad mode: --modes must include grad")

    if "LOCAL_RANK" not in os.environ or (not args.smoke and torch.cuda.device_count() < 2):
        print("chain_2gpu.py needs 2 GPUs under torchrun --nproc_per_node 2 (or --smoke under torchrun on CPU); "
              "nothing to do here.")
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.pin_cpus:
        pinned = pin_to_cpus(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        # One write of the whole line: both ranks share the pipe, and print() writes the newline separately.
        sys.stdout.write(f"rank {local_rank}: pinned to CPUs {pinned}\n")
        sys.stdout.flush()
    global COMPUTE_DTYPE
    COMPUTE_DTYPE = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    if args.smoke:
        args.lightningdit_batch, args.wan_frames, args.wan_side = 2, 2, 4
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        total_memory = 0
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
        total_memory = torch.cuda.get_device_properties(device).total_memory
    rank = dist.get_rank()
    all_results = []
    for name in args.models.split(","):
        spec = lightningdit_spec(args) if name == "lightningdit" else wan_spec(args, total_memory)
        started = time.perf_counter()
        result = run_model(spec, args, rank, device)
        dist.barrier()
        if rank == 0:
            result.update(run_baseline(spec, args, device))
            result["wall_s"] = time.perf_counter() - started
            print_table(result, args.prefetch)
            all_results.append(result)
        dist.barrier()
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=1, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_without_teardown(0)
