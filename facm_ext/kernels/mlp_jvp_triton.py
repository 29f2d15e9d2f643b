"""Triton dual GEMM: the primal and tangent rows of a linear layer in one kernel, with an optional activation JVP
in the epilogue. Used by :func:`facm_ext.ops.linear_jvp` (no activation) and :func:`facm_ext.ops.mlp_jvp` (the
up-projection with GELU-tanh or SwiGLU fused, then the down-projection without activation).

Each program owns one [BLOCK_M, BLOCK_N] output tile for BOTH the primal rows x and the tangent rows x': it loads
every W tile once and feeds it to two fp32 accumulators (four for SwiGLU, whose program also owns the matching
columns of the gate half b of the fused weight). Mathematically this is one GEMM over the stacked rows [x; x'].
The epilogue therefore holds the pre-activation h and its tangent h' together and writes act(h) and act'(h) h'
directly; the pre-activation never makes a round trip through memory (it is written only when the primal backward
needs it, exactly what a plain forward's autograd would save).

Two loaders (see :func:`loader`): TMA tensor descriptors (default where the operands qualify; out-of-bounds tiles
arrive zero-filled) and plain pointer loads (any strides, fp32 for the interpreter tests).

Epilogue math (fp32; jvp_math.md):
- gelu_tanh: u = k (h + c h^3), t = tanh u; act = 0.5 h (1 + t); act' = 0.5 (1 + t) + 0.5 h (1 - t^2) k (1 + 3 c h^2)
- swiglu (h = [a | b] split in halves of the fused weight's rows): s = sigmoid(a);
  act = a s b; tangent = s (1 + a (1 - s)) a' b + a s b'
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from facm_ext import _env

ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "swiglu": 2}

def _configs(four_accumulators: bool, pre_hook=None) -> list:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter runs every program in Python: one small config, no tuning.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4,
                              pre_hook=pre_hook)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); the first entry is the untuned choice for small problems.
    if four_accumulators:
        # Four fp32 accumulators per program: keep BLOCK_M * BLOCK_N * 4 / threads <= 128 registers.
        shapes = [(64, 64, 64, 4, 4), (128, 64, 64, 3, 8), (128, 64, 64, 4, 8), (64, 128, 64, 3, 8),
                  (64, 128, 64, 4, 8), (128, 64, 32, 5, 8)]
    else:
        shapes = [(64, 128, 64, 4, 4), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 3, 8),
                  (64, 256, 64, 4, 8), (128, 64, 64, 4, 4), (128, 128, 32, 5, 8)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                          num_warps=warps, pre_hook=pre_hook) for bm, bn, bk, stages, warps in shapes]


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without NaN for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _gelu_tanh_jvp(h, th):
    """fp32 (gelu_tanh(h), gelu_tanh'(h) th); one tanh serves both. Constants inline (k = sqrt(2 / pi),
    c = 0.044715): Triton's interpreter rejects constexpr globals."""
    h2 = h * h
    t = _tanh(0.7978845608028654 * h * (1.0 + 0.044715 * h2))
    out = 0.5 * h * (1.0 + t)
    tout = (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h2)) * th
    return out, tout


@triton.jit
def _swiglu_jvp(a, ta, b, tb):
    """fp32 (silu(a) b, silu'(a) ta b + silu(a) tb) with silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)."""
    s = 1.0 / (1.0 + tl.exp(-a))
    silu = a * s
    return silu * b, s * (1.0 + a * (1.0 - s)) * ta * b + silu * tb


@triton.jit
def _k_step(x_ptrs, tx_ptrs, w_ptrs, g_ptrs, offs_k, k_left, acc, tacc, gacc, tgacc,
            ACTIVATION: tl.constexpr, HAS_TANGENT: tl.constexpr, EVEN_K: tl.constexpr,
            INPUT_PRECISION: tl.constexpr):
    """One BLOCK_K step: the W tile (and the gate tile for SwiGLU) feeds the primal and the tangent accumulators."""
    if EVEN_K:
        x_tile = tl.load(x_ptrs)
        w_tile = tl.load(w_ptrs)
    else:
        k_mask = offs_k < k_left
        x_tile = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
    acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
    if HAS_TANGENT:
        if EVEN_K:
            tx_tile = tl.load(tx_ptrs)
        else:
            tx_tile = tl.load(tx_ptrs, mask=k_mask[None, :], other=0.0)
        tacc = tl.dot(tx_tile, w_tile, tacc, input_precision=INPUT_PRECISION)
    if ACTIVATION == 2:
        if EVEN_K:
            g_tile = tl.load(g_ptrs)
        else:
            g_tile = tl.load(g_ptrs, mask=k_mask[:, None], other=0.0)
        gacc = tl.dot(x_tile, g_tile, gacc, input_precision=INPUT_PRECISION)
        if HAS_TANGENT:
            tgacc = tl.dot(tx_tile, g_tile, tgacc, input_precision=INPUT_PRECISION)
    return acc, tacc, gacc, tgacc


@triton.jit
def _dual_gemm_kernel(
    x_ptr, tx_ptr, w_ptr, bias_ptr, out_ptr, tout_ptr, pre_ptr,
    M, N, K, GATE_OFFSET,
    stride_xm, stride_xk, stride_txm, stride_txk, stride_wn, stride_wk,
    stride_om, stride_on, stride_tom, stride_ton, stride_pm, stride_pn,
    ACTIVATION: tl.constexpr, HAS_TANGENT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped row/column indices keep every load in bounds without masks; the stores below are masked.
    rows = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    tx_ptrs = tx_ptr + rows[:, None] * stride_txm + offs_k[None, :] * stride_txk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    g_ptrs = w_ptrs + GATE_OFFSET * stride_wn  # SwiGLU: the gate half b of the fused weight

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tgacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WHILE_LOOP:
        # Triton 3.6's interpreter with numpy >= 2.4 cannot use a runtime int as a range() bound; a while loop
        # only compares it. Compiled kernels keep the for loop, which the software pipeliner needs.
        k0 = 0
        while k0 < K:
            acc, tacc, gacc, tgacc = _k_step(x_ptrs, tx_ptrs, w_ptrs, g_ptrs, offs_k, K - k0, acc, tacc, gacc, tgacc,
                                             ACTIVATION, HAS_TANGENT, EVEN_K, INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            tx_ptrs += BLOCK_K * stride_txk
            w_ptrs += BLOCK_K * stride_wk
            g_ptrs += BLOCK_K * stride_wk
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc, tacc, gacc, tgacc = _k_step(x_ptrs, tx_ptrs, w_ptrs, g_ptrs, offs_k, K - k0, acc, tacc, gacc, tgacc,
                                             ACTIVATION, HAS_TANGENT, EVEN_K, INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            tx_ptrs += BLOCK_K * stride_txk
            w_ptrs += BLOCK_K * stride_wk
            g_ptrs += BLOCK_K * stride_wk

    _epilogue(acc, tacc, gacc, tgacc, offs_m, offs_n, cols, M, N, GATE_OFFSET, bias_ptr, out_ptr, tout_ptr, pre_ptr,
              stride_om, stride_on, stride_tom, stride_ton, stride_pm, stride_pn,
              ACTIVATION, HAS_TANGENT, HAS_BIAS, STORE_PRE)


@triton.jit
def _epilogue(acc, tacc, gacc, tgacc, offs_m, offs_n, cols, M, N, GATE_OFFSET, bias_ptr, out_ptr, tout_ptr, pre_ptr,
              stride_om, stride_on, stride_tom, stride_ton, stride_pm, stride_pn,
              ACTIVATION: tl.constexpr, HAS_TANGENT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr):
    """Bias (primal only), optional pre-activation store, activation JVP, masked stores of primal and tangent."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        if ACTIVATION == 2:
            gacc += tl.load(bias_ptr + GATE_OFFSET + cols).to(tl.float32)[None, :]

    out_rows = offs_m.to(tl.int64)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if STORE_PRE:
        pre_ptrs = pre_ptr + out_rows[:, None] * stride_pm + offs_n[None, :] * stride_pn
        tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        if ACTIVATION == 2:
            tl.store(pre_ptrs + GATE_OFFSET * stride_pn, gacc.to(pre_ptr.dtype.element_ty), mask=mask)

    if ACTIVATION == 1:
        out, tout = _gelu_tanh_jvp(acc, tacc)
    elif ACTIVATION == 2:
        out, tout = _swiglu_jvp(acc, tacc, gacc, tgacc)
    else:
        out = acc
        tout = tacc

    out_ptrs = out_ptr + out_rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_TANGENT:
        tout_ptrs = tout_ptr + out_rows[:, None] * stride_tom + offs_n[None, :] * stride_ton
        tl.store(tout_ptrs, tout.to(tout_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles sweep the columns together so their W tiles stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dual_gemm_tma_kernel(
    x_desc, tx_desc, w_desc, g_desc, bias_ptr, out_ptr, tout_ptr, pre_ptr,
    M, N, K, GATE_OFFSET, stride_om, stride_tom, stride_pm,
    ACTIVATION: tl.constexpr, HAS_TANGENT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The dual GEMM with tiles fetched by TMA (host tensor descriptors): out-of-bounds rows and K columns arrive as
    zeros, so there are no wrapped indices or masks in the main loop. g_desc is the gate half of a SwiGLU weight."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tgacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WHILE_LOOP:  # the interpreter (see _dual_gemm_kernel)
        k0 = 0
        while k0 < K:
            acc, tacc, gacc, tgacc = _k_step_tma(x_desc, tx_desc, w_desc, g_desc, off_m, off_n, k0, acc, tacc,
                                                 gacc, tgacc, ACTIVATION, HAS_TANGENT)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc, tacc, gacc, tgacc = _k_step_tma(x_desc, tx_desc, w_desc, g_desc, off_m, off_n, k0, acc, tacc,
                                                 gacc, tgacc, ACTIVATION, HAS_TANGENT)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    _epilogue(acc, tacc, gacc, tgacc, offs_m, offs_n, offs_n % N, M, N, GATE_OFFSET, bias_ptr, out_ptr, tout_ptr,
              pre_ptr, stride_om, 1, stride_tom, 1, stride_pm, 1, ACTIVATION, HAS_TANGENT, HAS_BIAS, STORE_PRE)


@triton.jit
def _k_step_tma(x_desc, tx_desc, w_desc, g_desc, off_m, off_n, k0, acc, tacc, gacc, tgacc,
                ACTIVATION: tl.constexpr, HAS_TANGENT: tl.constexpr):
    x_tile = x_desc.load([off_m, k0])
    w_tile = w_desc.load([off_n, k0]).T
    acc = tl.dot(x_tile, w_tile, acc)
    if HAS_TANGENT:
        tx_tile = tx_desc.load([off_m, k0])
        tacc = tl.dot(tx_tile, w_tile, tacc)
    if ACTIVATION == 2:
        g_tile = g_desc.load([off_n, k0]).T
        gacc = tl.dot(x_tile, g_tile, gacc)
        if HAS_TANGENT:
            tgacc = tl.dot(tx_tile, g_tile, tgacc)
    return acc, tacc, gacc, tgacc


# Problems below this many multiply-adds (tests, tiny layers) run the first config untuned: tuning them would cost
# one compilation per config and shape specialization for no measurable gain.
_TUNE_MIN_MACS = 2**31


def _prune_small_problems(configs, named_args, **kwargs):
    if named_args["M"] * named_args["N"] * named_args["K"] < _TUNE_MIN_MACS:
        return configs[:1]
    return configs


_KEY = ["M", "N", "K", "ACTIVATION", "HAS_TANGENT", "STORE_PRE"]
_PRUNE = {"early_config_prune": _prune_small_problems}
_even_k_kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_dual_gemm_kernel)
_dual_gemm_2acc = triton.autotune(configs=_configs(False), key=_KEY, prune_configs_by=_PRUNE)(_even_k_kernel)
_dual_gemm_4acc = triton.autotune(configs=_configs(True), key=_KEY, prune_configs_by=_PRUNE)(_even_k_kernel)


def _set_tma_block_shapes(nargs):
    """Autotuner pre-hook: the descriptors' block shapes follow the config being run."""
    tile_x = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    tile_w = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["x_desc"].block_shape = tile_x
    nargs["tx_desc"].block_shape = tile_x
    nargs["w_desc"].block_shape = tile_w
    nargs["g_desc"].block_shape = tile_w


_dual_gemm_tma_2acc = triton.autotune(configs=_configs(False, _set_tma_block_shapes), key=_KEY,
                                      prune_configs_by=_PRUNE)(_dual_gemm_tma_kernel)
_dual_gemm_tma_4acc = triton.autotune(configs=_configs(True, _set_tma_block_shapes), key=_KEY,
                                      prune_configs_by=_PRUNE)(_dual_gemm_tma_kernel)


def loader() -> str:
    """FACM_EXT_DUAL_GEMM: 'tma' (default: TMA tensor descriptors where the operands allow them -- fp16/bf16, unit
    last stride, 16-byte aligned base and row stride -- else pointer loads) or 'pointer' (pointer loads always).

    Measured on one H200 (torch 2.11, Triton 3.6, bf16): TMA loads made the dual GEMM 1.10-1.23x faster than
    pointer loads (M=16384, 1152->6144: 0.80 vs 0.88 ms; M=32760, 5120->13824: 14.0 vs 17.2 ms; 13824->5120: 14.6
    vs 16.6 ms) and mlp_jvp 1.03-1.07x faster."""
    value = _env.get("FACM_EXT_DUAL_GEMM", "tma").strip().lower() or "tma"
    if value not in ("pointer", "tma"):
        raise ValueError(f"FACM_EXT_DUAL_GEMM: expected 'pointer' or 'tma', got {value!r}")
    return value


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1:
            return False
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def dual_gemm(x: torch.Tensor, tx: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, *,
              activation: str = "none", store_pre: bool = False):
    """One stacked GEMM over [x; tx] with the activation's primal and tangent in the epilogue.

    Args:
        x: [M, K] fp16/bf16 (fp32 allowed: exact fp32 dot, slow; meant for interpreter tests), any strides.
        tx: [M, K] like x, or None (no tangent rows: a plain GEMM).
        weight: [N_w, K], x's dtype. For swiglu N_w = 2 H and rows [0, H) give a, rows [H, 2H) give the gate b.
        bias: [N_w] or None, x's dtype; added to the primal pre-activation only.
        activation: "none" | "gelu_tanh" | "swiglu".
        store_pre: also return the primal pre-activation (x W^T + b) for the backward.
    Returns:
        (out [M, N], tout [M, N] or None (when tx is None), pre [M, N_w] or None), all x's dtype, contiguous;
        N = N_w, or H for swiglu.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    M, K = x.shape
    n_w = weight.shape[0]
    if activation == "swiglu":
        if n_w % 2:
            raise ValueError(f"weight: swiglu needs an even number of rows [2 H, K], got {tuple(weight.shape)}")
        n_out = n_w // 2
    else:
        n_out = n_w
    out = torch.empty((M, n_out), device=x.device, dtype=x.dtype)
    tout = torch.empty_like(out) if tx is not None else None
    pre = torch.empty((M, n_w), device=x.device, dtype=x.dtype) if store_pre else None
    if M == 0 or n_out == 0:
        return out, tout, pre
    if K == 0:
        raise ValueError("x: the reduction dimension K is 0")
    # Unused pointer slots get a live tensor of the right dtype; the constexpr flags keep them untouched.
    tx_arg = tx if tx is not None else x
    tout_arg = tout if tout is not None else out
    pre_arg = pre if pre is not None else out
    bias_arg = bias if bias is not None else out
    kernel = _dual_gemm_4acc if activation == "swiglu" else _dual_gemm_2acc
    interpreting = _env.get("TRITON_INTERPRET", "0") == "1"

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    w_main, w_gate = (weight[:n_out], weight[n_out:]) if activation == "swiglu" else (weight, weight)
    if loader() == "tma" and (x.is_cuda or interpreting) and _tma_compatible(x, tx_arg, w_main, w_gate):
        from triton.tools.tensor_descriptor import TensorDescriptor

        # block shapes are placeholders: the autotuner's pre-hook sets them per config
        def descriptor(t):
            return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])

        x_desc = descriptor(x)
        w_desc = descriptor(w_main)
        kernel = _dual_gemm_tma_4acc if activation == "swiglu" else _dual_gemm_tma_2acc
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            kernel[grid](
                x_desc, descriptor(tx) if tx is not None else x_desc, w_desc,
                descriptor(w_gate) if activation == "swiglu" else w_desc,
                bias_arg, out, tout_arg, pre_arg,
                M, n_out, K, n_out if activation == "swiglu" else 0, out.stride(0), tout_arg.stride(0),
                pre_arg.stride(0),
                ACTIVATION=ACTIVATIONS[activation], HAS_TANGENT=tx is not None, HAS_BIAS=bias is not None,
                STORE_PRE=store_pre, WHILE_LOOP=interpreting,
            )
        return out, tout, pre

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](
            x, tx_arg, weight, bias_arg, out, tout_arg, pre_arg,
            M, n_out, K, n_out if activation == "swiglu" else 0,
            x.stride(0), x.stride(1), tx_arg.stride(0), tx_arg.stride(1), weight.stride(0), weight.stride(1),
            out.stride(0), out.stride(1), tout_arg.stride(0), tout_arg.stride(1), pre_arg.stride(0),
            pre_arg.stride(1),
            ACTIVATION=ACTIVATIONS[activation], HAS_TANGENT=tx is not None, HAS_BIAS=bias is not None,
            STORE_PRE=store_pre, INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            WHILE_LOOP=interpreting,
        )
    return out, tout, pre


@triton.jit
def _act_jvp_kernel(pre_ptr, tpre_ptr, out_ptr, tout_ptr, M, H, stride_pm, stride_tpm, stride_om, stride_tom,
                    ACTIVATION: tl.constexpr, HAS_TANGENT: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    pre_ptrs = pre_ptr + rows64 * stride_pm + cols[None, :]
    tpre_ptrs = tpre_ptr + rows64 * stride_tpm + cols[None, :]
    h = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
    th = tl.zeros_like(h)
    if HAS_TANGENT:
        th = tl.load(tpre_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 1:
        out, tout = _gelu_tanh_jvp(h, th)
    else:
        b = tl.load(pre_ptrs + H, mask=mask, other=0.0).to(tl.float32)
        tb = tl.zeros_like(b)
        if HAS_TANGENT:
            tb = tl.load(tpre_ptrs + H, mask=mask, other=0.0).to(tl.float32)
        out, tout = _swiglu_jvp(h, th, b, tb)
    tl.store(out_ptr + rows64 * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_TANGENT:
        tl.store(tout_ptr + rows64 * stride_tom + cols[None, :], tout.to(tout_ptr.dtype.element_ty), mask=mask)


def act_jvp(pre: torch.Tensor, tpre: torch.Tensor | None, activation: str):
    """The activation's primal and tangent as a separate elementwise pass (the unfused alternative to the epilogue).

    Args:
        pre: [M, N1] fp16/bf16/fp32 pre-activation (swiglu: N1 = 2 H, halves (a, b)); tpre: like pre, or None.
        activation: "gelu_tanh" | "swiglu".
    Returns:
        (out [M, H], tout [M, H] or None), pre's dtype, contiguous; fp32 math.
    """
    if activation not in ("gelu_tanh", "swiglu"):
        raise ValueError(f"activation: expected 'gelu_tanh' or 'swiglu', got {activation!r}")
    pre = pre if pre.stride(-1) == 1 else pre.contiguous()
    if tpre is not None and tpre.stride(-1) != 1:
        tpre = tpre.contiguous()
    M, n1 = pre.shape
    hidden = n1 // 2 if activation == "swiglu" else n1
    out = torch.empty((M, hidden), device=pre.device, dtype=pre.dtype)
    tout = torch.empty_like(out) if tpre is not None else None
    if M == 0 or hidden == 0:
        return out, tout
    tpre_arg = tpre if tpre is not None else pre
    tout_arg = tout if tout is not None else out
    block_r, block_c = (8, 32) if _env.get("TRITON_INTERPRET", "0") == "1" else (16, 256)
    grid = (triton.cdiv(M, block_r), triton.cdiv(hidden, block_c))
    with torch.cuda.device(pre.device) if pre.is_cuda else contextlib.nullcontext():
        _act_jvp_kernel[grid](pre, tpre_arg, out, tout_arg, M, hidden, pre.stride(0), tpre_arg.stride(0),
                              out.stride(0), tout_arg.stride(0), ACTIVATION=ACTIVATIONS[activation],
                              HAS_TANGENT=tpre is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    return out, tout


def tuned_configs() -> str:
    """The configs the autotuners picked for their latest calls (for benchmark notes)."""
    parts = []
    for name, tuner in (("2acc", _dual_gemm_2acc), ("4acc", _dual_gemm_4acc), ("tma-2acc", _dual_gemm_tma_2acc),
                        ("tma-4acc", _dual_gemm_tma_4acc)):
        best = getattr(tuner, "best_config", None)
        if best is not None:
            kw = best.kwargs
            parts.append(f"{name} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} s{best.num_stages} w{best.num_warps}")
    return ", ".join(parts)
