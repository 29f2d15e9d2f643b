"""The FACM training objective (Peng et al., "Flow-Anchored Consistency Models"), written to match the behaviour of
the public reference code (ali-vilab/FACM, ``losses.py``) as summarised in docs/facm_method.md.

Conventions (all functions):
- Linear interpolant with t = 0 at noise and t = 1 at data: ``x_t = t * x + (1 - t) * noise``; the conditional
  velocity is ``x - noise``.
- ``model(x, t, y)`` is the network's calling convention: x ``[B, C, H, W]`` float, t ``[B]`` float (raw time
  condition, no x1000), y ``[B]`` long (``y == null_class`` is the unconditional label). It returns a velocity of
  x's shape. The CM branch sees condition t in [0, 1], the FM branch condition ``2 - t`` in [1, 2].
- Every random quantity (t, noise, label drops) is an argument, so each loss is a deterministic function of its
  inputs; the trainer draws them.
- ``t`` is per sample, shape ``[B]``, and is broadcast over ``[C, H, W]``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

JvpFn = Callable  # jvp_fn(func, primals, tangents) -> (primal_out, tangent_out), like torch.func.jvp


class ConditionedModel:
    """``(x, t) -> model(x, t, y)``: the function facm_loss differentiates, with its model and labels in view so a
    jvp_fn can see which network and which labels it is called for (:class:`GraphedStudentJVP` does)."""

    def __init__(self, model, y: torch.Tensor):
        self.model, self.y = model, y

    def __call__(self, x_in, t_in):
        return self.model(x_in, t_in, self.y)


class GraphedStudentJVP:
    """A ``jvp_fn`` for :func:`facm_loss` that replays the student's JVP from a CUDA graph (``facm_ext.jvp.graph``,
    grad mode: forward and backward captured), for batch sizes where the eager transform leaves the GPU waiting on
    the host. The graph is captured on the first call; every call must have the same shapes and run under the
    same autocast, with ``cache_enabled=False``. The labels of each call are copied into the captured buffer.

    Args:
        model: the student (an nn.Module without hooks: not for FSDP, use facm_ext.chain there).
    """

    def __init__(self, model):
        self.model = model
        self._graphed = None
        self._labels = None

    def __call__(self, func, primals, tangents):
        if not isinstance(func, ConditionedModel) or func.model is not self.model:
            raise ValueError("func: GraphedStudentJVP replays the JVP of its own model as facm_loss calls it "
                             "(a ConditionedModel of that model)")
        if self._graphed is None:
            import facm_ext.jvp as transform

            self._labels = func.y.clone()
            labels, model = self._labels, self.model
            self._graphed = transform.graph(lambda x_in, t_in: model(x_in, t_in, labels), primals, tangents,
                                            module=model)
        if func.y.shape != self._labels.shape:
            raise ValueError(f"y: expected the captured shape {tuple(self._labels.shape)}, got {tuple(func.y.shape)}")
        self._labels.copy_(func.y)
        return self._graphed(primals, tangents)


# ------------------------------------------------------------------------------------------------------------ checks
def _check_batch(x, y, t, noise, *, name_t: str = "t"):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating [B, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batch = x.shape[0]
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != batch or y.is_floating_point():
        raise ValueError(f"y: expected integer class labels of shape [{batch}], got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if not isinstance(t, torch.Tensor) or t.shape != (batch,) or not t.is_floating_point():
        raise ValueError(f"{name_t}: expected a floating tensor of shape [{batch}] (one time per sample), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != x.shape):
        raise ValueError(f"noise: expected a tensor of x's shape {tuple(x.shape)}, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")


def _check_guidance(cfg_scale, guidance_interval, null_class):
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale: expected a finite number >= 0, got {cfg_scale!r}")
    try:
        low, high = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval: expected a pair (low, high), got {guidance_interval!r}") from None
    if not low <= high:
        raise ValueError(f"guidance_interval: expected low <= high, got {guidance_interval!r}")
    if cfg_scale != 1.0 and (not isinstance(null_class, int) or isinstance(null_class, bool) or null_class < 0):
        raise ValueError(f"null_class: expected the index of the unconditional label (int >= 0) when "
                         f"cfg_scale != 1, got {null_class!r}")
    return low, high


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample t [B] -> [B, 1, 1, ...] so that it broadcasts over the non-batch dimensions of ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _unfused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """The reference code's attention with ``fused_attn`` off: ``softmax(q * scale @ k^T) @ v`` in plain ops.
    Masked, causal, dropout or GQA calls go to SDPA's math backend instead."""
    if attn_mask is not None or dropout_p or is_causal or kwargs.get("enable_gqa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, **kwargs)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    attn = (query * scale) @ key.transpose(-2, -1)
    return attn.softmax(dim=-1) @ value


_SDPA = F.scaled_dot_product_attention


def torch_func_jvp(func, primals, tangents):
    """``torch.func.jvp`` as the reference FACM code runs it: eager, with attention unfused
    (``model.disable_fused_attn()``: ``softmax(q k^T * scale) @ v`` in plain ops; no SDPA backend but math has a
    forward-mode rule, and under bf16 autocast the softmax then runs in float32 as in the reference). Same signature
    and results as ``torch.func.jvp``; ``F.scaled_dot_product_attention`` is swapped only during the call."""
    F.scaled_dot_product_attention = _unfused_attention
    try:
        return torch.func.jvp(func, primals, tangents)
    finally:
        F.scaled_dot_product_attention = _SDPA


def _default_jvp() -> JvpFn:
    import facm_ext.jvp as fused_jvp

    return fused_jvp.jvp


# ------------------------------------------------------------------------------------------------------ time sampling
def sample_t(n: int, *, generator: torch.Generator | None = None, mean: float = -0.8, std: float = 1.6,
             kind: str = "arctan", device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample training times, shape ``[n]``.

    kind="arctan" (the default, FACM's "default" sampler): ``sigma = exp(N(0, 1) * std + mean)``,
    ``t = 1 - (2 / pi) * arctan(sigma)``; median t = 1 - (2/pi) arctan(e^mean), about 0.73 for mean = -0.8.
    kind="logit_normal": ``t = 1 - sigmoid(N(0, 1) * std + mean)``.
    (The reference code's ``--mean 0.8`` enters as ``-mean``; here ``mean`` is the location itself.)
    The normal draw happens in float64 on the CPU with ``generator`` (a CPU generator), so the same seed gives the
    same times on every device.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ValueError(f"std: expected a finite number > 0, got {std!r}")
    if not (isinstance(mean, (int, float)) and math.isfinite(mean)):
        raise ValueError(f"mean: expected a finite number, got {mean!r}")
    normal = torch.randn(n, generator=generator, dtype=torch.float64)
    z = normal * std + mean
    if kind == "arctan":
        t = 1.0 - torch.arctan(z.exp()) * (2.0 / math.pi)
    elif kind == "logit_normal":
        t = 1.0 - torch.sigmoid(z)
    else:
        raise ValueError(f"kind: expected 'arctan' or 'logit_normal', got {kind!r}")
    return t.to(device=device, dtype=dtype)


def drop_labels(y: torch.Tensor, *, prob: float, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``prob`` (classifier-free guidance training).

    y: ``[B]`` long. The uniform draw is on the CPU with ``generator``. Returns a new ``[B]`` long tensor.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob: expected a probability in [0, 1], got {prob!r}")
    drop = torch.rand(y.shape[0], generator=generator) < prob
    return torch.where(drop.to(y.device), torch.full_like(y, null_class), y)


# ---------------------------------------------------------------------------------------------------- loss pieces
def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample FM loss ``mean_{C,H,W}(pred - target)^2 + mean_{H,W}(1 - cos_C(pred, target))``, shape ``[B]``.

    pred, target: ``[B, C, H, W]``; the cosine similarity is along channels only (dim 1, eps 1e-8 as
    F.cosine_similarity).
    """
    dims = tuple(range(1, pred.dim()))
    mse = ((pred - target) ** 2).mean(dim=dims)
    cos = F.cosine_similarity(pred, target, dim=1)
    return mse + (1.0 - cos).mean(dim=tuple(range(1, cos.dim())))


def adaptive_l2(pred: torch.Tensor, target: torch.Tensor, *, p: float = 0.5, c: float = 1e-3) -> torch.Tensor:
    """Per-sample adaptively weighted squared error ``e / (e + c)^p`` with the weight detached, shape ``[B]``;
    ``e = mean_{C,H,W}(pred - target)^2``. FACM's CM loss uses p = 0.5, MeanFlow p = 1."""
    e = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim())))
    return e / (e + c).pow(p).detach()


# ------------------------------------------------------------------------------------------------ teacher velocity
@torch.no_grad()
def teacher_velocity(teacher, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, cfg_scale: float = 1.75,
                     guidance_interval=(0.125, 1.0), null_class: int | None = None,
                     conditional_velocity: torch.Tensor | None = None) -> torch.Tensor:
    """The guided velocity target ``v = v_u + w * (v_c - v_u)``, shape of x_t, no graph.

    teacher: ``teacher(x, t, y)`` queried at condition t (the CM interval); x_t ``[B, C, H, W]``; t ``[B]``;
    y ``[B]`` long. ``v_c = teacher(x_t, t, y)``, or ``conditional_velocity`` when given (training from scratch:
    ``x - noise``, with ``teacher`` the student itself for ``v_u``). ``v_u = teacher(x_t, t, null_class)``.
    Samples whose t lies outside ``guidance_interval`` (inclusive bounds) get ``v = v_c``. With ``cfg_scale == 1``
    no unconditional pass runs. Conditional and unconditional passes share one batched call.

    Matches the reference ``get_velocity`` exactly with a teacher (outside the interval it feeds the conditional
    label to both passes, so v = v_c). Without a teacher the reference code's unconditional pass outside the
    interval uses the real label on the student, giving ``v_s + w (x - noise - v_s)`` there; here such samples
    get ``v = x - noise``, as docs/facm_method.md states the rule.
    """
    low, high = _check_guidance(cfg_scale, guidance_interval, null_class)
    _check_batch(x_t, y, t, None, name_t="t")
    guided = cfg_scale != 1.0
    if conditional_velocity is not None:
        if conditional_velocity.shape != x_t.shape:
            raise ValueError(f"conditional_velocity: expected shape {tuple(x_t.shape)}, "
                             f"got {tuple(conditional_velocity.shape)}")
        v_c = conditional_velocity
        if not guided:
            return v_c.detach().clone()
        v_u = teacher(x_t, t, torch.full_like(y, null_class))
    elif guided:
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        v_c, v_u = both.chunk(2)
    else:
        return teacher(x_t, t, y)
    v = v_u + cfg_scale * (v_c - v_u)
    in_interval = _bcast((t >= low) & (t <= high), v)
    return torch.where(in_interval, v, v_c.to(v.dtype))


# ----------------------------------------------------------------------------------------------------------- FACM
def facm_loss(model, x: torch.Tensor, y: torch.Tensor, *, t: torch.Tensor, noise: torch.Tensor, teacher=None,
              cfg_scale: float = 1.75, guidance_interval=(0.125, 1.0), null_class: int | None = None,
              p: float = 0.5, fm_weight: float = 1.0, adaptive_p: float = 0.5, adaptive_c: float = 1e-3,
              jvp_fn: JvpFn | None = None, recompute_primal: bool = False, velocity: torch.Tensor | None = None,
              fm_model=None, backward: bool = False) -> dict:
    """FACM loss for one batch. Returns ``dict(loss=scalar, cm=scalar, fm=scalar)`` (cm and fm are batch means;
    ``loss = cm + fm_weight * fm`` carries the gradient for ``model``'s parameters).

    Args:
      model: the student, ``model(x, t, y)``; gets the gradient.
      x: data ``[B, C, H, W]`` (float); y: labels ``[B]`` long; t: times ``[B]`` in [0, 1] (x's dtype);
      noise: ``[B, C, H, W]``, x's shape.
      teacher: frozen FM model ``teacher(x, t, y)`` (distillation). None: train from scratch with
        ``v_c = x - noise`` and the student itself (no grad) for the unconditional velocity.
      cfg_scale, guidance_interval, null_class: guidance of the target velocity (see :func:`teacher_velocity`).
      p: exponent of the relaxation ``alpha = 1 - t^p`` (the reference code's ``--p``, 0.5).
      fm_weight: weight of the FM anchor (1 in the paper; 0 gives the "no anchor" ablation, and skips the FM pass).
      adaptive_p, adaptive_c: adaptive weight ``e / (e + c)^p`` of the CM loss (0.5, 1e-3).
      jvp_fn: forward-mode JVP, ``jvp_fn(func, primals, tangents) -> (out, tangent)`` like ``torch.func.jvp``;
        default ``facm_ext.jvp``. Its primal output must be differentiable.
      recompute_primal: run the JVP under ``no_grad`` and get the differentiable F from a plain forward instead
        (one more forward; for wrappers whose hooks the JVP pass cannot carry gradients through. FSDP2 models need
        not: ``facm_ext.chain`` carries them).
      velocity: precomputed target velocity ``[B, C, H, W]`` (skips :func:`teacher_velocity`; benchmarks).
      fm_model: the callable for the FM forward (default ``model``), e.g. ``torch.compile(model)``: the same
        parameters through a compiled forward, as the reference trainer does.
      backward: run the backward of each part as soon as it is computed (FM part before the JVP pass, then the CM
        part), accumulating into ``.grad``: the same gradients as ``loss.backward()``, but the FM forward's
        activations are freed before the JVP pass allocates its own, so peak memory is the larger of the two
        instead of their sum. The returned values are then detached (call no further backward).

    Formulas (t broadcast per sample over C, H, W):
      x_t = t x + (1 - t) noise;  v = teacher_velocity(...)
      FM:  L_FM = mean_{CHW}(F(x_t, 2 - t) - v)^2 + mean_{HW}(1 - cos_C(F(x_t, 2 - t), v))
      CM:  F, dF = jvp(g, (x_t, t), (v, 1)) with g(x, s) = F(x, s, y);  dF, F_ = stop_grad(dF, F)
           T = v + (1 - t) dF;  g = F_ - T;  alpha = 1 - t^p;  target = F_ - alpha * clamp(g, -1, 1)
           beta = cos(pi t / 2);  e = mean_{CHW}(F - target)^2;  L_CM = beta * e / sqrt(e + 1e-3).detach()
      loss = mean_B(L_CM) + fm_weight * mean_B(L_FM)
    """
    _check_batch(x, y, t, noise)
    if not (isinstance(fm_weight, (int, float)) and math.isfinite(fm_weight) and fm_weight >= 0):
        raise ValueError(f"fm_weight: expected a finite number >= 0, got {fm_weight!r}")
    if not (isinstance(p, (int, float)) and p > 0):
        raise ValueError(f"p: expected a number > 0 (alpha = 1 - t^p), got {p!r}")
    _check_guidance(cfg_scale, guidance_interval, null_class)
    jvp_fn = jvp_fn or _default_jvp()

    tb = _bcast(t, x)
    x_t = tb * x + (1 - tb) * noise
    if velocity is None:
        if teacher is not None:
            v = teacher_velocity(teacher, x_t, t, y, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                                 null_class=null_class)
        else:
            v = teacher_velocity(model, x_t, t, y, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                                 null_class=null_class, conditional_velocity=x - noise)
    else:
        if velocity.shape != x.shape:
            raise ValueError(f"velocity: expected shape {tuple(x.shape)}, got {tuple(velocity.shape)}")
        v = velocity.detach()
    v = v.to(x.dtype)

    def fm_branch():
        # FM anchor at the expanded condition 2 - t; its target is the velocity at the original t.
        if fm_weight <= 0:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        fm_out = flow_matching_loss((fm_model if fm_model is not None else model)(x_t, 2 - t, y), v)
        if backward:
            (fm_weight * fm_out.mean()).backward()
            fm_out = fm_out.detach()
        return fm_out

    # With backward=True the FM part's graph is freed before the JVP pass allocates its own. Otherwise the JVP pass
    # runs first: a jvp_fn that captures a CUDA graph (GraphedStudentJVP) must capture its backward before any
    # other graph through the model's parameters exists, whose gradient accumulators would live on another stream.
    fm = fm_branch() if backward else None

    # CM: one JVP along (dx/dt, dt/dt) = (v, 1); the gradient reaches the parameters only through F.
    g = ConditionedModel(model, y)

    if recompute_primal:
        with torch.no_grad():
            _, dF = jvp_fn(g, (x_t, t), (v, torch.ones_like(t)))
        F_cm = model(x_t, t, y)
    else:
        F_cm, dF = jvp_fn(g, (x_t, t), (v, torch.ones_like(t)))
    dF = dF.detach()
    F_sg = F_cm.detach()
    T = v + (1 - tb) * dF
    gap = F_sg - T
    alpha = 1 - tb ** p
    target = F_sg - alpha * gap.clamp(min=-1, max=1)
    beta = torch.cos(t * (math.pi / 2))
    cm = adaptive_l2(F_cm, target, p=adaptive_p, c=adaptive_c) * beta
    if backward:
        cm.mean().backward()
        cm = cm.detach()
    else:
        fm = fm_branch()

    cm_mean, fm_mean = cm.mean(), fm.mean()
    return {"loss": cm_mean + fm_weight * fm_mean, "cm": cm_mean, "fm": fm_mean}


# -------------------------------------------------------------------------------------------------------- stage 1
def stage1_loss(model, x: torch.Tensor, y: torch.Tensor, *, t: torch.Tensor, noise: torch.Tensor,
                expanded: torch.Tensor | None = None) -> dict:
    """Teacher pretraining with the expanded interval. Returns ``dict(loss=scalar, low=scalar, high=scalar)``.

    x ``[B, C, H, W]``, y ``[B]`` long (label dropout for guidance is applied by the caller, see
    :func:`drop_labels`), t ``[B]`` (uniform in [0, 1]), noise x's shape. The first ``B - B // 2`` samples use
    condition t, the last ``B // 2`` condition ``2 - t`` (or: ``expanded`` ``[B]`` bool marks the samples at
    ``2 - t``, for a batch sliced across ranks); all regress the same velocity ``x - noise`` with
    :func:`flow_matching_loss` (MSE + channel cosine). ``loss`` is the mean over the whole batch; ``low`` and
    ``high`` are the means over each group (0 for an empty group).
    """
    _check_batch(x, y, t, noise)
    if expanded is None:
        expanded = torch.arange(x.shape[0], device=t.device) >= x.shape[0] - x.shape[0] // 2
    elif expanded.shape != t.shape or expanded.dtype != torch.bool:
        raise ValueError(f"expanded: expected a bool tensor of shape {tuple(t.shape)}, got {expanded.dtype} "
                         f"{tuple(expanded.shape)}")
    expanded = expanded.to(t.device)
    tb = _bcast(t, x)
    x_t = tb * x + (1 - tb) * noise
    target = x - noise
    condition = torch.where(expanded, 2 - t, t)
    per_sample = flow_matching_loss(model(x_t, condition, y), target)
    zero = per_sample.new_zeros(())
    low = per_sample[~expanded].mean() if bool((~expanded).any()) else zero
    high = per_sample[expanded].mean() if bool(expanded.any()) else zero
    return {"loss": per_sample.mean(), "low": low, "high": high}


# ------------------------------------------------------------------------------------------------------- MeanFlow
def meanflow_loss(model, x: torch.Tensor, y: torch.Tensor, *, t: torch.Tensor, r: torch.Tensor,
                  noise: torch.Tensor, teacher=None, cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
                  null_class: int | None = None, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                  jvp_fn: JvpFn | None = None) -> dict:
    """MeanFlow loss (Geng et al.) in this library's time convention. Returns ``dict(loss=scalar, cm=scalar,
    fm=scalar)`` (fm is 0: MeanFlow has no anchor; the keys match :func:`facm_loss` for the trainer).

    model: a two-time network ``model(x, t, y, r)`` (see :class:`facm_ext.facm.TwoTimeModel`), the average
    velocity from t to r. x ``[B, C, H, W]``, y ``[B]`` long, t and r ``[B]`` with ``t <= r`` (the caller draws
    two times and sorts them; ``t == r`` gives the plain FM objective for that sample), noise x's shape.
      x_t = t x + (1 - t) noise;  v = teacher_velocity(...) (v_c = x - noise without a teacher)
      u, du = jvp(h, (x_t, t, r), (v, 1, 0)) with h(x, s, q) = model(x, s, y, q)
      target = v + (r - t) * stop_grad(du);  L = e / (e + c)^1 .detach(),  e = mean_{CHW}(u - target)^2
    """
    _check_batch(x, y, t, noise)
    _check_batch(x, y, r, None, name_t="r")
    if bool((r < t).any()):
        raise ValueError("r: expected r >= t for every sample (sort the two drawn times)")
    jvp_fn = jvp_fn or _default_jvp()
    tb, rb = _bcast(t, x), _bcast(r, x)
    x_t = tb * x + (1 - tb) * noise

    if teacher is not None:
        v = teacher_velocity(teacher, x_t, t, y, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                             null_class=null_class)
    else:
        v = teacher_velocity(lambda xi, s, yi: model(xi, s, yi, s), x_t, t, y, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, null_class=null_class,
                             conditional_velocity=x - noise)
    v = v.to(x.dtype)

    def h(x_in, t_in, r_in):
        return model(x_in, t_in, y, r_in)

    u, du = jvp_fn(h, (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    target = v + (rb - tb) * du.detach()
    loss = adaptive_l2(u, target, p=adaptive_p, c=adaptive_c)
    mean = loss.mean()
    return {"loss": mean, "cm": mean, "fm": torch.zeros_like(mean)}
