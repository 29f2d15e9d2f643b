"""Host (Python) cost of the eager facm_ext.jvp transform, measured on the CPU with tiny tensors.

    python benchmarks/profile_host_cpu.py [--models lightningdit,dit,wan] [--iters 30] [--top 25] [--stub-ops]
                                          [--fsdp] [--json PATH]

``--fsdp`` adds each model sharded with FSDP2 (``fully_shard`` per block and the root) over a fake 2-rank process
group: no data moves, so the added time is FSDP2's host work plus the chain's FSDP2 handler. Measured on the 2-core
CPU machine (torch 2.14.1, median of 15, ms per call):

| model | plain fwd | plain fwd+bwd | jvp (no grad) | jvp + grad + bwd |
|---|---|---|---|---|
| LightningDiT-XL/1 structure (28 blocks), unsharded | 9.0 | 34.6 | 39.3 | 89.1 |
| same, FSDP2 | 27.5 (+18.5) | 94.9 (+60.3) | 64.4 (+25.2) | 148.1 (+59.0) |
| Wan 2.2 structure (40 blocks), unsharded | 19.4 | 71.4 | 90.1 | 186.7 |
| same, FSDP2 | 52.6 (+33.2) | 177.8 (+106.4) | 129.8 (+39.7) | 294.8 (+108.1) |

So the chain costs the host what FSDP2 costs a plain step: with grad, the same (+59 vs +60 ms, +108 vs +106 ms);
without grad, 0.2 ms per block more than a plain FSDP2 forward (the handler's own work: splitting and re-wrapping
the duals around FSDP2's hooks, its explicit prefetch calls).

On a GPU the eager transform is host-bound (benchmarks/RESULTS.md, "Host overhead"): the kernels take a third of
the call. With tiny widths on the CPU every op costs almost nothing, so the time of a call is the Python of the
model and of the transform. Each model keeps the full-size structure (block count and the same ops: adaLN, qk-norm,
RoPE, SwiGLU / GELU MLP, RMSNorm / LayerNorm) at toy widths (hidden 64, 4 heads of 16, 16 tokens, batch 2, fp32):

- LightningDiT-XL/1 structure: 28 blocks, RMSNorm, qk RMSNorm, 2D RoPE, SwiGLU;
- DiT-XL/2 structure: 28 blocks, LayerNorm, GELU(tanh) MLP;
- Wan 2.2 structure: 40 blocks, per-token modulation, self + cross attention, qk RMSNorm, 3D RoPE, GELU(tanh) FFN.

For each: median host ms (perf_counter, one thread) of a plain forward without grad, a plain forward + backward of
out.sum(), facm_ext.jvp without grad, and facm_ext.jvp with grad + backward of out.sum(); the Python function
calls per JVP (cProfile, no grad) and the functions with the most own time (``--top``). The zero-initialized
adaLN heads get random weights first, so that no branch is skipped on zeros.

What carries over to the GPU: the transform's own Python (dispatch, rule lookup, dual wrapping, validation) is the
same code on both; the op bodies differ (the CPU runs each op's plain-PyTorch reference path, the GPU its kernel
launch), so CPU-only lines in the profile (facm_ext/reference, the ops' _forward_reference, ...) say nothing about
the GPU.

Measured on the 2-core CPU machine (torch 2.14.1): baseline 24238f9 against d6248a2, the two checkouts run in
turn three times (--iters 40); each cell is the median of the three runs' medians, ms per call, before -> after.
The plain forward is the same code in both: its spread (up to +-25% between runs) is the machine's noise.

Real op bodies (on the CPU these are the plain-PyTorch reference paths, CPU-only work that the GPU does not do):

| model | plain fwd | plain fwd+bwd | jvp (no grad) | jvp + grad + bwd | Python calls / jvp |
|---|---|---|---|---|---|
| LightningDiT-XL/1 structure | 15.1 / 10.9 | 45.8 / 50.0 | 77.2 -> 60.7 (-21%) | 155.4 -> 124.8 (-20%) | 80390 -> 51504 (-36%) |
| DiT-XL/2 structure | 7.9 / 8.8 | 27.6 / 29.5 | 59.3 -> 49.1 (-17%) | 117.7 -> 89.7 (-24%) | 66532 -> 40502 (-39%) |
| Wan 2.2 structure (40 blocks) | 28.0 / 29.4 | 95.0 / 97.2 | 192.3 -> 139.0 (-28%) | 367.2 -> 265.6 (-28%) | 258440 -> 121404 (-53%) |

--stub-ops (the fused ops allocate their outputs and compute nothing: the transform's and the model's Python):

| model | plain fwd | plain fwd+bwd | jvp (no grad) | jvp + grad + bwd | Python calls / jvp |
|---|---|---|---|---|---|
| LightningDiT-XL/1 structure | 14.7 / 13.8 | 48.7 / 49.2 | 26.6 -> 17.8 (-33%) | 93.8 -> 65.0 (-31%) | 63976 -> 38195 (-40%) |
| DiT-XL/2 structure | 8.1 / 8.5 | 29.2 / 26.1 | 23.6 -> 13.1 (-45%) | 72.0 -> 47.2 (-34%) | 53979 -> 30718 (-43%) |
| Wan 2.2 structure (40 blocks) | 30.3 / 28.6 | 99.5 / 93.6 | 100.6 -> 53.6 (-47%) | 246.0 -> 150.0 (-39%) | 227047 -> 96812 (-57%) |
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import facm_ext  # noqa: E402
from facm_ext.models.dit import DiT  # noqa: E402
from facm_ext.models.lightningdit import LightningDiT  # noqa: E402
from facm_ext.models.wan import WanModel  # noqa: E402

BATCH = 2


def _randomize_zero_params(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def build(name: str):
    """(model, func, primals, tangents) for one tiny model; func(*primals) is the forward."""
    torch.manual_seed(0)
    if name == "lightningdit":
        # input 4x4, patch 1 -> 16 tokens; hidden 64, 4 heads of 16 (RoPE needs head_dim % 4 == 0).
        model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=64, depth=28, num_heads=4,
                             num_classes=10)
        x = torch.randn(BATCH, 4, 4, 4)
        y = torch.randint(0, 10, (BATCH,))
    elif name == "dit":
        # input 8x8, patch 2 -> 16 tokens.
        model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=28, num_heads=4,
                    num_classes=10)
        x = torch.randn(BATCH, 4, 8, 8)
        y = torch.randint(0, 10, (BATCH,))
    elif name == "wan":
        # latents [B, 4, 1, 8, 8], patch (1, 2, 2) -> 16 tokens; 8 text tokens.
        model = WanModel(patch_size=(1, 2, 2), text_len=8, in_dim=4, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                         out_dim=4, num_heads=4, num_layers=40)
        x = torch.randn(BATCH, 4, 1, 8, 8)
        y = torch.randn(BATCH, 8, 32)
    else:
        raise ValueError(f"model: expected lightningdit, dit or wan, got {name!r}")
    _randomize_zero_params(model)
    t = torch.rand(BATCH)

    def func(x_, t_):
        return model(x_, t_, y)

    return model, func, (x, t), (torch.randn_like(x), torch.ones_like(t))


def stub_ops() -> list:
    """Replace the body of every facm_ext custom op by its fake (meta) implementation: outputs of the right shape
    and dtype, allocated and not computed (contents arbitrary). What is left of a call is the Python around the
    kernels, close to what the GPU run pays per op (a launch instead of an allocation). Returns what
    :func:`unstub_ops` needs to undo it."""
    import importlib

    from facm_ext.ops._common import JVPCustomOp

    saved = []
    for module_name in ("linear", "mlp", "attention", "rope", "norms", "pointwise"):
        module = importlib.import_module(f"facm_ext.ops.{module_name}")
        for value in list(vars(module).values()):
            if isinstance(value, JVPCustomOp):
                fake = value.op._abstract_fn
                function_forward = None
                if value._function is not None and "setup_context" in value._function.__dict__:
                    # Older checkouts build the eager Function with a separate setup_context and the op body as its
                    # forward; the current form's forward calls op._impl, replaced below.
                    function_forward = value._function.__dict__["forward"]
                    value._function.forward = staticmethod(fake)
                saved.append((value, value._impl, function_forward))
                value._impl = fake
    return saved


def unstub_ops(saved: list) -> None:
    for op, impl, function_forward in saved:
        op._impl = impl
        if function_forward is not None:
            op._function.forward = function_forward


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def shard_with_fsdp2(model: nn.Module) -> None:
    """``fully_shard`` per block plus the root over a fake 2-rank process group (collectives return at once, no
    data moves; one process): what is left of FSDP2 is its host work (hooks, copy-in / copy-out, parameter swaps),
    and facm_ext.jvp streams the blocks through the chain's FSDP2 handler as on GPUs."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"--fsdp: {type(model).__name__} has no .blocks to shard")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def measure(name: str, iters: int, top: int, stub: bool, fsdp: bool = False) -> dict:
    model, func, primals, tangents = build(name)
    if fsdp:
        shard_with_fsdp2(model)
    if stub:
        # The first call recognizes the module patterns and verifies the blocks on real values; only then stub.
        facm_ext.jvp(func, primals, tangents)
        saved = stub_ops()

    def plain_forward():
        with torch.no_grad():
            func(*primals)

    def plain_forward_backward():
        func(*primals).sum().backward()
        model.zero_grad(set_to_none=True)

    def jvp_no_grad():
        with torch.no_grad():
            facm_ext.jvp(func, primals, tangents)

    def jvp_grad_backward():
        out, _ = facm_ext.jvp(func, primals, tangents)
        out.sum().backward()
        model.zero_grad(set_to_none=True)

    row = dict(model=name + (" (FSDP2, fake 2 ranks)" if fsdp else ""))
    for key, fn in (("forward_ms", plain_forward), ("forward_backward_ms", plain_forward_backward),
                    ("jvp_ms", jvp_no_grad), ("jvp_grad_backward_ms", jvp_grad_backward)):
        row[key] = median_ms(fn, iters)

    profiler = cProfile.Profile()
    calls = 3
    profiler.enable()
    for _ in range(calls):
        jvp_no_grad()
    profiler.disable()
    stats = pstats.Stats(profiler)
    row["calls_per_jvp"] = stats.total_calls // calls
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    row["profile"] = stream.getvalue()
    if stub:
        unstub_ops(saved)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lightningdit,dit,wan")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--top", type=int, default=25, help="functions with the most own time to print (0: none)")
    parser.add_argument("--stub-ops", action="store_true",
                        help="the fused ops return unfilled outputs (their fake implementations): the time left is "
                             "the Python of the model, the transform and the op wrappers (timing only)")
    parser.add_argument("--fsdp", action="store_true",
                        help="also run each model sharded with FSDP2 per block over a fake 2-rank process group "
                             "(no communication): the host cost FSDP2 and the chain's handler add, per call")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)  # host cost, not intra-op parallelism; steadier medians on a small machine

    names = [name for name in args.models.split(",") if name]
    rows = [measure(name, args.iters, args.top, args.stub_ops) for name in names]
    if args.fsdp:
        rows += [measure(name, args.iters, args.top, args.stub_ops, fsdp=True) for name in names]
    print(f"torch {torch.__version__}, CPU, batch {BATCH}, fp32, median of {args.iters}"
          + (", fused ops stubbed (fake implementations)" if args.stub_ops else ""))
    print("| model | fwd ms | fwd+bwd ms | jvp ms | jvp+grad+bwd ms | calls/jvp | jvp/fwd |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['forward_ms']:.2f} | {row['forward_backward_ms']:.2f} | {row['jvp_ms']:.2f} | "
              f"{row['jvp_grad_backward_ms']:.2f} | {row['calls_per_jvp']} | "
              f"{row['jvp_ms'] / row['forward_ms']:.2f} |")
    if args.top:
        for row in rows:
            print(f"\n### {row['model']}: top {args.top} functions by own time, 3 facm_ext.jvp calls (no grad)")
            print(row["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
