"""facm_ext.jvp.graph: the JVP captured in a CUDA graph must give what eager facm_ext.jvp gives (outputs, tangents
and, in grad mode, every parameter gradient through the primal output) on every replay with new inputs; bad
arguments raise ValueError. The capture itself needs a GPU; the argument checks run everywhere."""

from __future__ import annotations

import pytest
import torch

import facm_ext
from conftest import rel_err, requires_cuda
from facm_ext.models import LightningDiT


def test_graph_needs_cuda_and_a_callable():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="func"):
        facm_ext.jvp.graph(3, (x,), (x,))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            facm_ext.jvp.graph(torch.sin, (x,), (x,))


def _model():
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=144, depth=2, num_heads=2,
                         num_classes=10).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (1.5 / (p.shape[-1] if p.dim() > 1 else 16) ** 0.5))
    return model


def _model_and_func():
    """The tiny model and ``(x, t) -> model(x, t, y)`` with fixed labels."""
    model = _model()
    y = torch.tensor([1, 5, 9], device="cuda")
    return model, lambda x, t: model(x, t, y)


def _inputs(seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(3, 4, 4, 4, device="cuda", generator=gen)
    t = torch.rand(3, device="cuda", generator=gen)
    v = torch.randn(x.shape, device="cuda", generator=gen)
    return (x, t), (v, torch.ones_like(t))


def _grads(model):
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


# fp32: the replay runs the very kernels the eager call runs; bf16 autocast: same, up to atomics-free reordering.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


def _context(precision):
    if precision == "bf16":
        return torch.autocast("cuda", torch.bfloat16, cache_enabled=False)
    return torch.autocast("cuda", enabled=False)


@requires_cuda
@pytest.mark.parametrize("precision", sorted(TOLERANCE))
def test_graph_no_grad_matches_eager(precision):
    model, func = _model_and_func()

    primals, tangents = _inputs(0)
    with torch.no_grad(), _context(precision):
        graphed = facm_ext.jvp.graph(func, primals, tangents)
        for seed in (1, 2):  # new inputs each replay: the captured buffers must be refilled
            primals, tangents = _inputs(seed)
            out, tout = graphed(primals, tangents)
            ref, tref = facm_ext.jvp(func, primals, tangents)
            assert rel_err(out, ref) <= TOLERANCE[precision]
            assert rel_err(tout, tref) <= TOLERANCE[precision]
    assert not graphed.grad


@requires_cuda
@pytest.mark.parametrize("precision", sorted(TOLERANCE))
def test_graph_grad_matches_eager(precision):
    model, func = _model_and_func()

    def loss(out, tout):
        return (out.float() - (out.detach().float() - 0.5 * tout.float())).square().mean()

    primals, tangents = _inputs(0)
    with _context(precision):
        graphed = facm_ext.jvp.graph(func, primals, tangents, module=model)
    model.zero_grad(set_to_none=True)
    assert graphed.grad
    for seed in (1, 2):
        primals, tangents = _inputs(seed)
        with _context(precision):
            out, tout = graphed(primals, tangents)
        assert out.requires_grad and not tout.requires_grad
        loss(out, tout).backward()
        grads = _grads(model)
        with _context(precision):
            ref, tref = facm_ext.jvp(func, primals, tangents)
        loss(ref, tref).backward()
        ref_grads = _grads(model)
        assert rel_err(out.detach(), ref.detach()) <= TOLERANCE[precision]
        assert rel_err(tout, tref) <= TOLERANCE[precision]
        for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
            assert rel_err(g, r) <= 10 * TOLERANCE[precision], name


@requires_cuda
def test_graph_rejects_other_shapes():
    model, func = _model_and_func()
    primals, tangents = _inputs(0)
    with torch.no_grad():
        graphed = facm_ext.jvp.graph(func, primals, tangents)
        with pytest.raises(ValueError, match="input 0"):
            graphed((primals[0][:2], primals[1]), tangents)
        with pytest.raises(ValueError, match="tensors"):
            facm_ext.jvp.graph(func, primals, (tangents[0], None))
        with pytest.raises(ValueError, match="CUDA tensors"):
            facm_ext.jvp.graph(func, (primals[0].cpu(), primals[1]), tangents)


def test_graphed_student_jvp_rejects_other_functions():
    from facm_ext import facm

    model = torch.nn.Linear(3, 3)
    jvp_fn = facm.GraphedStudentJVP(model)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="func"):
        jvp_fn(lambda a: model(a), (x,), (x,))
    with pytest.raises(ValueError, match="func"):
        jvp_fn(facm.ConditionedModel(torch.nn.Linear(3, 3), torch.zeros(2, dtype=torch.long)), (x,), (x,))


@requires_cuda
def test_graphed_student_jvp_matches_eager_facm_loss():
    """Two FACM steps' losses and gradients: the graphed student JVP against facm_ext.jvp, new labels each step."""
    from facm_ext import facm

    model = _model()
    jvp_fn = facm.GraphedStudentJVP(model)
    for seed in (1, 2, 3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(3, 4, 4, 4, device="cuda", generator=gen)
        noise = torch.randn(x.shape, device="cuda", generator=gen)
        y = torch.randint(0, 10, (3,), device="cuda", generator=gen)
        t = torch.rand(3, device="cuda", generator=gen)
        results = []
        for fn in (jvp_fn, facm_ext.jvp):
            with _context("fp32"):
                out = facm.facm_loss(model, x, y, t=t, noise=noise, null_class=10, jvp_fn=fn)
            out["loss"].backward()
            results.append((out["loss"].detach(), _grads(model)))
        (loss, grads), (ref_loss, ref_grads) = results
        assert rel_err(loss, ref_loss) <= 1e-4
        for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
            assert rel_err(g, r) <= 1e-3, name
