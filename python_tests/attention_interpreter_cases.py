"""The Triton attention kernels run by Triton's CPU interpreter, at small odd shapes in fp32/fp16 (the interpreter
returns garbage for bf16 dots), against torch.func.jvp / autograd of the math attention in float64.

Not collected by itself (no test_ prefix): test_attention_interpreter.py runs this module in a subprocess with
TRITON_INTERPRET=1 and FACM_EXT_BACKEND=triton, so the flag never leaks into GPU tests of the same session.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import assert_rel_close, noncontiguous
from facm_ext.ops import attention as attention_ops
from facm_ext.ops import attention_jvp
from facm_ext.reference.attention import attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or
                                os.environ.get("FACM_EXT_BACKEND") != "triton",
                                reason="run by test_attention_interpreter.py with TRITON_INTERPRET=1")

TANGENT_SETS = {"all": (True, True, True), "tq_only": (True, False, False), "tk_tv": (False, True, True),
                "none": (False, False, False)}


def _inputs(batch, heads, len_q, len_k, head_dim, dtype, tangents=(True, True, True)):
    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    q, k, v = rand(batch, heads, len_q, head_dim), rand(batch, heads, len_k, head_dim), rand(batch, heads, len_k, head_dim)
    tq, tk, tv = (rand(*x.shape) if use else None for x, use in zip((q, k, v), tangents))
    return q, k, v, tq, tk, tv


def _reference_jvp(q, k, v, tq, tk, tv, key_lengths=None):
    primals = tuple(x.double() for x in (q, k, v))
    tangents = tuple(torch.zeros_like(p) if t is None else t.double() for p, t in zip(primals, (tq, tk, tv)))
    return torch.func.jvp(lambda a, b, c: attention(a, b, c, key_lengths=key_lengths), primals, tangents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 1, 17, 72), (2, 1, 17, 17, 128), (1, 2, 130, 40, 72), (1, 1, 33, 130, 64),
                                   (1, 1, 20, 31, 80), (1, 1, 9, 40, 96)])
@pytest.mark.parametrize("tangent_set", list(TANGENT_SETS))
def test_interpreter_forward(dtype, shape, tangent_set):
    q, k, v, tq, tk, tv = _inputs(*shape, dtype, TANGENT_SETS[tangent_set])
    assert attention_ops._forward_backend(q) == "triton"
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv)
    assert_rel_close(o, ref_o, dtype, what="o")
    if tangent_set == "none":
        assert torch.count_nonzero(to) == 0
    else:
        assert_rel_close(to, ref_to, dtype, what="to")


@pytest.mark.parametrize("head_dim", [80, 96, 48])
@pytest.mark.parametrize("tangent_set", ["all", "tk_tv", "tq_only"])
def test_interpreter_exact_head_split(head_dim, tangent_set, monkeypatch):
    # FACM_EXT_ATTN_HEAD_SPLIT=1: two dots per product (80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16).
    monkeypatch.setenv("FACM_EXT_ATTN_HEAD_SPLIT", "1")
    from facm_ext.kernels.attention_jvp_triton import split_head_dim

    assert split_head_dim(head_dim)[1] > 0
    q, k, v, tq, tk, tv = _inputs(1, 2, 40, 70, head_dim, torch.float32, TANGENT_SETS[tangent_set])
    o, to = attention_jvp(q, k, v, tq, tk, tv)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv)
    assert_rel_close(o, ref_o, torch.float32, what="o")
    assert_rel_close(to, ref_to, torch.float32, what="to")


@pytest.mark.parametrize("shape,lengths", [((2, 2, 17, 130, 72), [1, 130]), ((1, 2, 40, 33, 80), None)])
def test_interpreter_align_hints(shape, lengths, monkeypatch):
    from facm_ext.kernels import attention_jvp_triton

    monkeypatch.setenv("FACM_EXT_ATTN_ALIGN_HINTS", "1")
    q, k, v, tq, tk, tv = _inputs(*shape, torch.float16)
    assert attention_jvp_triton._align_hints(q, k, v, tq, tk, tv)
    key_lengths = None if lengths is None else torch.tensor(lengths)
    o, to = attention_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv, key_lengths)
    assert_rel_close(o, ref_o, torch.float16, what="o")
    assert_rel_close(to, ref_to, torch.float16, what="to")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", [[1, 130], [0, 77], [33, 64]])
def test_interpreter_key_lengths_noncontiguous(dtype, lengths):
    q, k, v, tq, tk, tv = _inputs(2, 2, 17, 130, 72, dtype)
    key_lengths = torch.tensor(lengths)
    o, to = attention_jvp(*[noncontiguous(x) for x in (q, k, v, tq, tk, tv)], key_lengths=key_lengths)
    ref_o, ref_to = _reference_jvp(q, k, v, tq, tk, tv, key_lengths)
    assert_rel_close(o, ref_o, dtype, what="o")
    assert_rel_close(to, ref_to, dtype, what="to")
    if 0 in lengths:
        row = lengths.index(0)
        assert torch.count_nonzero(o[row]) == 0 and torch.count_nonzero(to[row]) == 0
    # Padded keys are never read: NaN there changes nothing.
    k2, v2, tv2 = k.clone(), v.clone(), tv.clone()
    for row, length in enumerate(lengths):
        k2[row, :, length:], v2[row, :, length:], tv2[row, :, length:] = float("nan"), float("nan"), float("nan")
    o2, to2 = attention_jvp(q, k2, v2, tq, tk, tv2, key_lengths=key_lengths)
    assert torch.equal(o2, o) and torch.equal(to2, to)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,lengths", [((2, 2, 130, 40, 72), None), ((1, 2, 17, 33, 128), None),
                                           ((3, 1, 33, 70, 64), [0, 31, 70])])
def test_interpreter_backward(dtype, shape, lengths):
    assert attention_ops._backward_backend(torch.empty(1, dtype=dtype), lengths is not None) == "triton"
    q, k, v, tq, tk, tv = _inputs(*shape, dtype)
    key_lengths = None if lengths is None else torch.tensor(lengths)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, _ = attention_jvp(q, k, v, tq, tk, tv, key_lengths=key_lengths)
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad)
    primals64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(attention(*primals64, key_lengths=key_lengths), primals64, grad.double())
    for g, w, name in zip(got, want, "qkv"):
        # The gradient goes through two roundings of the stored o/lse chain more than o: allow 2x o's tolerance.
        assert_rel_close(g, w, dtype, what=f"d{name}", factor=2.0)
