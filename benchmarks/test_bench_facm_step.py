"""One FACM training step on LightningDiT-XL/1 at B=16 (256 tokens, fp32 parameters, bf16 autocast, AdamW):
guided teacher velocity, the JVP pass with a differentiable primal, the FM forward at 2 - t, backward, gradient
clipping and the optimizer step. Compared in the same run with the step written the official way (compiled teacher,
eager ``torch.func.jvp`` with math attention, compiled FM forward; anchor on an H200: 587 ms, 34.8 GiB).

Rows: median step time (do_bench) and peak memory beyond the weights and optimizer state. One variant runs
the FM part's backward before the JVP pass (``facm_loss(..., backward=True)``: same gradients, peak memory the
larger of the two graphs instead of their sum); the last replays the student's JVP and its backward from a CUDA
graph (``facm.GraphedStudentJVP``; the eager transform leaves the GPU waiting on the host at B=16). A variant that fails
(e.g. out of memory, a compile error) is recorded as a row with the error in its note.
"""

from __future__ import annotations

import math

import pytest
import torch

import _harness
from facm_ext import facm

BATCH = 16
NULL_CLASS = 1000


def _setup():
    from facm_ext.models import LightningDiT_XL_1

    torch.manual_seed(0)
    student = LightningDiT_XL_1().cuda()
    with torch.no_grad():  # a trained-looking network (adaLN-Zero makes a fresh one output zeros)
        for p in student.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    teacher = LightningDiT_XL_1().cuda()
    teacher.load_state_dict(student.state_dict())
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 32, 16, 16, generator=g).cuda()
    noise = torch.randn(BATCH, 32, 16, 16, generator=g).cuda()
    y = torch.randint(0, 1000, (BATCH,), generator=g).cuda()
    t = facm.sample_t(BATCH, generator=g).cuda()
    return student, teacher, optimizer, (x, y, t, noise)


def _make_step(student, teacher, optimizer, batch, *, jvp_fn, fm_model=None, split_backward=False,
               autocast_cache=True):
    x, y, t, noise = batch

    def step():
        # CUDA graphs (the graphed variant) need autocast's weight-cast cache off.
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=autocast_cache):
            out = facm.facm_loss(student, x, y, t=t, noise=noise, teacher=teacher, null_class=NULL_CLASS,
                                 jvp_fn=jvp_fn, fm_model=fm_model, backward=split_backward)
        if not split_backward:
            out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"]

    return step


def _variants(student, teacher):
    import facm_ext.jvp as fused

    compiled_student = torch.compile(student)
    compiled_teacher = torch.compile(teacher)
    return {
        "official-style (compiled teacher + FM fwd, eager torch.func.jvp, math SDPA)":
            dict(teacher=compiled_teacher, jvp_fn=facm.torch_func_jvp, fm_model=compiled_student),
        "facm_ext.jvp (compiled teacher + FM fwd)":
            dict(teacher=compiled_teacher, jvp_fn=fused.jvp, fm_model=compiled_student),
        "facm_ext.jvp (all eager)":
            dict(teacher=teacher, jvp_fn=fused.jvp, fm_model=None),
        "facm_ext.jvp (compiled teacher + FM fwd), FM backward before the JVP pass":
            dict(teacher=compiled_teacher, jvp_fn=fused.jvp, fm_model=compiled_student, split_backward=True),
        "facm_ext.jvp.graph: student JVP + its backward replayed from a CUDA graph (compiled teacher + FM fwd)":
            dict(teacher=compiled_teacher, jvp_fn=facm.GraphedStudentJVP(student), fm_model=compiled_student,
                 autocast_cache=False),
    }


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4])
def test_bench_facm_step(benchmark, variant):
    _harness.require_cuda()
    student, teacher, optimizer, batch = _setup()
    name, cfg = list(_variants(student, teacher).items())[variant]
    step = _make_step(student, cfg["teacher"], optimizer, batch, jvp_fn=cfg["jvp_fn"], fm_model=cfg["fm_model"],
                      split_backward=cfg.get("split_backward", False), autocast_cache=cfg.get("autocast_cache", True))

    def synced():
        loss = step()
        torch.cuda.synchronize()
        return loss

    case = f"LightningDiT-XL/1 B={BATCH} bf16 autocast"
    try:
        for _ in range(2):  # compile, allocate the optimizer state
            loss = synced()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss {loss.item()}")
        peak = _harness.peak_extra_memory_gib(synced)
        total_peak = torch.cuda.max_memory_allocated() / 2**30
        ms = _harness.median_ms(synced, warmup_ms=0, rep_ms=3000)
        benchmark.pedantic(synced, rounds=3, warmup_rounds=0)
    except (RuntimeError, torch.OutOfMemoryError, FloatingPointError) as err:  # recorded as a failure row
        _harness.record("facm_step", case, name, float("nan"), note=f"FAILED: {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]}")
        del student, teacher, optimizer
        torch.cuda.empty_cache()
        return
    _harness.record("facm_step", case, name, ms, peak_gib=peak,
                    note=f"total peak {total_peak:.1f} GiB incl. weights + AdamW state")
    del student, teacher, optimizer
    torch.cuda.empty_cache()
