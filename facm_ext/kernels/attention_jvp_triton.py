"""Triton kernels of the attention JVP: a one-pass flash forward computing O, O' and the log-sum-exp, and a flash
backward of the primal output O (dQ, dK, dV from the saved log-sum-exp).

Layout: q, tq [B, H, Lq, D]; k, v, tk, tv [B, H, Lk, D], any strides with unit stride along D (the callers
enforce that); outputs are contiguous. fp16/bf16 (fp32 also runs, with fp32 dots, for the CPU interpreter tests).

Forward (docs jvp_math.md, "Softmax attention"), per query tile and per key tile, with base-2 scores
``s = tau * log2(e) * Q K^T`` and running max m:
  P~ = exp2(s - m), S' = tau (Q' K^T + Q K'^T) (natural units, it multiplies P),
  l = sum P~, Acc_O = sum P~ V, Acc_T = sum (P~ * S') V + P~ V', r = sum P~ * S',
  all four rescaled by exp2(m_old - m_new) when the max moves. Epilogue: O = Acc_O / l, mu = r / l,
  O' = Acc_T / l - mu O, lse = (m + log2 l) * ln 2 (natural log, the layout [B, H, Lq] fp32 that PyTorch's
  flash backward reads too). Keys at or beyond the row's key length are never loaded as valid: P~ = 0, S' = 0.

Head dims that are not a power of two (72 for DiT and LightningDiT) are padded, by default, to the next power of
two inside the kernel (channels >= head_dim masked on load and store): 72 runs 128-wide dots. (The op runs head dim
72 on the CUDA C++ kernel of csrc/attention by default, 2.0-2.2x faster than this padded form on an H200; this
kernel serves 72 without a score tangent and under FACM_EXT_ATTN_KERNEL=triton.) The kernel can also
split the head into two power-of-two dot widths D0 + D1 (two dots per product), and does so only when
FACM_EXT_ATTN_HEAD_SPLIT=1 and the split is exact (80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16). A split with masked
channels in the D1 part (72 = 64 + 16 or 64 + 32) is never used: measured on an H200 with Triton 3.6 (2026-11-26),
it gives a wrong O' (relative error 0.27-0.49 against 0.007 for the math path) whenever V' is given, for both
D1 = 16 and D1 = 32, every block configuration and num_stages 1-3, while O, the Q'-only case and the padded head
are correct; the interpreter computes it correctly, so it is a Triton code-generation problem on sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from facm_ext import _env

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
    return _env.get("TRITON_INTERPRET", "0") == "1"


def head_split_mode() -> bool:
    """FACM_EXT_ATTN_HEAD_SPLIT=1 allows the exact two-dot head split (80 = 64 + 16, 96 = 64 + 32); the default (0)
    pads every head dim that is not a power of two to the next one. Measured on an H200 (Triton 3.6), the exact
    splits of 80 and 96 agreed with the float64 JVP in bf16 for (q', k', v'), v' only and k' only; the full GPU
    test suite ran with padding."""
    value = _env.get("FACM_EXT_ATTN_HEAD_SPLIT", "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"FACM_EXT_ATTN_HEAD_SPLIT: expected 0 or 1, got {value!r}")
    return value == "1"


def split_head_dim(head_dim: int, split: bool | None = None) -> tuple[int, int]:
    """head_dim -> (D0, D1), the dot widths of the two parts of the head (D1 = 0: one part).

    Padded (default): (next_power_of_2(head_dim), 0), the kernel masks channels >= head_dim. Split (``split`` or
    FACM_EXT_ATTN_HEAD_SPLIT=1): D0 the largest power of two <= head_dim and D1 = head_dim - D0 when that is a power
    of two >= 16 (80 -> (64, 16), 96 -> (64, 32)); other head dims stay padded (72 -> (128, 0)).
    """
    if split is None:
        split = head_split_mode()
    padded = max(16, triton.next_power_of_2(head_dim))
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    if split and rest >= 16 and rest == triton.next_power_of_2(rest):
        return d0, rest
    return padded, 0


def head_dim_supported(head_dim: int) -> bool:
    """The fast path takes 16 <= head_dim <= 128 with head_dim % 8 == 0."""
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def _autotune_enabled() -> bool:
    """Autotuning is on by default on the GPU; FACM_EXT_ATTN_AUTOTUNE=0 (or FACM_EXT_ATTN_FWD_CONFIG) fixes one
    configuration per head width."""
    return (not interpreting() and _env.get("FACM_EXT_ATTN_AUTOTUNE", "1") != "0"
            and not _env.get("FACM_EXT_ATTN_FWD_CONFIG"))


# ------------------------------------------------------------------------------------------------------ forward JVP
@triton.jit
def _rows(head_ptr, base_ptr, head_offset, rows, row_stride, ALIGN8: tl.constexpr):
    """[R, 1] pointers to rows ``rows`` of one (batch, head): head_ptr = base_ptr + head_offset. With ALIGN8 the
    caller vouches that base_ptr is 16-byte aligned and head_offset and row_stride are multiples of 8 elements."""
    if ALIGN8:
        row_ptrs = base_ptr + tl.multiple_of(head_offset + rows[:, None] * row_stride, [8, 1])
    else:
        row_ptrs = head_ptr + rows[:, None] * row_stride
    return row_ptrs


@triton.jit
def _attention_jvp_fwd_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE, KEY_LENGTHS,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_tqb, stride_tqh, stride_tql,
    stride_tkb, stride_tkh, stride_tkl,
    stride_tvb, stride_tvh, stride_tvl,
    stride_ob, stride_oh, stride_ol,
    H, LQ, LK, HEAD_DIM, sm_scale,
    D0: tl.constexpr, D1: tl.constexpr, MASK_D0: tl.constexpr, STATIC_HEAD_DIM: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    HAS_SCORE_TANGENT: tl.constexpr, HAS_TANGENT: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LQ_BUCKET: tl.constexpr, LK_BUCKET: tl.constexpr, ALIGN8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # LQ_BUCKET / LK_BUCKET (powers of two of the lengths) only key the autotuner's cache.
    # ALIGN8 (opt-in, see _align_hints): every row offset is a multiple of 8 elements and head_dim is a compile-time
    # constant, so rows of a 72-wide head load as 16-byte vectors (Triton only infers alignment from strides that
    # are multiples of 16).
    head_dim = HEAD_DIM
    if ALIGN8:
        head_dim = STATIC_HEAD_DIM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    row_ok = offs_m < LQ
    # Row masks for loads of D0-wide tiles: with the head padded to D0 > HEAD_DIM the pad channels are masked too.
    q0_mask = row_ok[:, None]
    if MASK_D0:
        d0_ok = offs_d0 < head_dim
        q0_mask = q0_mask & d0_ok[None, :]

    if ALIGN8:
        q_rows = Q + tl.multiple_of(b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql, [8, 1])
    else:
        q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql
    k_head = b * stride_kb + h * stride_kh
    v_head = b * stride_vb + h * stride_vh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    q0 = tl.load(q_rows + offs_d0[None, :], mask=q0_mask, other=0.0)
    if HAS_TQ:
        if ALIGN8:
            tq_rows = TQ + tl.multiple_of(b * stride_tqb + h * stride_tqh + offs_m[:, None] * stride_tql, [8, 1])
        else:
            tq_rows = TQ + b * stride_tqb + h * stride_tqh + offs_m[:, None] * stride_tql
        tq0 = tl.load(tq_rows + offs_d0[None, :], mask=q0_mask, other=0.0)
    if HAS_TK:
        tk_head = b * stride_tkb + h * stride_tkh
        tk_base = TK + b * stride_tkb + h * stride_tkh
    if HAS_TV:
        tv_head = b * stride_tvb + h * stride_tvh
        tv_base = TV + b * stride_tvb + h * stride_tvh
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_ok = offs_d1 < head_dim  # all true for the exact splits split_head_dim returns; kept as a guard
        q1 = tl.load(q_rows + offs_d1[None, :], mask=row_ok[:, None] & d1_ok[None, :], other=0.0)
        if HAS_TQ:
            tq1 = tl.load(tq_rows + offs_d1[None, :], mask=row_ok[:, None] & d1_ok[None, :], other=0.0)

    kv_len = LK
    if HAS_KEY_LENGTHS:
        kv_len = tl.maximum(tl.minimum(tl.load(KEY_LENGTHS + b).to(tl.int32), LK), 0)

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        acc_o1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if HAS_TANGENT:
        acc_t0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        if D1 > 0:
            acc_t1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if HAS_SCORE_TANGENT:
        r_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, kv_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < kv_len
        kv0_mask = col_ok[:, None]
        if MASK_D0:
            kv0_mask = kv0_mask & d0_ok[None, :]
        k_rows = _rows(k_base, K, k_head, cols, stride_kl, ALIGN8)
        v_rows = _rows(v_base, V, v_head, cols, stride_vl, ALIGN8)
        k0 = tl.load(k_rows + offs_d0[None, :], mask=kv0_mask, other=0.0)
        v0 = tl.load(v_rows + offs_d0[None, :], mask=kv0_mask, other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        if D1 > 0:
            kv1_mask = col_ok[:, None] & d1_ok[None, :]
            k1 = tl.load(k_rows + offs_d1[None, :], mask=kv1_mask, other=0.0)
            v1 = tl.load(v_rows + offs_d1[None, :], mask=kv1_mask, other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
        if HAS_SCORE_TANGENT:
            # Masked keys load as zeros, so their S' is exactly 0 (never inf * 0).
            st = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_TQ:
                st = tl.dot(tq0, tl.trans(k0), st, input_precision=DOT_PRECISION)
                if D1 > 0:
                    st = tl.dot(tq1, tl.trans(k1), st, input_precision=DOT_PRECISION)
            if HAS_TK:
                tk_rows = _rows(tk_base, TK, tk_head, cols, stride_tkl, ALIGN8)
                tk0 = tl.load(tk_rows + offs_d0[None, :], mask=kv0_mask, other=0.0)
                st = tl.dot(q0, tl.trans(tk0), st, input_precision=DOT_PRECISION)
                if D1 > 0:
                    tk1 = tl.load(tk_rows + offs_d1[None, :], mask=kv1_mask, other=0.0)
                    st = tl.dot(q1, tl.trans(tk1), st, input_precision=DOT_PRECISION)

        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
        # Every tile holds at least one valid key (start_n < kv_len), so m_new is finite and alpha never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_lo = p.to(v0.dtype)
        acc_o0 = tl.dot(p_lo, v0, acc_o0 * alpha[:, None], input_precision=DOT_PRECISION)
        if D1 > 0:
            acc_o1 = tl.dot(p_lo, v1, acc_o1 * alpha[:, None], input_precision=DOT_PRECISION)
        if HAS_TANGENT:
            acc_t0 = acc_t0 * alpha[:, None]
            if D1 > 0:
                acc_t1 = acc_t1 * alpha[:, None]
            if HAS_SCORE_TANGENT:
                p_st = p * (st * sm_scale)
                r_i = r_i * alpha + tl.sum(p_st, 1)
                p_st_lo = p_st.to(v0.dtype)
                acc_t0 = tl.dot(p_st_lo, v0, acc_t0, input_precision=DOT_PRECISION)
                if D1 > 0:
                    acc_t1 = tl.dot(p_st_lo, v1, acc_t1, input_precision=DOT_PRECISION)
            if HAS_TV:
                tv_rows = _rows(tv_base, TV, tv_head, cols, stride_tvl, ALIGN8)
                tv0 = tl.load(tv_rows + offs_d0[None, :], mask=kv0_mask, other=0.0)
                acc_t0 = tl.dot(p_lo, tv0, acc_t0, input_precision=DOT_PRECISION)
                if D1 > 0:
                    tv1 = tl.load(tv_rows + offs_d1[None, :], mask=kv1_mask, other=0.0)
                    acc_t1 = tl.dot(p_lo, tv1, acc_t1, input_precision=DOT_PRECISION)
        m_i = m_new

    # A row without any valid key (key length 0) has l = 0: its outputs are 0 and its lse is -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    inv_l = 1.0 / l_safe
    o_head = b * stride_ob + h * stride_oh
    o_rows = _rows(O + b * stride_ob + h * stride_oh, O, o_head, offs_m, stride_ol, ALIGN8)
    to_rows = _rows(TO + b * stride_ob + h * stride_oh, TO, o_head, offs_m, stride_ol, ALIGN8)
    o0 = acc_o0 * inv_l[:, None]
    tl.store(o_rows + offs_d0[None, :], o0.to(O.dtype.element_ty), mask=q0_mask)
    if D1 > 0:
        o1 = acc_o1 * inv_l[:, None]
        tl.store(o_rows + offs_d1[None, :], o1.to(O.dtype.element_ty), mask=row_ok[:, None] & d1_ok[None, :])
    if HAS_TANGENT:
        to0 = acc_t0 * inv_l[:, None]
        if D1 > 0:
            to1 = acc_t1 * inv_l[:, None]
        if HAS_SCORE_TANGENT:
            mu = r_i * inv_l
            to0 = to0 - mu[:, None] * o0
            if D1 > 0:
                to1 = to1 - mu[:, None] * o1
        tl.store(to_rows + offs_d0[None, :], to0.to(TO.dtype.element_ty), mask=q0_mask)
        if D1 > 0:
            tl.store(to_rows + offs_d1[None, :], to1.to(TO.dtype.element_ty),
                     mask=row_ok[:, None] & d1_ok[None, :])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)


def _fwd_configs():
    configs = []
    for block_m, block_n, warps, stages in [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3),
                                            (128, 128, 8, 2)]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return configs


def _prune_fwd_configs(configs, named_args, **kwargs):
    # Two fp32 accumulators of BLOCK_M x (D0 + D1) plus two BLOCK_M x BLOCK_N score tiles live in registers:
    # drop the tiles that cannot fit a warp group's register file at wide heads.
    width = named_args["D0"] + named_args["D1"] if "D0" in named_args else kwargs["D0"] + kwargs["D1"]
    kept = [c for c in configs if not (width > 64 and c.kwargs["BLOCK_N"] == 128)]
    return kept or configs


_attention_jvp_fwd_autotuned = triton.autotune(
    configs=_fwd_configs(),
    key=["D0", "D1", "HAS_TQ", "HAS_TK", "HAS_TV", "HAS_KEY_LENGTHS", "LQ_BUCKET", "LK_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
)(_attention_jvp_fwd_kernel)


def _default_fwd_config(width: int) -> dict:
    """The configuration used without autotuning; FACM_EXT_ATTN_FWD_CONFIG="BLOCK_M,BLOCK_N,warps,stages" overrides."""
    override = _env.get("FACM_EXT_ATTN_FWD_CONFIG", "").strip()
    if override:
        try:
            block_m, block_n, warps, stages = (int(x) for x in override.split(","))
        except ValueError as exc:
            raise ValueError(f"FACM_EXT_ATTN_FWD_CONFIG: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages', "
                             f"got {override!r}") from exc
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
    if interpreting():
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if width > 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def _align_hints(*tensors) -> bool:
    """FACM_EXT_ATTN_ALIGN_HINTS=1 (opt-in: not yet run on a GPU) and every tensor 16-byte aligned with batch, head
    and row strides that are multiples of 8 elements: the kernel may then load 72-wide rows as 16-byte vectors."""
    if _env.get("FACM_EXT_ATTN_ALIGN_HINTS", "0") != "1":
        return False
    live = [t for t in tensors if t is not None]
    return all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:3]) for t in live)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def attention_jvp_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                          tk: torch.Tensor | None, tv: torch.Tensor | None, key_lengths: torch.Tensor | None,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward JVP kernel.

    q, tq: [B, H, Lq, D]; k, v, tk, tv: [B, H, Lk, D], one dtype (fp16/bf16; fp32 runs with fp32 dots);
    tangents may be None (zero). key_lengths: optional [B] integer tensor (clamped to [0, Lk]).
    Returns o [B, H, Lq, D] and to [B, H, Lq, D] (contiguous, q's dtype; to is zeros when every tangent is None)
    and lse [B, H, Lq] float32 (natural log of the softmax denominator, -inf for rows without keys).
    """
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    q, k, v, tq, tk, tv = (_unit_last_stride(t) for t in (q, k, v, tq, tk, tv))
    o = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)
    has_tangent = tq is not None or tk is not None or tv is not None
    to = torch.empty_like(o) if has_tangent else torch.zeros_like(o)
    lse = torch.empty((batch, heads, len_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        lse.fill_(float("-inf"))
        return o, to, lse
    d0, d1 = split_head_dim(head_dim)
    args = (
        q, k, v, tq, tk, tv, o, to, lse, key_lengths,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(tq), *_strides3(tk), *_strides3(tv),
        o.stride(0), o.stride(1), o.stride(2),
        heads, len_q, len_k, head_dim, float(scale),
    )
    constexprs = dict(
        D0=d0, D1=d1, MASK_D0=d0 > head_dim, HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None,
        HAS_SCORE_TANGENT=tq is not None or tk is not None, HAS_TANGENT=has_tangent,
        HAS_KEY_LENGTHS=key_lengths is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        LQ_BUCKET=0, LK_BUCKET=0,
    )
    align8 = _align_hints(q, k, v, tq, tk, tv, o)
    constexprs.update(ALIGN8=align8, STATIC_HEAD_DIM=head_dim if align8 else 0)
    if _autotune_enabled():
        constexprs.update(LQ_BUCKET=_bucket(len_q), LK_BUCKET=_bucket(len_k))
        grid = lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _attention_jvp_fwd_autotuned[grid](*args, **constexprs)
    else:
        config = _default_fwd_config(d0 + d1)
        grid = (triton.cdiv(len_q, config["BLOCK_M"]), batch * heads)
        _attention_jvp_fwd_kernel[grid](*args, **constexprs, **config)
    return o, to, lse


# ------------------------------------------------------------------------------------------------- primal backward
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEY_LENGTHS,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_gkb, stride_gkh, stride_gkl,
    H, LQ, LK, HEAD_DIM, sm_scale,
    BLOCK_D: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LQ_BUCKET: tl.constexpr, LK_BUCKET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    kv_len = LK
    if HAS_KEY_LENGTHS:
        kv_len = tl.maximum(tl.minimum(tl.load(KEY_LENGTHS + b).to(tl.int32), LK), 0)
    col_ok = offs_n < kv_len
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * LQ
    qk_scale = sm_scale * 1.4426950408889634
    # Key tiles wholly beyond the key length get no gradient: skip the query loop, store zeros.
    q_end = tl.where(pid_n * BLOCK_N < kv_len, LQ, 0)
    for start_m in range(0, q_end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < LQ
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        p_t = tl.where(col_ok[:, None] & row_ok[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    out_mask = (offs_n < LK)[:, None] & d_ok[None, :]
    grad_offs = b * stride_gkb + h * stride_gkh + offs_n[:, None] * stride_gkl + offs_d[None, :]
    tl.store(DK + grad_offs, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + grad_offs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KEY_LENGTHS,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_gqb, stride_gqh, stride_gql,
    H, LQ, LK, HEAD_DIM, sm_scale,
    BLOCK_D: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LQ_BUCKET: tl.constexpr, LK_BUCKET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < LQ
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                 mask=q_mask, other=0.0)
    stat_offs = pid_bh.to(tl.int64) * LQ + offs_m
    lse2 = tl.load(LSE + stat_offs, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat_offs, mask=row_ok, other=0.0)

    kv_len = LK
    if HAS_KEY_LENGTHS:
        kv_len = tl.maximum(tl.minimum(tl.load(KEY_LENGTHS + b).to(tl.int32), LK), 0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < kv_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(col_ok[None, :] & row_ok[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_gqb + h * stride_gqh + offs_m[:, None] * stride_gql + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


def _bwd_configs(kind: str):
    if kind == "dkdv":
        shapes = [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)]
    else:
        shapes = [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_BWD_KEY = ["BLOCK_D", "HAS_KEY_LENGTHS", "LQ_BUCKET", "LK_BUCKET"]
_attention_bwd_dkdv_autotuned = triton.autotune(configs=_bwd_configs("dkdv"), key=_BWD_KEY)(
    _attention_bwd_dkdv_kernel)
_attention_bwd_dq_autotuned = triton.autotune(configs=_bwd_configs("dq"), key=_BWD_KEY)(_attention_bwd_dq_kernel)


def attention_backward(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, key_lengths: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash backward of ``o = attention(q, k, v)`` from the saved natural-log lse.

    grad_o, q, o: [B, H, Lq, D]; k, v: [B, H, Lk, D]; one dtype. lse: [B, H, Lq] float32 (from the forward).
    key_lengths: optional [B] integer tensor (as in the forward). Returns contiguous dq, dk, dv in q's dtype
    (zero for keys beyond their key length).
    """
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    q, k, v, grad_o = (_unit_last_stride(t) for t in (q, k, v, grad_o))
    dq = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, len_k, head_dim), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (o.float() * grad_o.float()).sum(-1).contiguous()
    lse = lse.float().contiguous()
    common = dict(BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_KEY_LENGTHS=key_lengths is not None,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  LQ_BUCKET=0, LK_BUCKET=0)
    tail = (heads, len_q, len_k, head_dim, float(scale))
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_o))
    dkdv_args = (q, k, v, grad_o, lse, delta, dk, dv, key_lengths, *strides, *_strides3(dk), *tail)
    dq_args = (q, k, v, grad_o, lse, delta, dq, key_lengths, *strides, *_strides3(dq), *tail)
    if _autotune_enabled():
        common.update(LQ_BUCKET=_bucket(len_q), LK_BUCKET=_bucket(len_k))
        _attention_bwd_dkdv_autotuned[lambda meta: (triton.cdiv(len_k, meta["BLOCK_N"]), batch * heads)](
            *dkdv_args, **common)
        _attention_bwd_dq_autotuned[lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)](
            *dq_args, **common)
    else:
        if interpreting():
            config = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        else:
            config = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
        _attention_bwd_dkdv_kernel[(triton.cdiv(len_k, config["BLOCK_N"]), batch * heads)](
            *dkdv_args, **common, **config)
        _attention_bwd_dq_kernel[(triton.cdiv(len_q, config["BLOCK_M"]), batch * heads)](
            *dq_args, **common, **config)
    return dq, dk, dv
