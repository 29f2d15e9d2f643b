"""Shared test helpers: per-dtype tolerances, relative errors, CUDA skips, non-contiguous views."""

from __future__ import annotations

import pytest
import torch

# Relative error ||out - ref|| / ||ref|| allowed against a float64 reference, per compute dtype of the op under test.
# fp32 inputs: fp32 math (1e-5); fp16/bf16 inputs: one rounding of the output to the storage dtype dominates.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / max(||ref||, tiny), computed in float64; NaN anywhere gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / max(denom, 1e-30)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, what: str = "", factor: float = 1.0):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"


def randomize_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, scaled by fan-in (the zero adaLN init of DiT-style models would make outputs and
    tangents trivially zero). Returns the module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 16
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5))
    return module


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other element of a twice-as-wide buffer)."""
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = buf[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a view whose data pointer is one element past a 16-byte boundary (defeats the
    kernels' 16-byte vector path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests skipped for want of CUDA are the GPU tests: mark them ``gpu`` so `-m gpu` selects exactly them."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if mark.kwargs.get("reason") == "needs a CUDA device":
                item.add_marker(pytest.mark.gpu)
                break
