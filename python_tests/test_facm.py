"""FACM objective and samplers against direct transcriptions of docs/facm_method.md (float64, torch.func.jvp)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from facm_ext import facm
from conftest import requires_cuda

NUM_CLASSES = 5
NULL = NUM_CLASSES


class ToyVelocityNet(nn.Module):
    """A small network nonlinear in x, t and y with the model calling convention ``model(x, t, y)``.

    x [B, C, H, W], t [B], y [B] long -> [B, C, H, W]. ``out_scale`` makes outputs large enough that the CM clamp
    engages for part of the elements."""

    def __init__(self, channels=3, hidden=8, out_scale=3.0):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(NUM_CLASSES + 1, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.out_scale = out_scale

    def forward(self, x, t, y):
        features = torch.stack([torch.sin(3 * t), torch.cos(2 * t)], dim=-1)
        cond = self.time_mlp(features) + self.label(y)
        h = torch.tanh(self.conv_in(x) * (1 + cond[:, :, None, None]))
        return self.out_scale * self.conv_out(h)


def _batch(batch=6, channels=3, size=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=g, dtype=dtype)
    noise = torch.randn(batch, channels, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    # Times on both sides of the guidance interval's lower bound, one exactly on it, one at 1.
    t = torch.tensor([0.05, 0.125, 0.3, 0.6, 0.9, 1.0], dtype=dtype)[:batch]
    return x, y, t, noise


# ---------------------------------------------------------------------------------- transcription of the spec
def transcribed_velocity(teacher, x_t, t, y, w, low, high):
    with torch.no_grad():
        v_c = teacher(x_t, t, y)
        v_u = teacher(x_t, t, torch.full_like(y, NULL))
        guided = v_u + w * (v_c - v_u)
        use = ((t >= low) & (t <= high)).view(-1, 1, 1, 1)
        return torch.where(use, guided, v_c)


def transcribed_fm(pred, v):
    mse = ((pred - v) ** 2).mean(dim=(1, 2, 3))
    cos = (pred * v).sum(dim=1) / (pred.norm(dim=1) * v.norm(dim=1))
    return mse + (1 - cos).mean(dim=(1, 2))


def transcribed_facm(model, teacher, x, y, t, noise, w=1.75, low=0.125, high=1.0, fm_weight=1.0):
    """docs/facm_method.md, line by line."""
    tt = t.view(-1, 1, 1, 1)
    x_t = tt * x + (1 - tt) * noise
    if teacher is None:
        with torch.no_grad():
            v_c = x - noise
            v_u = model(x_t, t, torch.full_like(y, NULL))
            use = ((t >= low) & (t <= high)).view(-1, 1, 1, 1)
            v = torch.where(use, v_u + w * (v_c - v_u), v_c)
    else:
        v = transcribed_velocity(teacher, x_t, t, y, w, low, high)
    L_fm = transcribed_fm(model(x_t, 2 - t, y), v)
    F, dF = torch.func.jvp(lambda a, b: model(a, b, y), (x_t, t), (v, torch.ones_like(t)))
    dF = dF.detach()
    F_ = F.detach()
    T = v + (1 - tt) * dF
    g = F_ - T
    alpha = 1 - tt ** 0.5
    target = F_ - alpha * torch.clamp(g, -1, 1)
    beta = torch.cos(math.pi * t / 2)
    e = ((F - target) ** 2).mean(dim=(1, 2, 3))
    L_cm = beta * e / torch.sqrt(e + 1e-3).detach()
    return {"loss": L_cm.mean() + fm_weight * L_fm.mean(), "cm": L_cm.mean(), "fm": L_fm.mean(),
            "clamped": (g.abs() > 1).double().mean().item()}


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


# ------------------------------------------------------------------------------------------------------ tests
def test_sample_t_default_is_arctan_lognormal():
    g = torch.Generator().manual_seed(0)
    t = facm.sample_t(200_000, generator=g)
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    # median of 1 - 2/pi arctan(exp(N * 1.6 - 0.8)) is 1 - 2/pi arctan(exp(-0.8))
    expected_median = 1 - 2 / math.pi * math.atan(math.exp(-0.8))
    assert abs(t.median().item() - expected_median) < 5e-3
    # the exact transform of the same normal draw
    normal = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direct = 1 - torch.arctan(torch.exp(normal * 1.6 - 0.8)) * 2 / math.pi
    torch.testing.assert_close(t, direct.float())


def test_sample_t_logit_normal_and_determinism():
    a = facm.sample_t(1000, generator=torch.Generator().manual_seed(3), kind="logit_normal", mean=0.2, std=1.0)
    b = facm.sample_t(1000, generator=torch.Generator().manual_seed(3), kind="logit_normal", mean=0.2, std=1.0)
    assert torch.equal(a, b)
    normal = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(a, (1 - torch.sigmoid(normal + 0.2)).float())


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=4, std=0.0), dict(n=4, kind="uniform"), dict(n=4, mean=math.nan)])
def test_sample_t_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        facm.sample_t(**bad)


def test_teacher_velocity_guidance_interval():
    torch.manual_seed(0)
    teacher = ToyVelocityNet().double()
    x, y, t, noise = _batch()
    tt = t.view(-1, 1, 1, 1)
    x_t = tt * x + (1 - tt) * noise
    v = facm.teacher_velocity(teacher, x_t, t, y, cfg_scale=1.75, guidance_interval=(0.125, 1.0), null_class=NULL)
    v_c = teacher(x_t, t, y)
    v_u = teacher(x_t, t, torch.full_like(y, NULL))
    assert not v.requires_grad
    torch.testing.assert_close(v[0], v_c[0], rtol=1e-12, atol=1e-12)  # t = 0.05 < 0.125: no guidance
    guided = v_u + 1.75 * (v_c - v_u)
    torch.testing.assert_close(v[1:], guided[1:], rtol=1e-12, atol=1e-12)  # bounds inclusive
    assert (guided[0] - v_c[0]).abs().max() > 1e-3  # guidance does change the excluded sample
    # cfg_scale 1: the conditional velocity
    torch.testing.assert_close(facm.teacher_velocity(teacher, x_t, t, y, cfg_scale=1.0), v_c)


@pytest.mark.parametrize("fm_weight", [1.0, 0.0])
def test_facm_loss_matches_transcription_distill(fm_weight):
    torch.manual_seed(0)
    model, teacher = ToyVelocityNet().double(), ToyVelocityNet().double()
    x, y, t, noise = _batch()
    ref = transcribed_facm(model, teacher, x, y, t, noise, fm_weight=fm_weight)
    assert 0.05 < ref["clamped"] < 0.95, "the fixed inputs must exercise both sides of clamp(g, -1, 1)"
    out = facm.facm_loss(model, x, y, t=t, noise=noise, teacher=teacher, null_class=NULL, fm_weight=fm_weight,
                         jvp_fn=torch.func.jvp)
    for key in ("loss", "cm", "fm"):
        if key == "fm" and fm_weight == 0:
            assert out["fm"].item() == 0.0
            continue
        torch.testing.assert_close(out[key], ref[key], rtol=1e-12, atol=1e-14, msg=key)
    for got, want in zip(_grads(model, out["loss"]), _grads(model, ref["loss"])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert all(p.grad is None for p in teacher.parameters())


def test_facm_loss_from_scratch_and_recompute_primal():
    torch.manual_seed(0)
    model = ToyVelocityNet().double()
    x, y, t, noise = _batch()
    ref = transcribed_facm(model, None, x, y, t, noise)
    out = facm.facm_loss(model, x, y, t=t, noise=noise, null_class=NULL, jvp_fn=torch.func.jvp)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-12, atol=1e-14)
    hybrid = facm.facm_loss(model, x, y, t=t, noise=noise, null_class=NULL, jvp_fn=torch.func.jvp,
                            recompute_primal=True)
    torch.testing.assert_close(hybrid["loss"], ref["loss"], rtol=1e-12, atol=1e-14)
    for got, want in zip(_grads(model, hybrid["loss"]), _grads(model, ref["loss"])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_facm_loss_gradient_only_through_primal():
    """Changing the tangent's scale must not change the gradient's dependence on dF through anything but the target:
    the gradient equals d/dtheta of beta*e/sqrt(e+c) with the target held fixed."""
    torch.manual_seed(0)
    model, teacher = ToyVelocityNet().double(), ToyVelocityNet().double()
    x, y, t, noise = _batch()
    out = facm.facm_loss(model, x, y, t=t, noise=noise, teacher=teacher, null_class=NULL, fm_weight=0.0,
                         jvp_fn=torch.func.jvp)
    tt = t.view(-1, 1, 1, 1)
    x_t = tt * x + (1 - tt) * noise
    v = transcribed_velocity(teacher, x_t, t, y, 1.75, 0.125, 1.0)
    with torch.no_grad():
        F, dF = torch.func.jvp(lambda a, b: model(a, b, y), (x_t, t), (v, torch.ones_like(t)))
        target = F - (1 - tt ** 0.5) * torch.clamp(F - v - (1 - tt) * dF, -1, 1)
    F_live = model(x_t, t, y)
    e = ((F_live - target) ** 2).mean(dim=(1, 2, 3))
    fixed = (torch.cos(math.pi * t / 2) * e / torch.sqrt(e.detach() + 1e-3)).mean()
    for got, want in zip(_grads(model, out["loss"]), _grads(model, fixed)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_stage1_loss_matches_transcription():
    torch.manual_seed(0)
    seen = []

    class Recording(ToyVelocityNet):
        def forward(self, x, t, y):
            seen.append(t.detach().clone())
            return super().forward(x, t, y)

    model = Recording().double()
    x, y, _, noise = _batch(batch=5)
    t = torch.tensor([0.1, 0.4, 0.5, 0.7, 0.95], dtype=torch.float64)
    out = facm.stage1_loss(model, x, y, t=t, noise=noise)
    torch.testing.assert_close(seen[0], torch.tensor([0.1, 0.4, 0.5, 2 - 0.7, 2 - 0.95], dtype=torch.float64))
    tt = t.view(-1, 1, 1, 1)
    x_t = tt * x + (1 - tt) * noise
    cond = torch.cat([t[:3], 2 - t[3:]])
    per = transcribed_fm(model(x_t, cond, y), x - noise)
    torch.testing.assert_close(out["loss"], per.mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["low"], per[:3].mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["high"], per[3:].mean(), rtol=1e-12, atol=1e-14)


def test_stage1_loss_expanded_mask():
    torch.manual_seed(0)
    model = ToyVelocityNet().double()
    x, y, _, noise = _batch(batch=4)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    expanded = torch.tensor([True, False, True, False])
    out = facm.stage1_loss(model, x, y, t=t, noise=noise, expanded=expanded)
    tt = t.view(-1, 1, 1, 1)
    per = transcribed_fm(model(tt * x + (1 - tt) * noise, torch.where(expanded, 2 - t, t), y), x - noise)
    torch.testing.assert_close(out["loss"], per.mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["high"], per[expanded].mean(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="expanded"):
        facm.stage1_loss(model, x, y, t=t, noise=noise, expanded=torch.ones(4))


class AffineNet(nn.Module):
    """F(x, t, y) = a x + b t + c y, with the calls recorded: the samplers' arithmetic can be written by hand."""

    def __init__(self, a=0.5, b=2.0, c=0.25):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        return self.a * x + self.b * t.view(-1, 1, 1, 1) + self.c * y.view(-1, 1, 1, 1).to(x.dtype)


def test_consistency_sampler_arithmetic():
    net = AffineNet()
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 4])
    yb = y.view(-1, 1, 1, 1).double()
    one = facm.sample(net, noise, y, steps=1)
    torch.testing.assert_close(one, noise + (0.5 * noise + 0.25 * yb), rtol=0, atol=1e-14)
    assert torch.equal(net.calls[0][0], torch.zeros(3, dtype=torch.float64))

    net.calls.clear()
    two = facm.sample(net, noise, y, steps=2, generator=torch.Generator().manual_seed(7))
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_hat0 = noise + (0.5 * noise + 0.25 * yb)
    x1 = 0.5 * x_hat0 + 0.5 * fresh
    expected = x1 + 0.5 * (0.5 * x1 + 2.0 * 0.5 + 0.25 * yb)
    torch.testing.assert_close(two, expected, rtol=0, atol=1e-13)
    assert [c[0][0].item() for c in net.calls] == [0.0, 0.5]

    net.calls.clear()
    facm.sample(net, noise, y, steps=4, generator=torch.Generator().manual_seed(7))
    assert [c[0][0].item() for c in net.calls] == [0.0, 0.25, 0.5, 0.75]


def test_consistency_sampler_uses_fresh_noise_each_step():
    net = AffineNet()
    noise = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1])
    a = facm.sample(net, noise, y, steps=3, generator=torch.Generator().manual_seed(1))
    b = facm.sample(net, noise, y, steps=3, generator=torch.Generator().manual_seed(2))
    c = facm.sample(net, noise, y, steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, c) and not torch.allclose(a, b)


def test_flow_sampler_arithmetic():
    net = AffineNet(a=0.0, b=1.0, c=0.0)  # v = condition: x1 = x0 + sum_i dt * (2 - t_i)
    noise = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([2, 3])
    out = facm.sample_flow(net, noise, y, steps=4)
    expected = noise + sum(0.25 * (2 - t) for t in (0.0, 0.25, 0.5, 0.75))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)
    assert [c[0][0].item() for c in net.calls] == [2.0, 1.75, 1.5, 1.25]

    # guidance: v = v_u + w (v_c - v_u) at steps inside the interval, v_c outside
    net = AffineNet(a=0.0, b=0.0, c=1.0)
    out = facm.sample_flow(net, noise, y, steps=2, cfg_scale=2.0, guidance_interval=(0.25, 1.0), null_class=NULL)
    yb = y.view(-1, 1, 1, 1).double()
    guided = NULL + 2.0 * (yb - NULL)
    torch.testing.assert_close(out, noise + 0.5 * yb + 0.5 * guided, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kwargs, match", [
    (dict(t=torch.rand(3)), "t: expected"),
    (dict(noise=torch.randn(4, 3, 5, 4)), "noise: expected"),
    (dict(fm_weight=-1.0), "fm_weight"),
    (dict(cfg_scale=2.0, null_class=None), "null_class"),
    (dict(guidance_interval=(0.9, 0.1)), "guidance_interval"),
    (dict(p=0.0), "p: expected"),
])
def test_facm_loss_rejects_bad_inputs(kwargs, match):
    model = ToyVelocityNet().double()
    x, y, t, noise = _batch(batch=4)
    args = dict(t=t, noise=noise, null_class=NULL, jvp_fn=torch.func.jvp)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        facm.facm_loss(model, x, y, **args)


def test_samplers_reject_bad_inputs():
    net = AffineNet()
    with pytest.raises(ValueError, match="steps"):
        facm.sample(net, torch.randn(2, 1, 3, 3), torch.tensor([0, 1]), steps=0)
    with pytest.raises(ValueError, match="y: expected"):
        facm.sample_flow(net, torch.randn(2, 1, 3, 3), torch.tensor([0, 1, 2]), steps=2)


def test_facm_loss_with_fused_jvp_on_lightningdit_matches_transcription():
    """The default path: facm_ext.jvp through an unmodified LightningDiT, against the float64 transcription with
    torch.func.jvp (math attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import facm_ext.jvp as fused
    from facm_ext.models import LightningDiT

    torch.manual_seed(0)
    cfg = dict(input_size=4, patch_size=1, in_channels=3, hidden_size=32, depth=2, num_heads=2,
               num_classes=NUM_CLASSES)
    model, teacher = LightningDiT(**cfg).double(), LightningDiT(**cfg).double()
    with torch.no_grad():  # adaLN-Zero would make both networks output zeros
        for p in list(model.parameters()) + list(teacher.parameters()):
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (6,), generator=g)
    t = torch.tensor([0.05, 0.125, 0.3, 0.6, 0.9, 1.0], dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        ref = transcribed_facm(model, teacher, x, y, t, noise)
        ref_grads = _grads(model, ref["loss"])
    out = facm.facm_loss(model, x, y, t=t, noise=noise, teacher=teacher, null_class=NULL, jvp_fn=fused.jvp)
    for key in ("loss", "cm", "fm"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    for got, want in zip(_grads(model, out["loss"]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


@requires_cuda
def test_facm_loss_bf16_autocast_on_gpu_fused_vs_official_path():
    """GPU, LightningDiT (head_dim 72 as XL), fp32 weights + bf16 autocast as FACM trains: the fused path
    (facm_ext.jvp) against the official path (torch.func.jvp, math attention) on the same inputs."""
    import facm_ext.jvp as fused
    from facm_ext.models import LightningDiT

    torch.manual_seed(0)
    model = LightningDiT(input_size=8, in_channels=4, hidden_size=144, depth=3, num_heads=2,
                         num_classes=NUM_CLASSES).cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    teacher = LightningDiT(input_size=8, in_channels=4, hidden_size=144, depth=3, num_heads=2,
                           num_classes=NUM_CLASSES).cuda()
    teacher.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, noise = (torch.randn(16, 4, 8, 8, generator=g).cuda() for _ in range(2))
    y = torch.randint(0, NUM_CLASSES, (16,), generator=g).cuda()
    t = facm.sample_t(16, generator=g).cuda()
    def run(jvp_fn, net, net_teacher, tensors, autocast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = facm.facm_loss(net, tensors[0], y, t=tensors[1], noise=tensors[2], teacher=net_teacher,
                                 null_class=NULL, jvp_fn=jvp_fn)
        return out, torch.cat([g.flatten().double() for g in _grads(net, out["loss"])])

    got, got_grads = run(fused.jvp, model, teacher, (x, t, noise), True)
    floor = 0.0  # absolute precision floor of the comparison, beyond the 3% relative tolerance
    try:
        ref, ref_grads = run(facm.torch_func_jvp, model, teacher, (x, t, noise), True)
    except RuntimeError as exc:
        # The official path (torch.func.jvp with grad, math attention) fails under bf16 autocast on torch 2.11 CUDA
        # in softmax's backward ("expected input and grad types to match"); compare with it in float64 instead.
        if "expected input and grad types to match" not in str(exc):
            raise
        import copy

        model64, teacher64 = copy.deepcopy(model).double(), copy.deepcopy(teacher).double()
        ref, ref_grads = run(facm.torch_func_jvp, model64, teacher64, (x.double(), t.double(), noise.double()), False)
        # The FM term has no JVP in it (the same plain forward in both paths), so its bf16-vs-float64 gap is the
        # rounding floor of this comparison; the loss may differ from float64 by that much on top of 3%.
        floor = abs(got["fm"].item() - ref["fm"].item())
        assert floor <= 0.25 * abs(ref["fm"].item()), ("fm (no JVP)", got["fm"].item(), ref["fm"].item())
    for key in ("loss", "cm") if floor else ("loss", "cm", "fm"):
        assert abs(got[key].item() - ref[key].item()) <= 3e-2 * abs(ref[key].item()) + 1e-6 + floor, key
    cosine = torch.nn.functional.cosine_similarity(got_grads.double(), ref_grads.double(), dim=0).item()
    assert cosine > 0.99, cosine


def test_torch_func_jvp_is_the_official_unfused_path():
    """facm.torch_func_jvp (unfused attention, as the reference code's disable_fused_attn) equals torch.func.jvp
    with SDPA's math backend, and restores F.scaled_dot_product_attention, also after an error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from facm_ext.models import LightningDiT

    torch.manual_seed(0)
    model = LightningDiT(input_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                         num_classes=NUM_CLASSES).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x, v = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t, y = torch.rand(3, dtype=torch.float64), torch.tensor([0, 1, 2])
    func = lambda a, b: model(a, b, y)  # noqa: E731
    original = torch.nn.functional.scaled_dot_product_attention
    out, tangent = facm.torch_func_jvp(func, (x, t), (v, torch.ones_like(t)))
    with sdpa_kernel(SDPBackend.MATH):
        ref, ref_tangent = torch.func.jvp(func, (x, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-12, atol=1e-12)
    assert torch.nn.functional.scaled_dot_product_attention is original
    with pytest.raises(ValueError, match="x: expected"):
        facm.torch_func_jvp(lambda a, b: model(a[:, :1], b, y), (x, t), (v, torch.ones_like(t)))
    assert torch.nn.functional.scaled_dot_product_attention is original


@pytest.mark.parametrize("fm_weight", [1.0, 0.5, 0.0])
def test_facm_loss_split_backward_gives_the_same_gradients(fm_weight):
    torch.manual_seed(0)
    model, teacher = ToyVelocityNet().double(), ToyVelocityNet().double()
    x, y, t, noise = _batch()
    kwargs = dict(t=t, noise=noise, teacher=teacher, null_class=NULL, fm_weight=fm_weight, jvp_fn=torch.func.jvp)
    joint = facm.facm_loss(model, x, y, **kwargs)
    want = _grads(model, joint["loss"])
    model.zero_grad(set_to_none=True)
    split = facm.facm_loss(model, x, y, backward=True, **kwargs)
    assert not split["loss"].requires_grad
    torch.testing.assert_close(split["loss"], joint["loss"].detach(), rtol=1e-14, atol=0)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)


def test_facm_loss_accepts_a_compiled_fm_model():
    """A torch.compile'd module has no truth value (OptimizedModule.__len__ raises): fm_model must be tested
    against None, never by truthiness."""

    class Unsized(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

        def __len__(self):
            raise TypeError("no len()")

    from facm_ext.models import LightningDiT

    torch.manual_seed(0)
    model = LightningDiT(input_size=8, in_channels=4, hidden_size=48, depth=1, num_heads=2, num_classes=NUM_CLASSES)
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    y, t = torch.tensor([0, 1]), torch.tensor([0.3, 0.8])
    out = facm.facm_loss(model, x, y, t=t, noise=noise, null_class=NULL, fm_model=Unsized(model),
                         jvp_fn=facm.torch_func_jvp)
    assert torch.isfinite(out["loss"])
