"""``attention_jvp``: softmax attention and its forward-mode JVP in one pass (flash form), with a flash backward
for the primal output.

Backends (``python -m facm_ext.info`` lists them):
- forward, ``cuda``: the CUDA C++ kernel ``facm_ext::attention_jvp_cuda`` (csrc/attention, mma.sync tensor cores)
  for fp16/bf16 CUDA tensors with head_dim 64, 72, 80 or 96 and a score tangent (tq or tk): the score GEMMs run
  the head rounded up to 16 (72 -> 80), the value GEMMs exactly D/8 column tiles. Default for the head dims in
  ``_CUDA_DEFAULT_HEAD_DIMS`` (measured faster than the Triton kernel, benchmarks/RESULTS.md);
  ``FACM_EXT_ATTN_KERNEL=cuda|triton`` picks one of the two GPU kernels wherever the CUDA one applies.
- forward, ``triton``: one Triton kernel computes O, O' and the log-sum-exp (facm_ext/kernels/attention_jvp_triton.py)
  for fp16/bf16 CUDA tensors with 16 <= head_dim <= 128, head_dim % 8 == 0 (72 runs padded to 128 inside the kernel;
  see the kernel module for why the 64 + 16 split is not used).
- forward, ``reference``: explicit JVP formulas in fp32 (fp64 for fp64 inputs), chunked over queries so the score
  matrix never exists whole; used on CPU, for fp32/fp64, and for head dims the kernel does not take.
- backward of O: cuDNN's attention backward (``aten._scaled_dot_product_cudnn_attention_backward``) fed with our O
  and lse as its [B, H, Lq, 1] stats where it applies (CUDA fp16/bf16, head_dim % 8 == 0, <= 128, no key_lengths):
  1.03-1.06x SDPA's backward time on an H200; else PyTorch's flash backward
  (``aten._scaled_dot_product_flash_attention_backward``, head_dim <= 256, 1.8-2.1x); else the Triton flash
  backward (key_lengths); else the chunked explicit backward. ``FACM_EXT_ATTN_BACKWARD=flash|cudnn|triton|reference``
  forces one. Every backend is checked against float64 autograd of math attention in the GPU tests.
``FACM_EXT_BACKEND=reference|triton`` forces the forward backend (triton with an unsupported case is a ValueError;
with ``TRITON_INTERPRET=1`` the forced triton backend also runs CPU tensors, for the interpreter tests).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from facm_ext import _env, _extension
from facm_ext.ops import _common

_FAST_DTYPES = (torch.float16, torch.bfloat16)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 128  # mirrors facm_ext.kernels.attention_jvp_triton (not imported here: Triton)
_FLASH_BACKWARD_MAX_HEAD_DIM = 256
_CUDA_KERNEL = "attention_jvp_cuda"
_CUDA_HEAD_DIMS = frozenset({64, 72, 80, 96})  # compiled in csrc/attention/attention_jvp.cu
# Head dims where the CUDA kernel is the default: 72 runs 80-wide score GEMMs there against 128-wide in Triton.
_CUDA_DEFAULT_HEAD_DIMS = frozenset({72})
_CUDNN_BACKWARD_MAX_HEAD_DIM = 128


def _cudnn_ok() -> bool:
    """cuDNN is usable and this torch has the cuDNN attention backward op."""
    return torch.backends.cudnn.is_available() and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward")


# Bytes of fp32 score-sized temporaries the chunked math path may hold at once.
_MATH_CHUNK_BYTES = 1 << 30

_common.register_op_info(_common.OpInfo(
    name="attention_jvp",
    backends={
        "cuda": "CUDA fp16/bf16, head_dim 64/72/80/96 with tq or tk given (default for head_dim 72; "
                "FACM_EXT_ATTN_KERNEL=cuda|triton chooses)",
        "triton": "CUDA fp16/bf16, 16 <= head_dim <= 128, head_dim % 8 == 0 (non-powers of two padded in-kernel)",
        "reference": "CPU, fp32/fp64, other head dims: explicit JVP formulas in fp32, chunked over queries",
    },
    kernel=_CUDA_KERNEL,
    notes="backward of O: cuDNN's attention backward with our lse (CUDA fp16/bf16, head_dim%8==0, <= 128, no "
          "key_lengths), else PyTorch's flash backward, else the Triton flash backward (key_lengths), else the chunked "
          "explicit backward; FACM_EXT_ATTN_BACKWARD=cudnn|flash|triton|reference forces one",
))


# ------------------------------------------------------------------------------------------------ backend choice
def _triton_head_dim_ok(head_dim: int) -> bool:
    return _MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM and head_dim % 8 == 0


def _interpreting() -> bool:
    return _env.get("TRITON_INTERPRET", "0") == "1"


@_env.per_snapshot
def _kernel_choice() -> str:
    """FACM_EXT_ATTN_KERNEL: 'auto' (default), 'cuda' or 'triton'."""
    value = _env.get("FACM_EXT_ATTN_KERNEL", "auto").strip().lower() or "auto"
    if value not in ("auto", "cuda", "triton"):
        raise ValueError(f"FACM_EXT_ATTN_KERNEL: expected auto, cuda or triton, got {value!r}")
    return value


def _cuda_kernel_applies(q: Tensor, tq: Optional[Tensor], tk: Optional[Tensor]) -> bool:
    """The CUDA kernel takes these inputs: fp16/bf16 CUDA, a compiled head dim, a score tangent, the extension."""
    return (q.is_cuda and q.dtype in _FAST_DTYPES and q.shape[-1] in _CUDA_HEAD_DIMS
            and (tq is not None or tk is not None) and _extension.has_kernel(_CUDA_KERNEL))


def _cuda_kernel_chosen(head_dim: int) -> bool:
    """Where the CUDA kernel applies and no backend is forced: whether FACM_EXT_ATTN_KERNEL (or, on auto, the
    head dim's measured default) picks it over the Triton kernel."""
    choice = _kernel_choice()
    return choice == "cuda" or (choice == "auto" and head_dim in _CUDA_DEFAULT_HEAD_DIMS)


def cuda_kernel_is_default(head_dim: int) -> bool:
    """Whether fp16/bf16 CUDA inputs with a score tangent and this head dim run the CUDA kernel when no backend
    is forced (facm_ext.jvp's native block op calls that kernel directly, so it applies only where this holds)."""
    return head_dim in _CUDA_HEAD_DIMS and _extension.has_kernel(_CUDA_KERNEL) and _cuda_kernel_chosen(head_dim)


def _forward_backend(q: Tensor, tq: Optional[Tensor] = None, tk: Optional[Tensor] = None) -> str:
    """'cuda', 'triton' or 'reference' for these inputs (the public function already rejected impossible
    forcings)."""
    forced = _common._forced_backend()
    if forced in (None, "cuda") and _cuda_kernel_applies(q, tq, tk):
        if forced == "cuda" or _cuda_kernel_chosen(q.shape[-1]):
            return "cuda"
    head_ok = _triton_head_dim_ok(q.shape[-1])
    if forced == "triton" and _interpreting() and not q.is_cuda:
        return "triton"
    if head_ok and _common.use_triton(q, dtypes=_FAST_DTYPES):
        return "triton"
    if forced == "triton" and head_ok and _common.use_triton(q, dtypes=_common.KERNEL_DTYPES):
        return "triton"  # fp32 on CUDA only when forced: the kernel then runs fp32 ("ieee") dots
    return "reference"


def _backward_backend(q: Tensor, has_key_lengths: bool) -> str:
    forced = _env.get("FACM_EXT_ATTN_BACKWARD", "").strip().lower()
    if forced:
        if forced not in ("flash", "cudnn", "triton", "reference"):
            raise ValueError(f"FACM_EXT_ATTN_BACKWARD: expected flash, cudnn, triton or reference, got {forced!r}")
        return forced
    head_dim = q.shape[-1]
    if q.is_cuda and q.dtype in _FAST_DTYPES:
        # cuDNN's backward fed with our log-sum-exp measured 1.03-1.06x SDPA's backward on an H200, PyTorch's flash
        # backward 1.8-2.1x (benchmarks/RESULTS.md); both are checked against float64 autograd in the GPU tests.
        if not has_key_lengths and head_dim % 8 == 0 and head_dim <= _CUDNN_BACKWARD_MAX_HEAD_DIM and _cudnn_ok():
            return "cudnn"
        if not has_key_lengths and head_dim % 8 == 0 and head_dim <= _FLASH_BACKWARD_MAX_HEAD_DIM:
            return "flash"
        if _triton_head_dim_ok(head_dim) and _common.triton_available():
            return "triton"
    if _common._forced_backend() == "triton" and _interpreting() and not q.is_cuda:
        return "triton"
    return "reference"


# ------------------------------------------------------------------------------------------- reference (math) path
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _query_chunk(q: Tensor, len_k: int) -> int:
    batch, heads, len_q, _ = q.shape
    per_query = batch * heads * max(len_k, 1) * 4 * 4  # four fp32 score-sized temporaries
    return max(1, min(len_q, _MATH_CHUNK_BYTES // per_query))


def _valid_keys(key_lengths: Optional[Tensor], len_k: int, device) -> Optional[Tensor]:
    if key_lengths is None:
        return None
    positions = torch.arange(len_k, device=device)
    return (positions[None, :] < key_lengths.to(device=device, dtype=torch.int64)[:, None]).view(-1, 1, 1, len_k)


def _masked_keys(x: Optional[Tensor], valid: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """x [B, H, Lk, D] in ``dtype`` with padded key rows zeroed, so padding holding inf/NaN cannot leak through
    0 * NaN in the products (the kernels never load those rows)."""
    if x is None:
        return None
    x = x.to(dtype)
    if valid is None:
        return x
    return torch.where(valid.transpose(-2, -1), x, torch.zeros((), dtype=dtype, device=x.device))


def _math_forward(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor], tk: Optional[Tensor],
                  tv: Optional[Tensor], key_lengths: Optional[Tensor], scale: float):
    """Explicit JVP formulas: O = P V, S' = tau (Q' K^T + Q K'^T), mu = rowsum(P * S'),
    O' = (P * S') V - mu O + P V', computed in fp32 (fp64 for fp64) one query chunk at a time."""
    cdt = _compute_dtype(q.dtype)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    valid = _valid_keys(key_lengths, len_k, q.device)
    kc, vc, tkc, tvc = (_masked_keys(x, valid, cdt) for x in (k, v, tk, tv))
    o = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)
    to = torch.zeros_like(o)
    lse = torch.empty((batch, heads, len_q), dtype=cdt, device=q.device)
    has_tangent = tq is not None or tk is not None or tv is not None
    step = _query_chunk(q, len_k)
    for start in range(0, len_q, step):
        rows = slice(start, min(start + step, len_q))
        qc = q[:, :, rows].to(cdt)
        scores = torch.matmul(qc, kc.transpose(-2, -1)) * scale
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        finite = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(finite, row_lse, torch.zeros_like(row_lse)).unsqueeze(-1))
        if valid is not None:
            probs = torch.where(valid, probs, torch.zeros_like(probs))
        out = torch.matmul(probs, vc)
        o[:, :, rows] = out.to(o.dtype)
        lse[:, :, rows] = row_lse
        if not has_tangent:
            continue
        tangent = torch.zeros_like(out)
        if tq is not None or tk is not None:
            score_tangent = torch.zeros_like(scores)
            if tq is not None:
                score_tangent = score_tangent + torch.matmul(tq[:, :, rows].to(cdt), kc.transpose(-2, -1))
            if tk is not None:
                score_tangent = score_tangent + torch.matmul(qc, tkc.transpose(-2, -1))
            weighted = probs * (score_tangent * scale)
            mu = weighted.sum(dim=-1, keepdim=True)
            tangent = tangent + torch.matmul(weighted, vc) - mu * out
        if tvc is not None:
            tangent = tangent + torch.matmul(probs, tvc)
        to[:, :, rows] = tangent.to(to.dtype)
    return o, to, lse


def _math_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                   key_lengths: Optional[Tensor], scale: float):
    """dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = tau dS K, dK = tau dS^T Q; chunked over queries."""
    cdt = _compute_dtype(q.dtype)
    len_q, len_k = q.shape[2], k.shape[2]
    valid = _valid_keys(key_lengths, len_k, q.device)
    kc, vc = _masked_keys(k, valid, cdt), _masked_keys(v, valid, cdt)
    delta = (grad_o.to(cdt) * o.to(cdt)).sum(dim=-1)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    step = _query_chunk(q, len_k)
    for start in range(0, len_q, step):
        rows = slice(start, min(start + step, len_q))
        qc, doc = q[:, :, rows].to(cdt), grad_o[:, :, rows].to(cdt)
        row_lse = lse[:, :, rows].to(cdt)
        row_lse = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(torch.matmul(qc, kc.transpose(-2, -1)) * scale - row_lse.unsqueeze(-1))
        if valid is not None:
            probs = torch.where(valid, probs, torch.zeros_like(probs))
        dv += torch.matmul(probs.transpose(-2, -1), doc)
        dscores = probs * (torch.matmul(doc, vc.transpose(-2, -1)) - delta[:, :, rows].unsqueeze(-1))
        dq[:, :, rows] = (torch.matmul(dscores, kc) * scale).to(dq.dtype)
        dk += torch.matmul(dscores.transpose(-2, -1), qc) * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------ PyTorch fused backwards
def _aten_flash_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float):
    """PyTorch's FlashAttention-2 backward fed with our O and natural-log lse ([B, H, Lq] fp32, its own layout)."""
    seed = torch.empty((), dtype=torch.int64, device=q.device)  # dropout 0: the RNG state is never read
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad_o.contiguous(), q, k, v, o, lse.float().contiguous(), None, None, q.shape[2], k.shape[2], 0.0, False,
        seed, seed, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _aten_cudnn_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float):
    """cuDNN's attention backward; its lse layout is [B, H, Lq, 1] fp32. The default backward where available."""
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    q, k, v, o = (t.contiguous() for t in (q, k, v, o))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_o.contiguous(), q, k, v, o, lse.float().unsqueeze(-1).contiguous(), seed, seed, None, None, None,
        q.shape[2], k.shape[2], 0.0, False, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# ---------------------------------------------------------------------------------------------------- custom ops
@_common.jvp_custom_op("facm_ext::attention_jvp")
def _attention_jvp_op(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor], tk: Optional[Tensor],
                      tv: Optional[Tensor], key_lengths: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (o [B, H, Lq, D] q.dtype, to [B, H, Lq, D] q.dtype, lse [B, H, Lq] fp32 (fp64 for fp64 inputs))."""
    backend = _forward_backend(q, tq, tk)
    if backend == "cuda":
        return torch.ops.facm_ext.attention_jvp_cuda(q, k, v, tq, tk, tv, key_lengths, scale)
    if backend == "triton":
        from facm_ext.kernels import attention_jvp_triton

        return attention_jvp_triton.attention_jvp_forward(q, k, v, tq, tk, tv, key_lengths, scale)
    return _math_forward(q, k, v, tq, tk, tv, key_lengths, scale)


def _kernel_fake_registered() -> None:
    @torch.library.register_fake("facm_ext::" + _CUDA_KERNEL)
    def _(q, k, v, tq, tk, tv, key_lengths, scale):
        return _attention_jvp_fake(q, k, v, tq, tk, tv, key_lengths, scale)


@_attention_jvp_op.register_fake
def _attention_jvp_fake(q, k, v, tq, tk, tv, key_lengths, scale):
    batch, heads, len_q, head_dim = q.shape
    o = q.new_empty((batch, heads, len_q, head_dim))
    to = q.new_empty((batch, heads, len_q, head_dim))
    lse = q.new_empty((batch, heads, len_q), dtype=_compute_dtype(q.dtype))
    return o, to, lse


if _extension.has_kernel(_CUDA_KERNEL):
    _kernel_fake_registered()


@_common.jvp_custom_op("facm_ext::attention_jvp_backward")
def _attention_backward_op(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                           key_lengths: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of o = attention(q, k, v) -> (dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    backend = _backward_backend(q, key_lengths is not None)
    if backend in ("flash", "cudnn") and key_lengths is not None:
        raise ValueError(f"FACM_EXT_ATTN_BACKWARD={backend}: the aten fused backward does not take key_lengths")
    if backend == "flash":
        return _aten_flash_backward(grad_o, q, k, v, o, lse, scale)
    if backend == "cudnn":
        return _aten_cudnn_backward(grad_o, q, k, v, o, lse, scale)
    if backend == "triton":
        from facm_ext.kernels import attention_jvp_triton

        return attention_jvp_triton.attention_backward(grad_o, q, k, v, o, lse, key_lengths, scale)
    return _math_backward(grad_o, q, k, v, o, lse, key_lengths, scale)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_o, q, k, v, o, lse, key_lengths, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, _tq, _tk, _tv, key_lengths, scale = inputs
    o, _to, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_lengths)
    ctx.scale = scale


def _backward(ctx, grad_o, _grad_to, _grad_lse):
    # The tangent output carries no graph (the public function detaches it) and lse is internal: only dO counts.
    q, k, v, o, lse, key_lengths = ctx.saved_tensors
    if grad_o is None:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None, None)
    dq, dk, dv = _attention_backward_op(grad_o, q, k, v, o, lse, key_lengths, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_attention_jvp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public function
def _check_inputs(q, k, v, tq, tk, tv, key_lengths):
    _common.check_tensor("q", q, ndim=4)
    _common.check_tensor("k", k, ndim=4)
    _common.check_tensor("v", v, ndim=4)
    _common.check_same_device("q", q, k=k, v=v)
    _common.check_same_dtype("q", q, k=k, v=v)
    batch, heads, _len_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(f"k: expected shape [B={batch}, H={heads}, Lk, D={head_dim}] matching q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape {tuple(k.shape)} of k, got {tuple(v.shape)}")
    for name, tangent, primal_name, primal in (("tq", tq, "q", q), ("tk", tk, "k", k), ("tv", tv, "v", v)):
        _common.check_tangent(name, tangent, primal_name, primal)
        _common.check_same_dtype("q", q, **{name: tangent})
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor):
            raise ValueError(f"key_lengths: expected a torch.Tensor, got {type(key_lengths).__name__}")
        if key_lengths.dtype not in (torch.int32, torch.int64) or key_lengths.shape != (batch,):
            raise ValueError(f"key_lengths: expected an int32/int64 tensor of shape [B={batch}], got "
                             f"{key_lengths.dtype} of shape {tuple(key_lengths.shape)}")
        _common.check_same_device("q", q, key_lengths=key_lengths)


def _check_forced_cuda(q: Tensor) -> None:
    """FACM_EXT_ATTN_KERNEL=cuda on inputs the CUDA kernel can never take is an error; without a score tangent
    (tq and tk None) the op still runs the Triton kernel, as documented. (FACM_EXT_BACKEND=cuda, the switch of
    every op, only prefers the CUDA kernel where it applies.)"""
    if _kernel_choice() != "cuda":
        return
    head_dim = q.shape[-1]
    if not q.is_cuda:
        raise ValueError(f"q: the CUDA attention kernel (FACM_EXT_ATTN_KERNEL=cuda) needs CUDA tensors, got {q.device}")
    if q.dtype not in _FAST_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not supported by the CUDA attention kernel; expected float16 or "
                         f"bfloat16")
    if head_dim not in _CUDA_HEAD_DIMS:
        raise ValueError(f"q: head_dim {head_dim} is not supported by the CUDA attention kernel; expected one of "
                         f"{sorted(_CUDA_HEAD_DIMS)}")
    if not _extension.has_kernel(_CUDA_KERNEL):
        raise ValueError(f"the CUDA attention kernel was requested but facm_ext._C has no {_CUDA_KERNEL} "
                         f"(see python -m facm_ext.info)")


def _check_forced_triton(q: Tensor) -> None:
    if _common._forced_backend() != "triton":
        return
    head_dim = q.shape[-1]
    if not _triton_head_dim_ok(head_dim):
        raise ValueError(f"q: head_dim {head_dim} is not supported by the Triton attention kernel (FACM_EXT_BACKEND="
                         f"triton); expected {_MIN_HEAD_DIM} <= head_dim <= {_MAX_HEAD_DIM}, a multiple of 8")
    if q.dtype not in _common.KERNEL_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not supported by the Triton attention kernel (FACM_EXT_BACKEND="
                         f"triton); expected float16, bfloat16 or float32")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"q: the Triton attention kernel (FACM_EXT_BACKEND=triton) needs CUDA tensors, got {q.device} "
                         f"(or set TRITON_INTERPRET=1 for the CPU interpreter)")


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor] = None, tk: Optional[Tensor] = None,
                  tv: Optional[Tensor] = None, *, scale: Optional[float] = None,
                  key_lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Softmax attention ``o = softmax(scale q k^T) v`` and its JVP ``to`` along (tq, tk, tv), in one pass.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D] (Lk may differ from Lq: cross-attention); float16/bfloat16/float32/float64,
    one dtype and device. tq, tk, tv: tangents of q, k, v of the same shapes and dtype, or None (zero; their GEMMs
    are skipped). scale: defaults to 1/sqrt(D). key_lengths: optional [B] int32/int64 tensor on q's device; keys at
    positions >= key_lengths[b] are masked (values are clamped to [0, Lk]; a length of 0 gives zero outputs).

    Returns (o, to), both [B, H, Lq, D] in q's dtype. ``o`` is differentiable w.r.t. q, k, v (flash backward from
    the saved log-sum-exp); ``to`` carries no graph.
    """
    _check_inputs(q, k, v, tq, tk, tv, key_lengths)
    if not torch.compiler.is_compiling():
        _check_forced_triton(q)
        _check_forced_cuda(q)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    o, to, _lse = _attention_jvp_op(q, k, v, tq, tk, tv, key_lengths, float(scale))
    return o, to.detach()
