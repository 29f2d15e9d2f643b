"""Transformer blocks run with the fused norm+modulate and gated-residual ops: adaLN-Zero blocks (DiT,
LightningDiT) and Wan 2.2 blocks (per-token modulation; see :func:`wan_block_rule`).

A block of the form

    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), *extra)
    x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

(``modulate(h, shift, scale) = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)``) is recognized from its
children: ``adaLN_modulation`` (a Sequential ending in Linear(C, 6C)), ``norm1``/``norm2`` (LayerNorm over C
without affine, or an RMSNorm-like module), ``attn`` and ``mlp``; forward(x [B, L, C], c [B, C], *extra).
Each norm+modulate then runs as one ``adaln_jvp`` and each residual as one ``gated_residual_jvp`` (instead of
about a dozen elementwise kernels for primal and tangent); attn and mlp go through the transform as usual.

The block's forward is Python code the structure check cannot read, so the first call with a tangent verifies the
fused form against the block's own forward under the transform, on the first sample of the real arguments (and,
for Wan blocks, a window of the first tokens), with
autocast off: both primal and tangent must agree to 1e-3 (fp32) or 1e-9 (fp64) relative. Blocks whose
parameters are not fp32/fp64 cannot be verified that precisely and are never fused this way (their ops still are,
one by one). A failed check is recorded in the report and the block keeps its own forward.

On CUDA under autocast, a verified adaLN block runs as one C++ op, ``adaln_block_jvp_cuda``, which
issues the same kernels from C++ (see :func:`_native_block_call`): the per-op path's ~37 launches from Python per
block are what bound the eager JVP at small batches. With grad, the primal comes from the block's own forward.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Optional

import torch
from torch import nn

from facm_ext import _env, _extension
from facm_ext.ops import _common
from facm_ext.ops import attention as _attention_ops
from facm_ext.ops import rms_norm_rope as _rms_norm_rope_ops

from ._dual import (
    STATE,
    DisableTorchFunctionSubclass,
    DualTensor,
    make_dual,
    record_fallback,
    record_fused,
    split_dual,
    wrap_op_result,
)
from ._rules import call_op, sdpa_pairs
# A module import, not names: this module is imported by _modules' first pattern lookup, after _modules itself has
# run; the names are read at call time (once per projection and norm of a block: a function-level import there
# cost 0.7 us per call).
from . import _modules


def _norm_spec(norm: nn.Module, channels: int):
    """("layer" | "rms", has weight, eps, output-dtype policy) of a block norm, or None when unsupported. The
    weight itself is read at call time (FSDP swaps parameter objects between sharded and unsharded)."""
    if isinstance(norm, nn.LayerNorm):  # subclasses too (Wan's fp32 LayerNorm): the first-call check covers them
        if tuple(norm.normalized_shape) != (channels,) or norm.bias is not None:
            return None
        return "layer", norm.weight is not None, float(norm.eps), "promote"
    rms_norm_type = getattr(nn, "RMSNorm", None)
    if rms_norm_type is not None and type(norm) is rms_norm_type:
        if tuple(norm.normalized_shape) != (channels,) or norm.eps is None:
            return None
        return "rms", norm.weight is not None, float(norm.eps), "promote"
    from ._modules import _pattern_for

    rule = _pattern_for(norm)
    spec = getattr(rule, "norm_spec", None)
    if spec is None or norm.weight.shape[0] != channels:
        return None
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    return "rms", True, float(eps), spec[1]


def adaln_block_rule(module: nn.Module):
    """The fused rule for an adaLN-Zero block (verified on its first call), or None when not this structure."""
    children = dict(module.named_children())
    if set(children) - {"norm1", "norm2", "attn", "mlp", "adaLN_modulation"} or len(children) != 5:
        return None
    modulation = children["adaLN_modulation"]
    if not isinstance(modulation, nn.Sequential) or len(modulation) == 0 or type(modulation[-1]) is not nn.Linear:
        return None
    channels = modulation[-1].in_features
    if modulation[-1].out_features != 6 * channels or module._parameters or module._buffers:
        return None
    norms = (_norm_spec(children["norm1"], channels), _norm_spec(children["norm2"], channels))
    if None in norms:
        return None
    module_ref = weakref.ref(module)
    verdict: dict = {}

    def block_rule(mod, args, kwargs):
        if kwargs or len(args) < 2 or module_ref() is not mod:
            return NotImplemented
        x, c = args[0], args[1]
        # Shapes read with the subclass's torch-function handling off: on a dual, each read would be a dispatch.
        with DisableTorchFunctionSubclass():
            if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] == channels
                    and isinstance(c, torch.Tensor) and c.dim() == 2 and c.shape[0] == x.shape[0]):
                return NotImplemented
            batch = x.shape[0]
        if not _verified_once(verdict, mod, "adaLN block", lambda: tuple(_first_sample(a, batch) for a in args),
                              lambda block, a: _fused_forward(block, a, norms)):
            return NotImplemented
        native = _native_block_call(mod, args, norms)
        if native is not None:
            return native
        return _fused_forward(mod, args, norms)

    return block_rule


def _chunks(value, chunks: int, dim: int, dtype: Optional[torch.dtype] = None) -> list:
    """``value.chunk(chunks, dim)`` as (primal, tangent or None) pairs: the chunks of the primal and of its tangent,
    cast to ``dtype`` first when given. The modulation vectors of a block only go to the fused ops, which take
    primal and tangent apart, so they are not made duals (a view dispatch, a dual per chunk and a split per use);
    :func:`_dual_of` makes one where the block's own expression needs it."""
    primal, tangent = split_dual(value)
    if dtype is not None:
        primal = primal.to(dtype)
        tangent = None if tangent is None else tangent.to(dtype)
    primals = primal.chunk(chunks, dim=dim)
    if tangent is None:
        return [(p, None) for p in primals]
    return list(zip(primals, tangent.chunk(chunks, dim=dim)))


def _dual_of(pair):
    """The value a (primal, tangent) pair stands for: a dual, or the plain primal when the tangent is None."""
    primal, tangent = pair
    return primal if tangent is None else make_dual(primal, tangent)


def _adaln(x, shift, scale, spec, norm_module: nn.Module, per_token: bool = False,
           cast_to: Optional[torch.dtype] = None):
    """norm(x) * (1 + scale) + shift, fused; falls back to the block's own expression. shift/scale: (primal,
    tangent) pairs (see :func:`_chunks`), [B, C] broadcast over tokens, or per token [B, L, C] (``per_token``).
    cast_to: the dtype the result is cast to next (None: none); the fused op then writes it, rounding once."""
    kind, has_weight, eps, policy = spec
    weight = norm_module.weight if has_weight else None
    x_p, x_t = split_dual(x)
    out_dtype = x_p.dtype
    if weight is not None and policy == "promote":
        out_dtype = torch.promote_types(x_p.dtype, weight.dtype)
    if x_t is not None:
        if out_dtype != x_p.dtype:  # the norm's output is wider than x (fp32 weight): normalize in that dtype
            x_p, x_t = x_p.to(out_dtype), x_t.to(out_dtype)
        shift_p, shift_t = shift
        scale_p, scale_t = scale
        w = None if weight is None else (weight if weight.dtype == x_p.dtype else weight.to(x_p.dtype))
        result, why = call_op("adaln_jvp", "adaLN block norm+modulate", x_p, x_t, shift_p, shift_t, scale_p,
                              scale_t, norm=kind, weight=w, eps=eps, out_dtype=cast_to)
        if result is not None:
            return wrap_op_result(*result)
        record_fallback("adaLN block norm+modulate", why)
    shift, scale = _dual_of(shift), _dual_of(scale)
    if per_token:
        return norm_module(x) * (1 + scale) + shift
    return norm_module(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _gated(x, gate, y, per_token: bool = False):
    """x + gate * y (gate: a (primal, tangent) pair, [B, C] broadcast over tokens, or per token [B, L, C]), fused;
    falls back to the block's own expression."""
    x_p, x_t = split_dual(x)
    gate_p, gate_t = gate
    y_p, y_t = split_dual(y)
    if isinstance(y_p, torch.Tensor) and y_p.shape == x_p.shape and (x_t is not None or gate_t is not None
                                                                      or y_t is not None):
        result, why = call_op("gated_residual_jvp", "adaLN block gated residual", x_p, x_t, gate_p, gate_t, y_p,
                              y_t)
        if result is not None:
            out_dtype = torch.promote_types(torch.promote_types(x_p.dtype, gate_p.dtype), y_p.dtype)
            primal, tangent = result
            if primal.dtype != out_dtype:
                primal, tangent = primal.to(out_dtype), tangent.to(out_dtype)
            return wrap_op_result(primal, tangent)
        record_fallback("adaLN block gated residual", why)
    gate = _dual_of(gate)
    if per_token:
        return x + y * gate
    return x + gate.unsqueeze(1) * y


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _autocast_input_dtype(module: nn.Module, x_dtype: torch.dtype, device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when ``module``'s input (of ``x_dtype``, fp32) only feeds an nn.Linear under autocast
    (a verified attention module's qkv, a recognized MLP's first layer): that Linear casts it to the 16-bit dtype
    first, so the norm before it may write that dtype directly (rounded once, as the cast rounds). None where the
    call could reach other code: autocast off, a module-call handler, a registered rule, hooks, another form."""
    if x_dtype != torch.float32 or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in _SIXTEEN_BIT or not _own_rule_applies(module, check_hooks=True):
        return None
    check = getattr(_modules._pattern_for(module), "input_only_to_a_linear", None)
    return dtype if check is not None and check(module) else None


def _fused_forward(block: nn.Module, args: tuple, norms):
    x, c, extra = args[0], args[1], args[2:]
    modulation = block.adaLN_modulation(c)
    with DisableTorchFunctionSubclass():
        x_dtype, device_type = x.dtype, x.device.type
        widen = x_dtype == torch.float32 and modulation.dtype in _SIXTEEN_BIT
    # An fp32 residual stream with 16-bit modulation (fp32 parameters under autocast): the norm op would cast each
    # of its four modulation chunks to fp32 (8 launches per block); one cast of the [B, 6C] output and its tangent
    # gives the same values. The gated residual reads an fp32 gate as it reads a 16-bit one.
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _chunks(modulation, 6, 1,
                                                                              torch.float32 if widen else None)
    attn_dtype = _autocast_input_dtype(block.attn, x_dtype, device_type)
    mlp_dtype = _autocast_input_dtype(block.mlp, x_dtype, device_type)
    x = _gated(x, gate_msa, block.attn(_adaln(x, shift_msa, scale_msa, norms[0], block.norm1, cast_to=attn_dtype),
                                       *extra))
    x = _gated(x, gate_mlp, block.mlp(_adaln(x, shift_mlp, scale_mlp, norms[1], block.norm2, cast_to=mlp_dtype)))
    return x


# ------------------------------------------------------------------------------------ adaLN blocks from C++
_NATIVE_BLOCK_KERNEL = "adaln_block_jvp_cuda"


# Above this many rows (B x L), "auto" keeps a block on the per-op path: there the GPU time decides, and the per-op
# path's MLP (mlp_jvp, the activation in the up-projection GEMM's epilogue) saves the activation's round trip
# through memory that the native op's cuBLAS GEMMs + activation kernel make. LightningDiT-XL/1, no grad, H100:
# 16,384 rows (B=64) took 84.4 ms of GPU time natively against 79.0 ms per-op (88 against 86.5 ms wall); 4,096 rows
# (B=16) 26.7 ms wall natively against 57.5 ms per-op, whose ~1,000 launches from Python outlast the GPU work.
NATIVE_BLOCK_MAX_ROWS = 12288


@_env.per_snapshot
def native_block_mode() -> str:
    """FACM_EXT_NATIVE_BLOCKS: "auto" (default: the native op up to NATIVE_BLOCK_MAX_ROWS rows), "1" (wherever it
    applies, any size) or "0" (never: the per-op path, for A/B runs and debugging)."""
    value = _env.get("FACM_EXT_NATIVE_BLOCKS", "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"FACM_EXT_NATIVE_BLOCKS: expected auto, 0 or 1, got {value!r}")
    return value


def _plain_module(module: nn.Module) -> bool:
    """Called as its class defines it: no forward replaced on the instance, not compiled in place."""
    return "forward" not in module.__dict__ and module._compiled_call_impl is None


def _native_block_call(block: nn.Module, args: tuple, norms):
    """The block's output as a dual from one ``adaln_block_jvp_cuda`` call (csrc/blocks/adaln_block_jvp.cpp), or
    None where the per-op path must run.

    That op issues from C++ the kernels the per-op path issues from Python for this block (same kernel ops, GEMMs,
    casts and order), except the MLP, which it runs as cuBLAS up + activation kernel + cuBLAS down instead of
    mlp_jvp's Triton GEMM with the activation in its epilogue. It applies only where the per-op path would run
    those kernels and nothing else:
    - the op records no autograd graph: where the primal needs one (grad mode on and an input or parameter
      requires grad), the block's own forward on the primals computes it beside the op (a plain forward's graph
      and gradients);
    - not inside facm_ext.jvp.graph, whose replays cost no host time (the per-op path's kernels take less GPU time);
    - plain eager execution: not compiling, no dispatch mode or functorch transform, no module-call handler (the
      chain's) or registered rule for a module the per-op path would call, FACM_EXT_BACKEND unset, plain tensors;
    - CUDA under fp16/bf16 autocast (blocks are verified, hence fused, only with fp32/fp64 parameters), an fp32
      or autocast-dtype residual stream;
    - the block's attention module verified in the DiT / LightningDiT form, with either no q/k norm and no RoPE,
      or qk RMSNorm + RoPE tables that run as ``rms_norm_rope_jvp``, and a head dim whose default attention
      kernel is the CUDA one; the MLP recognized (GELU-tanh or SwiGLU); the modulation ``Sequential(SiLU,
      Linear)``.
    With FACM_EXT_NATIVE_BLOCKS=auto (the default), only up to NATIVE_BLOCK_MAX_ROWS rows (B x L); =1 at any size;
    =0 never."""
    mode = native_block_mode()
    if mode == "0" or STATE.per_op_blocks or len(args) > 3:
        return None
    x, c = args[0], args[1]
    rope = args[2] if len(args) == 3 else None
    x_p, x_t = split_dual(x)
    c_p, c_t = split_dual(c)
    if x_t is None or not x_p.is_cuda or torch.compiler.is_compiling() or x_t.dtype != x_p.dtype:
        return None
    if c_t is not None and c_t.dtype != c_p.dtype:
        return None
    if mode == "auto" and x_p.shape[0] * x_p.shape[1] > NATIVE_BLOCK_MAX_ROWS:
        return None
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return None
    if _common._forced_backend() is not None or not _extension.has_kernel(_NATIVE_BLOCK_KERNEL):
        return None
    attn, mlp, modulation = block.attn, block.mlp, block.adaLN_modulation
    if not (type(modulation) is nn.Sequential and len(modulation) == 2 and type(modulation[0]) is nn.SiLU
            and not modulation[0].inplace and type(modulation[1]) is nn.Linear):
        return None
    ada, qkv, proj = modulation[1], attn.qkv, attn.proj
    for module in (modulation, modulation[0], ada, qkv, proj):
        if not (_plain_module(module) and _own_rule_applies(module, check_hooks=False)):
            return None
    if not (_own_rule_applies(attn, check_hooks=False) and _own_rule_applies(mlp, check_hooks=False)):
        return None
    attn_rule, mlp_rule = _modules._pattern_for(attn), _modules._pattern_for(mlp)
    layers = getattr(mlp_rule, "layers", None)
    verified = getattr(attn_rule, "verified", None)
    if layers is None or verified is None or not verified(attn):
        return None
    fc1, fc2, activation = layers()
    if fc1 is None or fc2 is None:
        return None

    # Blocks are verified (and fused) only with fp32/fp64 parameters, so 16-bit compute means autocast here.
    if not torch.is_autocast_enabled("cuda"):
        return None
    compute = torch.get_autocast_dtype("cuda")
    if (compute not in _SIXTEEN_BIT or x_p.dtype not in (torch.float32, compute)
            or c_p.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
        return None
    (kind, has_weight, eps1, policy), second = norms
    if second[0] != kind or second[1] != has_weight or second[3] != policy:
        return None
    norm1_weight = block.norm1.weight if has_weight else None
    norm2_weight = block.norm2.weight if has_weight else None
    norm_dtype = x_p.dtype
    if has_weight and policy == "promote":
        norm_dtype = torch.promote_types(norm_dtype, norm1_weight.dtype)
        if torch.promote_types(x_p.dtype, norm2_weight.dtype) != norm_dtype:
            return None
    attn_input = _autocast_input_dtype(attn, x_p.dtype, "cuda")
    mlp_input = _autocast_input_dtype(mlp, x_p.dtype, "cuda")

    heads, head_dim = attn.num_heads, attn.head_dim
    if not _attention_ops.cuda_kernel_is_default(head_dim):
        return None
    q_norm_weight = k_norm_weight = cos = sin = None
    q_eps = k_eps = 0.0
    interleaved = False
    if rope is None:
        if type(attn.q_norm) is not nn.Identity or type(attn.k_norm) is not nn.Identity:
            return None
    else:
        spec = _norm_rope_spec(attn, rope, compute, "cuda")
        if spec is None:
            return None
        ((q_norm_weight, q_eps, _), (k_norm_weight, k_eps, _)), (cos, sin), rope_rule = spec
        tokens = x_p.shape[1]
        if (head_dim % 2 or head_dim > _rms_norm_rope_ops.MAX_KERNEL_HEAD_DIM or cos.dim() != 2
                or cos.shape != sin.shape or cos.shape[0] != tokens or cos.shape[1] not in (head_dim, head_dim // 2)
                or not (cos.is_cuda and sin.is_cuda)):
            return None
        interleaved = rope_rule.interleaved

    tensors = (x_p, x_t, c_p, c_t, ada.weight, ada.bias, norm1_weight, norm2_weight, qkv.weight, qkv.bias,
               q_norm_weight, k_norm_weight, cos, sin, proj.weight, proj.bias, fc1.weight, fc1.bias, fc2.weight,
               fc2.bias)
    needs_grad = False
    grad_mode = torch.is_grad_enabled()
    for t in tensors:
        if t is not None:
            if type(t) not in _common._EXACT_TENSOR_TYPES:
                return None
            needs_grad = needs_grad or (grad_mode and t.requires_grad)
    primal, tangent = torch.ops.facm_ext.adaln_block_jvp_cuda(
        x_p, x_t, c_p, c_t, ada.weight, ada.bias, 1 if kind == "layer" else 2, norm1_weight, norm2_weight,
        eps1, second[2], norm_dtype, qkv.weight, qkv.bias, heads, q_norm_weight, k_norm_weight, q_eps, k_eps, cos,
        sin, interleaved, proj.weight, proj.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation, compute,
        attn_input, mlp_input)
    if needs_grad:
        # The op records no graph. The primal that needs one is the block's own forward on the plain primals (no
        # tangents, so the transform lets every call through; the caller's autocast applies): a plain forward's
        # graph, activations and gradients, one more forward of GPU work, and far less host work than the per-op
        # path's ops with their autograd nodes.
        primal = block(x_p, c_p, *args[2:])
    if STATE.report is not None:
        how = " (tangent; the primal with grad from the block's own forward)" if needs_grad else ""
        record_fused(f"{type(block).__name__} (adaLN block) -> {_NATIVE_BLOCK_KERNEL}{how}")
    return wrap_op_result(primal, tangent)


def _register_native_block_fake() -> None:
    @torch.library.register_fake(f"facm_ext::{_NATIVE_BLOCK_KERNEL}")
    def _(x, tx, c, tc, *weights_and_options):
        return x.new_empty(x.shape), x.new_empty(x.shape)


if _extension.has_kernel(_NATIVE_BLOCK_KERNEL):
    _register_native_block_fake()


def _first_sample(value, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        primal, tangent = split_dual(value)
        primal = primal.detach()[:1]
        return make_dual(primal, None if tangent is None else tangent[:1]) if type(value) is DualTensor else primal
    return value


def _widen(value, dtype: torch.dtype):
    if not isinstance(value, torch.Tensor) or value.dtype not in _SIXTEEN_BIT:
        return value
    primal, tangent = split_dual(value)
    if type(value) is DualTensor:
        return make_dual(primal.to(dtype), None if tangent is None else tangent.to(dtype))
    return primal.to(dtype)


def _verified_once(verdict: dict, mod: nn.Module, kind: str, make_sample, fused_forward) -> bool:
    """Whether a fused rule may run for this module instance: on the first call its fused forward is checked against
    the module's own forward (:func:`_verify`) on ``make_sample()`` (None: the call is not in the ``kind`` form) and
    the verdict is kept in ``verdict``; a failed check is reported as a fallback, with its reason."""
    if "ok" not in verdict:
        sample = make_sample()
        if sample is None:
            verdict["ok"], why = False, f"not verified: arguments not in the {kind} form"
        else:
            verdict["ok"], why = _verify(mod, sample, fused_forward)
        if not verdict["ok"]:
            record_fallback(f"{type(mod).__name__} ({kind})", why)
    return verdict["ok"]


def _verify(block: nn.Module, sample: tuple, fused_forward) -> tuple[bool, Optional[str]]:
    """Compare ``fused_forward(block, sample)`` with the block's own forward (under the transform, without the
    block's hooks, which the pattern requires to be absent or, under run_module, handled by the caller) on the
    reduced arguments ``sample``."""
    params = list(block.parameters())
    if not params or any(p.dtype not in (torch.float32, torch.float64) for p in params):
        return False, "not verified: parameters are not fp32/fp64, so the fused form keeps per-op fusion only"
    # Low-precision activations (autocast outputs such as a bf16 text context) are widened to the parameters'
    # dtype: the check is about the block's structure, run precisely.
    sample = tuple(_widen(a, params[0].dtype) for a in sample)
    report, STATE.report = STATE.report, None
    try:
        with torch.no_grad(), torch.autocast(params[0].device.type, enabled=False):
            reference = block.forward(*sample)
            fused = fused_forward(block, sample)
    except (RuntimeError, ValueError, TypeError) as exc:
        # E.g. low-precision activations with fp32 weights only run under autocast: no precise check possible.
        return False, f"not verified: the check without autocast failed ({type(exc).__name__}: {exc})"[:300]
    finally:
        STATE.report = report
    ref_p, ref_t = split_dual(reference)
    fused_p, fused_t = split_dual(fused)
    if not (isinstance(ref_p, torch.Tensor) and isinstance(fused_p, torch.Tensor)) or ref_p.shape != fused_p.shape:
        return False, "fused form does not reproduce the block's output structure"
    # fp32: 1e-3 leaves room for TF32-class kernels inside attn/mlp (identical in both forms, but fed inputs that
    # differ in the last bits); any structural difference (a missing gate, another modulation) is O(1).
    tol = 1e-9 if ref_p.dtype == torch.float64 else 1e-3
    for name, a, b in (("primal", fused_p, ref_p), ("tangent", fused_t, ref_t)):
        a = torch.zeros_like(ref_p) if a is None else a
        b = torch.zeros_like(ref_p) if b is None else b
        diff = (a.double() - b.double()).norm().item()
        if not diff <= tol * max(b.double().norm().item(), 1e-30):
            return False, f"fused form differs from the block's forward ({name}); block not fused"
    return True, None


# ------------------------------------------------------------------------------------------------ Wan blocks
_WAN_CHILDREN = {"norm1", "self_attn", "norm3", "cross_attn", "norm2", "ffn"}
# Tokens of the window the first-call check of a Wan block runs on (full-size blocks have ~32k-75k tokens).
_WAN_CHECK_TOKENS = 64


def wan_block_rule(module: nn.Module):
    """The fused rule for a Wan 2.2 block (official ``WanAttentionBlock`` structure):

        mods = (modulation.unsqueeze(0) + e).chunk(6, dim=2), each squeezed to a per-token [B, L, C] view
        y = self_attn((norm1(x) * (1 + scale_sa) + shift_sa).to(dt), seq_lens, rope_cos, rope_sin)
        x = x + y * gate_sa
        x = x + cross_attn(norm3(x).to(dt), context, context_lens)
        y = ffn((norm2(x) * (1 + scale_ff) + shift_ff).to(dt))
        return x + y * gate_ff                                   (dt = self_attn.q.weight.dtype)

    forward(x, e, seq_lens, rope_cos, rope_sin, context, context_lens=None). Verified on its first call on the
    first sample and a window of the first tokens (tables and key lengths cut to match). Or None."""
    children = dict(module.named_children())
    if set(children) != _WAN_CHILDREN or module._buffers or set(module._parameters) != {"modulation"}:
        return None
    modulation = module.modulation
    q = getattr(children["self_attn"], "q", None)
    if modulation is None or modulation.dim() != 3 or modulation.shape[:2] != (1, 6) or type(q) is not nn.Linear:
        return None
    channels = modulation.shape[2]
    norms = (_norm_spec(children["norm1"], channels), _norm_spec(children["norm2"], channels))
    if None in norms or norms[0][0] != "layer" or norms[1][0] != "layer":
        return None
    module_ref = weakref.ref(module)
    verdict: dict = {}

    def fused(block, args):
        return _wan_fused_forward(block, args, norms)

    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    if len(signature.parameters) != 7:
        return None

    def block_rule(mod, args, kwargs):
        if module_ref() is not mod:
            return NotImplemented
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return NotImplemented
        bound.apply_defaults()
        args = tuple(bound.arguments.values())
        x, e = args[0], args[1]
        with DisableTorchFunctionSubclass():  # shape reads on duals without a dispatch each
            if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] == channels
                    and isinstance(e, torch.Tensor) and e.dim() == 4 and tuple(e.shape[2:]) == (6, channels)
                    and e.shape[:2] == x.shape[:2]):
                return NotImplemented
        if not _verified_once(verdict, mod, "Wan block", lambda: _wan_window(args), fused):
            return NotImplemented
        return fused(mod, args)

    return block_rule


def _wan_window(args: tuple):
    """The first sample and the first tokens of Wan block arguments, or None when they do not have that form."""
    x, e, seq_lens, rope_cos, rope_sin, context = args[:6]
    context_lens = args[6] if len(args) > 6 else None
    batch, tokens = x.shape[0], x.shape[1]
    window = min(tokens, _WAN_CHECK_TOKENS)

    def cut(value, token_dim):
        primal, tangent = split_dual(value)
        index = (slice(0, 1),) + (slice(None),) * (token_dim - 1) + (slice(0, window),)
        primal = primal.detach()[index]
        return make_dual(primal, None if tangent is None else tangent[index]) if tangent is not None else primal

    for table in (rope_cos, rope_sin):
        if table is not None and (not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != tokens):
            return None
    if seq_lens is not None and (not isinstance(seq_lens, torch.Tensor) or seq_lens.shape != (batch,)):
        return None
    x_w, e_w = cut(x, 1), cut(e, 1)
    cos_w = None if rope_cos is None else split_dual(rope_cos)[0][:window]
    sin_w = None if rope_sin is None else split_dual(rope_sin)[0][:window]
    lens_w = None if seq_lens is None else seq_lens[:1].clamp(max=window)
    context_w = _first_sample(context, batch)
    context_lens_w = None if context_lens is None else context_lens[:1]
    return x_w, e_w, lens_w, cos_w, sin_w, context_w, context_lens_w


def _wan_fused_forward(block: nn.Module, args: tuple, norms):
    x, e, seq_lens, rope_cos, rope_sin, context = args[:6]
    context_lens = args[6] if len(args) > 6 else None
    compute_dtype = block.self_attn.q.weight.dtype
    mods = [(p.squeeze(2), None if t is None else t.squeeze(2))
            for p, t in _chunks(block.modulation.unsqueeze(0) + e, 6, 2)]
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
    h = _cast(_adaln(x, shift_sa, scale_sa, norms[0], block.norm1, per_token=True, cast_to=compute_dtype),
              compute_dtype)
    x = _gated(x, gate_sa, block.self_attn(h, seq_lens, rope_cos, rope_sin), per_token=True)
    x = x + block.cross_attn(_cast(block.norm3(x), compute_dtype), context, context_lens)
    h = _cast(_adaln(x, shift_ff, scale_ff, norms[1], block.norm2, per_token=True, cast_to=compute_dtype),
              compute_dtype)
    return _gated(x, gate_ff, block.ffn(h), per_token=True)


def _cast(value, dtype: torch.dtype):
    """``value.to(dtype)`` for a value just computed here: itself when it has that dtype already (``.to`` would
    return an alias of it through a dispatched fallback)."""
    with DisableTorchFunctionSubclass():
        same = value.dtype == dtype
    return value if same else value.to(dtype)


# -------------------------------------------------------------------------------------------- attention modules
_ATTENTION_CHILDREN = {"qkv", "q_norm", "k_norm", "proj"}


def attention_module_rule(module: nn.Module):
    """The fused rule for a self-attention module of DiT's and LightningDiT's form (timm's ``Attention``):

        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))

    with ``forward(x)`` or ``forward(x, rope=None)``; ``qkv`` Linear(C, 3C), ``proj`` Linear(C, C), C = num_heads *
    head_dim. The same ops run on primal and tangent side by side: the projections, the norms, RoPE and the
    attention through the fused ops the per-op path would call, the reshapes on both; the per-op path makes a dual
    of each of a dozen intermediates and dispatches every reshape. A step whose op declines, or whose module the
    per-op path would not send to the same rule (a module-call handler, a registered rule, hooks, a replaced
    forward), runs as the per-op path runs it. Verified on the first call like the blocks. Or None."""
    children = dict(module.named_children())
    if set(children) != _ATTENTION_CHILDREN or module._parameters or module._buffers:
        return None
    qkv, proj = children["qkv"], children["proj"]
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if type(qkv) is not nn.Linear or type(proj) is not nn.Linear or type(heads) is not int or type(head_dim) is not int:
        return None
    channels = heads * head_dim
    if (qkv.in_features, qkv.out_features, proj.in_features, proj.out_features) != (channels, 3 * channels,
                                                                                   channels, channels):
        return None
    parameters = _modules.forward_parameters(module)
    if parameters is None:
        return None
    names = [p.name for p in parameters]
    if names not in (["x"], ["x", "rope"]) or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in parameters):
        return None
    if len(parameters) == 2 and parameters[1].default is not None:
        return None
    module_ref = weakref.ref(module)
    verdict: dict = {}

    def attention_rule(mod, args, kwargs):
        if module_ref() is not mod or len(args) > len(names) or not set(kwargs) <= set(names[len(args):]):
            return NotImplemented
        x = args[0] if args else kwargs.get("x")
        rope = args[1] if len(args) > 1 else kwargs.get("rope")
        with DisableTorchFunctionSubclass():  # shape reads on duals without a dispatch each
            if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] == channels):
                return NotImplemented
            batch = x.shape[0]
        if not _verified_once(verdict, mod, "attention module", lambda: (_first_sample(x, batch), rope),
                              lambda m, a: _attention_forward(m, *a)):
            return NotImplemented
        return _attention_forward(mod, x, rope)

    # Once verified, the module's input only feeds its qkv Linear (see _autocast_input_dtype).
    attention_rule.verified = lambda mod: module_ref() is mod and verdict.get("ok") is True
    attention_rule.input_only_to_a_linear = attention_rule.verified
    return attention_rule


def _attention_forward(module: nn.Module, x, rope):
    x_p, x_t = split_dual(x)
    batch, tokens, channels = x_p.shape
    heads, head_dim = module.num_heads, module.head_dim
    # q, k, v as [B, L, H, D] slices of the qkv output: the model's [B, H, L, D] ones are their transposes.
    qkv = _pair_map(_module_pair(module.qkv, (x_p, x_t)), lambda t: t.reshape(batch, tokens, 3, heads, head_dim))
    q, k, v = _unbind_pair(qkv, dim=2)
    fused = None if rope is None else _norm_rope_pairs(module, q, k, rope)
    if fused is not None:
        # q/k norm and RoPE in one op each, read in place from the qkv output; outputs in its [B, L, H, D] order.
        q, k, v = (_pair_map(pair, _heads_first) for pair in (*fused, v))
    elif _per_row(module.q_norm, head_dim) and _per_row(module.k_norm, head_dim):
        # A norm of each head's row gives the same values in either order; on the [B, L, H, D] slice the norm
        # kernel reads q and k in place (two strided row dims), where the [B, H, L, D] transposes (three) would be
        # copied first, four copies per block.
        q, k = _module_pair(module.q_norm, q), _module_pair(module.k_norm, k)
        q, k, v = (_pair_map(pair, _heads_first) for pair in (q, k, v))
    else:
        q, k, v = (_pair_map(pair, _heads_first) for pair in (q, k, v))
        q, k = _module_pair(module.q_norm, q), _module_pair(module.k_norm, k)
    if rope is not None and fused is None:
        q, k = _module_pair(rope, q, check_hooks=True), _module_pair(rope, k, check_hooks=True)
    out = _pair_map(_sdpa_pair(q, k, v), lambda t: t.transpose(1, 2).reshape(batch, tokens, channels))
    return _value_of(_module_pair(module.proj, out))


def _rms_norm_of(norm: nn.Module, width: int):
    """(weight or None, eps, output-dtype policy) of a norm that is an RMSNorm over its input's last dim (``width``
    wide): nn.RMSNorm or an RMSNorm-like module the transform verified (see :func:`_norm_spec`); else None."""
    spec = _norm_spec(norm, width)
    if spec is None or spec[0] != "rms":
        return None
    _, has_weight, eps, policy = spec
    return (norm.weight if has_weight else None), eps, policy


def _norm_rope_spec(module: nn.Module, rope, dtype: torch.dtype, device_type: str):
    """(the two norms' (weight, eps, policy), (cos, sin), the rotary module's rule) where ``rope(q_norm(q))`` and
    ``rope(k_norm(k))`` of an attention module may each run as one ``rms_norm_rope_jvp`` for q, k of ``dtype``;
    else None.

    Fused only where the per-op path would send all three modules to their own rules (no module-call handler,
    registered rule or hook), both norms are RMSNorms over head_dim, the rotary module holds its tables, and the
    dtype the per-op path would hand to attention is q's own: the norm's and RoPE's fp32 results narrowed back by
    SDPA's autocast cast, or no cast at all. The op computes in fp32 and rounds once to q's dtype, as that cast
    does."""
    if not isinstance(rope, nn.Module):
        return None
    if not (_own_rule_applies(module.q_norm, check_hooks=False) and _own_rule_applies(module.k_norm, check_hooks=False)
            and _own_rule_applies(rope, check_hooks=True)):
        return None
    head_dim = module.head_dim
    norms = _rms_norm_of(module.q_norm, head_dim), _rms_norm_of(module.k_norm, head_dim)
    rope_rule = _modules._pattern_for(rope)
    tables = getattr(rope_rule, "rope_tables", lambda _: None)(rope)
    if None in norms or tables is None:
        return None
    cos = tables[0]
    for weight, _, policy in norms:
        out = dtype if weight is None or policy == "input" else (
            weight.dtype if policy == "weight" else torch.promote_types(dtype, weight.dtype))
        if rope_rule.promotes:
            out = torch.promote_types(out, cos.dtype)
        if torch.is_autocast_enabled(device_type) and out in (torch.float16, torch.bfloat16, torch.float32):
            out = torch.get_autocast_dtype(device_type)
        if out != dtype:
            return None
    return norms, tables, rope_rule


def _norm_rope_pairs(module: nn.Module, q, k, rope):
    """``rope(q_norm(q))`` and ``rope(k_norm(k))`` as pairs through one ``rms_norm_rope_jvp`` each, for q, k the
    [B, L, H, D] (primal, tangent) slices of the qkv output; or None where the steps must run one by one (see
    :func:`_norm_rope_spec`)."""
    (q_p, q_t), (k_p, k_t) = q, k
    if (q_t is None and k_t is None) or q_p.dtype != k_p.dtype:
        return None
    spec = _norm_rope_spec(module, rope, q_p.dtype, q_p.device.type)
    if spec is None:
        return None
    norms, (cos, sin), rope_rule = spec
    modules = (module.q_norm, module.k_norm)
    results = []
    for (x_p, x_t), (weight, eps, _), norm in zip((q, k), norms, modules):
        what = f"{type(norm).__name__} + {type(rope).__name__} (RMSNorm + RoPE)"
        result, why = call_op("rms_norm_rope_jvp", what, x_p, x_t, weight, cos, sin, eps=eps,
                              interleaved=rope_rule.interleaved, layout="BLHD")
        if result is None:
            record_fallback(what, why)
            return None
        results.append(result)
    return results


def _pair_map(pair, fn):
    primal, tangent = pair
    return fn(primal), None if tangent is None else fn(tangent)


def _unbind_pair(pair, dim: int = 0):
    primal, tangent = pair
    if tangent is None:
        return [(p, None) for p in primal.unbind(dim)]
    return list(zip(primal.unbind(dim), tangent.unbind(dim)))


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] -> the [B, H, L, D] view."""
    return t.transpose(1, 2)


def _per_row(norm: nn.Module, width: int) -> bool:
    """Whether ``norm`` maps each row of its input's last dim (``width`` wide) on its own, the same way for every
    row: nn.Identity, nn.LayerNorm / nn.RMSNorm over (width,), or an RMSNorm-like module the transform verified."""
    if type(norm) is nn.Identity:
        return True
    if type(norm) in _ROW_NORM_TYPES:
        return tuple(norm.normalized_shape) == (width,)
    spec = getattr(_modules._pattern_for(norm), "norm_spec", None)
    weight = getattr(norm, "weight", None)
    return spec is not None and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (width,)


_ROW_NORM_TYPES = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def _value_of(pair):
    """The value a pair of the transform's own results stands for (a dual, or the primal without a tangent)."""
    primal, tangent = pair
    return primal if tangent is None else wrap_op_result(primal, tangent)


def _own_rule_applies(module: nn.Module, check_hooks: bool) -> bool:
    """Whether the per-op path sends a call of ``module`` to the transform's own rule for it: no module-call handler
    claims it and no registered rule covers its type (and, with check_hooks, it has no hooks; callers inside a
    pattern module's subtree rely on the pattern's own hook check)."""
    handlers = _modules._HANDLERS
    if handlers and any(predicate(module) for predicate, _ in handlers):
        return False
    return _modules._user_rule(type(module)) is None and not (check_hooks and _modules._has_hooks(module))


def _module_pair(module, pair, *extra, check_hooks: bool = False):
    """``module(value, *extra)`` as a pair, ``pair`` standing for the value (``extra``: plain arguments): through
    the module's rule on the pair where the per-op path would send the call to that rule, else the module called
    on the value (the per-op path itself). check_hooks: the module is not in the subtree whose hooks the caller
    checked."""
    if isinstance(module, nn.Module) and _own_rule_applies(module, check_hooks):
        if type(module) is nn.Identity and not extra:
            return pair
        if type(module) is nn.Linear:
            if not extra and _plain_module(module):
                result = _linear_pair(module, *pair)
                if result is not None:
                    return result
        else:
            pair_rule = getattr(_modules._pattern_for(module), "pair_rule", None)
            if pair_rule is not None:
                result = pair_rule(module, *pair, *extra)
                if result is not None:
                    return result
    return split_dual(module(_value_of(pair), *extra))


def _linear_pair(module: nn.Linear, x_p, x_t):
    """F.linear's fused rule on a pair (None where that rule falls back: no tangent, the op declined)."""
    if x_t is None or type(module.weight) is DualTensor or type(module.bias) is DualTensor:
        return None
    result, _ = call_op("linear_jvp", "F.linear", x_p, x_t, module.weight, module.bias)
    return result


def _sdpa_pair(q, k, v):
    (qp, tq), (kp, tk), (vp, tv) = q, k, v
    if tq is not None or tk is not None or tv is not None:
        result, _ = sdpa_pairs(qp, kp, vp, tq, tk, tv)
        if result is not None:
            return result
    # Where the fused op declined, the per-op path (its rule records why).
    return split_dual(torch.nn.functional.scaled_dot_product_attention(_value_of(q), _value_of(k), _value_of(v)))


_WAN_ATTENTION_CHILDREN = {"q", "k", "v", "o", "norm_q", "norm_k", "rope", "attention"}
_WAN_SELF_ATTENTION_ARGS = ["x", "seq_lens", "rope_cos", "rope_sin"]
_WAN_CROSS_ATTENTION_ARGS = ["x", "context", "context_lens"]


def wan_attention_rule(module: nn.Module):
    """The fused rule for Wan's self- and cross-attention modules (official ``WanSelfAttention`` /
    ``WanCrossAttention``): ``_heads(t) = t.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)``,

        self:  q = _heads(norm_q(q(x))); k = _heads(norm_k(k(x))); v = _heads(v(x))
               if rope_cos is not None: q, k = rope(q, rope_cos, rope_sin), rope(k, rope_cos, rope_sin)
               return o(attention(q, k, v, seq_lens).transpose(1, 2).flatten(2))
        cross: the same with k and v from ``context``, no RoPE, ``context_lens`` as the key lengths

    forward(x, seq_lens, rope_cos, rope_sin) or forward(x, context, context_lens=None). As for
    :func:`attention_module_rule`: the projections, norms and RoPE through the fused ops on primal/tangent pairs,
    the head reshapes on both, ``attention`` (a module) called as the per-op path calls it. Verified on the first
    call, on the first sample and a window of the first tokens. Or None."""
    children = dict(module.named_children())
    if set(children) != _WAN_ATTENTION_CHILDREN or module._parameters or module._buffers:
        return None
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if type(heads) is not int or type(head_dim) is not int:
        return None
    channels = heads * head_dim
    for name in ("q", "k", "v", "o"):
        if type(children[name]) is not nn.Linear or children[name].out_features != channels:
            return None
    parameters = _modules.forward_parameters(module)
    if parameters is None:
        return None
    names = [p.name for p in parameters]
    if names not in (_WAN_SELF_ATTENTION_ARGS, _WAN_CROSS_ATTENTION_ARGS):
        return None
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in parameters):
        return None
    cross = names == _WAN_CROSS_ATTENTION_ARGS
    defaults = [None if p.default is p.empty else p.default for p in parameters]
    required = sum(p.default is p.empty for p in parameters)
    module_ref = weakref.ref(module)
    verdict: dict = {}

    def bind(args, kwargs):
        if len(args) > len(names) or not set(kwargs) <= set(names[len(args):]):
            return None
        values = list(args) + [kwargs.get(n, d) for n, d in zip(names[len(args):], defaults[len(args):])]
        if len(args) + sum(n in kwargs for n in names[len(args):]) < required:
            return None
        return values

    def wan_attention(mod, args, kwargs):
        values = bind(args, kwargs) if module_ref() is mod else None
        if values is None:
            return NotImplemented
        x = values[0]
        with DisableTorchFunctionSubclass():  # shape reads on duals without a dispatch each
            if not (isinstance(x, torch.Tensor) and x.dim() == 3):
                return NotImplemented
        if not _verified_once(verdict, mod, "Wan attention", lambda: _wan_attention_window(values, cross),
                              lambda m, a: _wan_attention_forward(m, a, cross)):
            return NotImplemented
        return _wan_attention_forward(mod, values, cross)

    return wan_attention


def _wan_attention_window(values: list, cross: bool):
    """The first sample and (self-attention) a window of the first tokens of Wan attention arguments, tables and
    key lengths cut to match; None when they do not have that form."""
    x = values[0]
    batch, tokens = x.shape[0], x.shape[1]
    if cross:
        context, context_lens = values[1], values[2]
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != batch:
            return None
        if context_lens is not None and (not isinstance(context_lens, torch.Tensor) or context_lens.dim() != 1):
            return None
        return (_first_sample(x, batch), _first_sample(context, batch),
                None if context_lens is None else context_lens[:1])
    seq_lens, rope_cos, rope_sin = values[1], values[2], values[3]
    window = min(tokens, _WAN_CHECK_TOKENS)
    for table in (rope_cos, rope_sin):
        if table is not None and (not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != tokens):
            return None
    if seq_lens is not None and (not isinstance(seq_lens, torch.Tensor) or seq_lens.shape != (batch,)):
        return None
    primal, tangent = split_dual(x)
    primal = primal.detach()[:1, :window]
    x_w = make_dual(primal, None if tangent is None else tangent[:1, :window]) if tangent is not None else primal
    return (x_w, None if seq_lens is None else seq_lens[:1].clamp(max=window),
            None if rope_cos is None else split_dual(rope_cos)[0][:window],
            None if rope_sin is None else split_dual(rope_sin)[0][:window])


def _wan_attention_forward(module: nn.Module, values, cross: bool):
    heads, head_dim = module.num_heads, module.head_dim

    def split_heads(t):
        return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    x = split_dual(values[0])
    source = split_dual(values[1]) if cross else x
    q = _pair_map(_module_pair(module.norm_q, _module_pair(module.q, x)), split_heads)
    k = _pair_map(_module_pair(module.norm_k, _module_pair(module.k, source)), split_heads)
    v = _pair_map(_module_pair(module.v, source), split_heads)
    if cross:
        key_lengths = values[2]
    else:
        key_lengths, rope_cos, rope_sin = values[1], values[2], values[3]
        if rope_cos is not None:
            q = _module_pair(module.rope, q, rope_cos, rope_sin)
            k = _module_pair(module.rope, k, rope_cos, rope_sin)
    out = split_dual(module.attention(_value_of(q), _value_of(k), _value_of(v), key_lengths))
    return _value_of(_module_pair(module.o, _pair_map(out, lambda t: t.transpose(1, 2).flatten(2))))
