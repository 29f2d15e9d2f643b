"""Samplers for FACM models: the consistency sampler (CM branch, condition t) and Euler on the FM branch
(condition 2 - t). ``model(x, t, y)`` as in :mod:`facm_ext.facm.objective`; t = 0 is noise, t = 1 is data.

The state is kept in float64 between steps (as the reference sampler does) and cast to the noise dtype for each
model call; results come back in the noise dtype.
"""

from __future__ import annotations

import torch

from facm_ext.facm.objective import _check_guidance


def _check_inputs(noise, y, steps):
    if not isinstance(noise, torch.Tensor) or noise.dim() < 2 or not noise.is_floating_point():
        raise ValueError(f"noise: expected a floating [B, C, H, W] tensor, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if not isinstance(y, torch.Tensor) or y.shape != (noise.shape[0],) or y.is_floating_point():
        raise ValueError(f"y: expected integer labels of shape [{noise.shape[0]}], got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")


def _time(value: float, noise: torch.Tensor) -> torch.Tensor:
    return torch.full((noise.shape[0],), float(value), dtype=noise.dtype, device=noise.device)


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor, steps: int = 1, *,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Consistency sampling with ``steps`` model evaluations (NFE = steps), no guidance.

    noise ``[B, C, H, W]`` (the start point at t = 0), y ``[B]`` long. Grid ``t_i = i / steps``. Each step:
    ``x_hat = x + (1 - t_i) * F(x, t_i, y)``; then, except after the last step, re-noise with fresh noise
    ``eps' ~ N(0, I)`` (drawn on the CPU from ``generator``): ``x = t_{i+1} * x_hat + (1 - t_{i+1}) * eps'``.
    Returns the last ``x_hat``, ``[B, C, H, W]`` in noise's dtype. NFE=1: ``noise + F(noise, 0, y)``.
    """
    _check_inputs(noise, y, steps)
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    x_hat = x
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        velocity = model(x.to(noise.dtype), _time(t_cur, noise), y).to(torch.float64)
        x_hat = x + (1.0 - t_cur) * velocity
        if i + 1 < steps:
            fresh = torch.randn(noise.shape, generator=generator, dtype=torch.float64).to(noise.device)
            x = t_next * x_hat + (1.0 - t_next) * fresh
    return x_hat.to(noise.dtype)


@torch.no_grad()
def sample_flow(model, noise: torch.Tensor, y: torch.Tensor, steps: int, *, cfg_scale: float = 1.0,
                guidance_interval=(0.0, 1.0), null_class: int | None = None) -> torch.Tensor:
    """Euler integration of the FM branch from t = 0 (noise) to t = 1, NFE = steps (x2 where guided).

    noise ``[B, C, H, W]``, y ``[B]`` long. Grid ``t_i = i / steps``; each step
    ``x <- x + (t_{i+1} - t_i) * v`` with ``v = F(x, 2 - t_i, y)``, or with guidance at steps whose t_i lies in
    ``guidance_interval``: ``v = v_u + cfg_scale * (v_c - v_u)``, ``v_u = F(x, 2 - t_i, null_class)``.
    Returns x at t = 1, ``[B, C, H, W]`` in noise's dtype.
    """
    _check_inputs(noise, y, steps)
    low, high = _check_guidance(cfg_scale, guidance_interval, null_class)
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        condition = _time(2.0 - t_cur, noise)
        x_in = x.to(noise.dtype)
        if cfg_scale != 1.0 and low <= t_cur <= high:
            both = model(torch.cat([x_in, x_in]), torch.cat([condition, condition]),
                         torch.cat([y, torch.full_like(y, null_class)])).to(torch.float64)
            v_c, v_u = both.chunk(2)
            velocity = v_u + cfg_scale * (v_c - v_u)
        else:
            velocity = model(x_in, condition, y).to(torch.float64)
        x = x + (t_next - t_cur) * velocity
    return x.to(noise.dtype)
