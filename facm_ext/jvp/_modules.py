"""Module-level interception: user rules, recognized module patterns (MLPs, RMSNorm-like classes) and the
module-call handlers the chain runtime registers.

While a transform is active in a thread, ``torch.nn.Module.__call__`` is patched (installed on the first active
transform, restored when the last one exits, even on exceptions; other threads see the original behaviour). A
module call then goes, in order, to:

1. the first registered module-call handler whose predicate accepts the module:
   ``handler(module, args, kwargs, run_module)``, with ``run_module(module, args, kwargs)`` running the module
   under the transform without its hooks (its rule or verified pattern if any, else its forward) -- the chain
   runtime's FSDP2 handler;
2. when an argument carries a tangent: a rule registered for the module's type (or a base class) with
   :func:`register_jvp_rule`, ``rule(module, args, kwargs) -> output`` (args may be duals);
3. when an argument carries a tangent and neither the module nor its children have hooks: a built-in pattern:
   - Linear -> GELU(tanh) -> Linear and Linear -> chunk -> silu(a) * b -> Linear MLPs -> ``mlp_jvp``
     (``nn.Sequential`` of exactly those layers, or a module whose only children are two ``nn.Linear`` (plus
     Identity/Dropout(p=0)/activation modules), verified once per instance by comparing its forward with the
     pattern's formula on a fixed probe input);
   - RMSNorm-like modules (one 1-D ``weight`` parameter, an ``eps`` attribute, no children or buffers), verified
     the same way, including the dtype its output takes -> ``rms_norm_jvp``;
   - RoPE-like modules (no parameters; ``forward(x)`` with two [L, D] table buffers, or ``forward(x, cos, sin)``),
     verified on probes for both pair conventions -> ``rope_jvp``;
   - adaLN-Zero blocks and Wan 2.2 blocks (facm_ext/jvp/_blocks.py), verified on their first call ->
     ``adaln_jvp`` and ``gated_residual_jvp`` around the block's own attention and MLP;
   - DiT/LightningDiT (timm-style) and Wan attention modules (facm_ext/jvp/_blocks.py), verified on their first
     call -> their projections, norms, RoPE and attention through the fused ops on primal/tangent pairs;
   patterns are looked up once per module instance and skipped for instances whose ``forward`` was replaced;
4. otherwise the module's normal ``__call__`` (hooks included); its functions are still intercepted.
nn.Linear, nn.LayerNorm and nn.RMSNorm need no module rule: their F.linear / F.layer_norm / F.rms_norm calls are
fused at function level, so their hooks keep working.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from torch.nn.modules import module as _module_globals

from ._dual import STATE, DualTensor, record_fallback, record_fused, split_dual, wrap_op_result
from ._rules import autocast_lower_precision, call_op, sdpa_pairs

# ------------------------------------------------------------------------------------------------- registries
_USER_RULES: dict[type, Callable] = {}
_RULE_BY_TYPE: dict[type, Optional[Callable]] = {}  # cache: exact type -> user rule found along the MRO
_HANDLERS: list[tuple[Callable, Callable]] = []
_registry_lock = threading.Lock()


def register_jvp_rule(module_type: type, rule: Callable) -> None:
    """Use ``rule(module, args, kwargs) -> output`` for every call of a module of ``module_type`` (or a subclass)
    whose arguments carry a tangent while a transform is active.

    The rule receives dual arguments (see make_dual / split_dual) and must return the module's output with duals
    where the output has a tangent, e.g. ``make_dual(*facm_ext.ops.rms_norm_jvp(x, tx, module.weight))``.
    Registering None removes the rule.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise ValueError(f"module_type: expected a subclass of torch.nn.Module, got {module_type!r}")
    if rule is not None and not callable(rule):
        raise ValueError(f"rule: expected a callable rule(module, args, kwargs) or None, got {type(rule).__name__}")
    with _registry_lock:
        if rule is None:
            _USER_RULES.pop(module_type, None)
        else:
            _USER_RULES[module_type] = rule
        _RULE_BY_TYPE.clear()


def register_module_call_handler(predicate: Callable[[nn.Module], bool], handler: Callable) -> Callable[[], None]:
    """While a transform is active, send calls of modules with ``predicate(module) == True`` to
    ``handler(module, args, kwargs, run_module)``; ``run_module(module, args, kwargs)`` runs the module's own
    forward under the transform without its hooks. Handlers are tried in registration order, before rules.
    Returns a function that unregisters the handler.
    """
    if not callable(predicate):
        raise ValueError(f"predicate: expected a callable, got {type(predicate).__name__}")
    if not callable(handler):
        raise ValueError(f"handler: expected a callable, got {type(handler).__name__}")
    entry = (predicate, handler)
    with _registry_lock:
        _HANDLERS.append(entry)

    def unregister() -> None:
        with _registry_lock:
            if entry in _HANDLERS:
                _HANDLERS.remove(entry)

    return unregister


def run_module(module: nn.Module, args: tuple, kwargs: dict):
    """The module's own forward under the active transform, without its forward hooks or pre-hooks: a rule
    registered for its type or a recognized pattern when an argument carries a tangent, else ``forward``."""
    kwargs = kwargs or {}
    if STATE.depth > 0 and _any_tangent(args, kwargs):
        rule = _user_rule(type(module))
        if rule is not None:
            record_fused(f"{type(module).__name__} -> registered rule")
            return rule(module, args, kwargs)
        pattern = _pattern_for(module)
        if pattern is not None:
            out = pattern(module, args, kwargs)
            if out is not NotImplemented:
                return out
    return module.forward(*args, **kwargs)


def _user_rule(module_type: type) -> Optional[Callable]:
    try:
        return _RULE_BY_TYPE[module_type]
    except KeyError:
        pass
    rule = None
    if _USER_RULES:
        for base in module_type.__mro__:
            if base in _USER_RULES:
                rule = _USER_RULES[base]
                break
    _RULE_BY_TYPE[module_type] = rule
    return rule


# --------------------------------------------------------------------------------------------- patched __call__
_install_lock = threading.Lock()
_install_count = 0
_saved_call: Optional[Callable] = None


def _patched_call(self, *args, **kwargs):
    if STATE.depth == 0:
        return _saved_call(self, *args, **kwargs)
    return intercept_module_call(self, args, kwargs)


def install() -> None:
    """Patch nn.Module.__call__ (reference counted; see uninstall)."""
    global _install_count, _saved_call
    with _install_lock:
        if _install_count == 0:
            _saved_call = nn.Module.__call__
            nn.Module.__call__ = _patched_call
        _install_count += 1


def uninstall() -> None:
    global _install_count
    with _install_lock:
        _install_count -= 1
        if _install_count == 0:
            if nn.Module.__dict__.get("__call__") is _patched_call:
                nn.Module.__call__ = _saved_call


def _carries_tangent(value) -> bool:
    return type(value) is DualTensor and value._facm_tangent is not None


def _any_tangent(args: tuple, kwargs: dict) -> bool:
    for value in (*args, *kwargs.values()):
        if _carries_tangent(value):
            return True
        if isinstance(value, (tuple, list)) and any(_carries_tangent(v) for v in value):
            return True
    return False


def intercept_module_call(module: nn.Module, args: tuple, kwargs: dict):
    for predicate, handler in _HANDLERS:
        if predicate(module):
            return handler(module, args, kwargs, run_module)
    if not _any_tangent(args, kwargs):
        return _saved_call(module, *args, **kwargs)
    rule = _user_rule(type(module))
    if rule is not None:
        record_fused(f"{type(module).__name__} -> registered rule")
        return rule(module, args, kwargs)
    pattern = _pattern_for(module)
    if pattern is not None and not _has_hooks(module):
        out = pattern(module, args, kwargs)
        if out is not NotImplemented:
            return out
    return _eager_call(module, args, kwargs)


def _eager_call(module: nn.Module, args: tuple, kwargs: dict):
    """The module's normal call (hooks included), but never through torch.compile: dynamo cannot trace dual
    values, so a compiled module (``torch.compile(module)`` or ``module.compile()``) runs its original module
    eagerly under the transform, its submodules and functions intercepted as usual."""
    # The type name first: getattr of a missing attribute goes through nn.Module.__getattr__, which raises.
    original = getattr(module, "_orig_mod", None) if type(module).__name__ == "OptimizedModule" else None
    if original is not None:
        record_fallback(f"{type(original).__name__} (torch.compile'd module)", "run eagerly under the transform")
        return original(*args, **kwargs)
    if getattr(module, "_compiled_call_impl", None) is not None:
        record_fallback(f"{type(module).__name__} (module.compile())", "run eagerly under the transform")
        return module._call_impl(*args, **kwargs)
    return _saved_call(module, *args, **kwargs)


def _has_hooks(module: nn.Module) -> bool:
    if (_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
            or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks):
        return True
    return _tree_has_hooks(module)


def _tree_has_hooks(module: nn.Module) -> bool:
    """Hooks on the module or any submodule. The hooks are read on every call; the submodules are found once per
    facm_ext.jvp call (STATE.subtrees): this runs on every call of a pattern module (five times per block of a
    DiT), and the walk took longer than reading the hooks (4.2 us against 1.7 us for a LightningDiT block on the
    CPU). A submodule added to the tree in the middle of a call is not seen before the next call."""
    subtrees = STATE.subtrees
    if subtrees is None:
        members = _subtree(module)
    else:
        entry = subtrees.get(id(module))
        if entry is None or entry[0] is not module:
            entry = subtrees[id(module)] = (module, _subtree(module))
        members = entry[1]
    for m in members:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    return False


def _subtree(module: nn.Module) -> tuple:
    """The module and its submodules, each once: the walk of module.modules() without building their names."""
    queue, seen = [module], {id(module)}
    for m in queue:  # grows while it is walked
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                queue.append(child)
    return tuple(queue)


# -------------------------------------------------------------------------------------------------- patterns
_PATTERN_CACHE: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
_NOT_A_PATTERN = object()


def _pattern_for(module: nn.Module) -> Optional[Callable]:
    if "forward" in module.__dict__:
        return None  # forward replaced on the instance: the verified behaviour may no longer hold
    try:
        cached = _PATTERN_CACHE[module]
    except KeyError:
        cached = _recognize(module)
        _PATTERN_CACHE[module] = cached
    return None if cached is _NOT_A_PATTERN else cached


def _is_noop(m: nn.Module) -> bool:
    return type(m) is nn.Identity or (isinstance(m, nn.Dropout) and m.p == 0.0)


def _plain_params(module: nn.Module) -> bool:
    """True when every parameter is an ordinary tensor (not a sharded DTensor or a meta tensor)."""
    return all(type(p) in (nn.Parameter, torch.Tensor) and not p.is_meta for p in module.parameters())


def _probe_input(rows: int, features: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fixed, RNG-free probe input [rows, features] with nonzero mean (tells RMSNorm from LayerNorm)."""
    idx = torch.arange(rows * features, dtype=torch.float32, device=like.device)
    x = torch.sin(idx * 0.7311 + 0.3) * 1.7 + 0.4 * torch.cos(idx * 0.177)
    return x.reshape(rows, features).to(dtype or like.dtype)


def _close(out, ref: torch.Tensor) -> bool:
    if not isinstance(out, torch.Tensor) or type(out) is DualTensor or out.shape != ref.shape:
        return False
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2
    diff = (out.double() - ref.double()).norm().item()
    return diff <= tol * max(ref.double().norm().item(), 1e-12)


def forward_parameters(module: nn.Module) -> Optional[list]:
    """The parameters of ``module.forward``'s signature, or None where Python cannot tell them (builtins, C)."""
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def _run_plain(module: nn.Module, *inputs: torch.Tensor):
    """The module's forward on plain probe inputs, with the transform inactive, no grad and no autocast; None when
    the forward rejects them (then the module is not the pattern being probed)."""
    depth, STATE.depth = STATE.depth, 0
    try:
        with torch.no_grad(), torch.autocast(inputs[0].device.type, enabled=False):
            return module.forward(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    finally:
        STATE.depth = depth


def _mlp_reference(x, w1, b1, w2, b2, activation: str) -> torch.Tensor:
    h = nn.functional.linear(x, w1, b1)
    if activation == "gelu_tanh":
        h = nn.functional.gelu(h, approximate="tanh")
    else:
        a, b = h.chunk(2, dim=-1)
        h = nn.functional.silu(a) * b
    return nn.functional.linear(h, w2, b2)


def _mlp_layers(module: nn.Module):
    """(first Linear, second Linear, activation, needs_probe) when the module is structurally an MLP candidate."""
    if isinstance(module, nn.Sequential):
        layers = [m for m in module if not _is_noop(m)]
        if (len(layers) == 3 and type(layers[0]) is nn.Linear and type(layers[2]) is nn.Linear
                and type(layers[1]) is nn.GELU and layers[1].approximate == "tanh"
                and layers[0].out_features == layers[2].in_features):
            return layers[0], layers[2], "gelu_tanh", False
        return None
    if module._parameters or module._buffers:
        return None
    linears, others = [], []
    for child in module.children():
        (linears if type(child) is nn.Linear else others).append(child)
    if len(linears) != 2:
        return None
    for other in others:
        if not (_is_noop(other) or type(other) in (nn.GELU, nn.SiLU)):
            return None
    gelus = [o for o in others if type(o) is nn.GELU]
    for first, second in ((linears[0], linears[1]), (linears[1], linears[0])):
        if first.in_features != second.out_features:
            continue
        if first.out_features == second.in_features and len(gelus) == 1 and gelus[0].approximate == "tanh":
            return first, second, "gelu_tanh", True
        if first.out_features == 2 * second.in_features and not gelus:
            return first, second, "swiglu", True
    return None


def _recognize(module: nn.Module):
    if not _plain_params(module):
        return _NOT_A_PATTERN
    layers = _mlp_layers(module)
    if layers is not None:
        first, second, activation, needs_probe = layers
        if needs_probe:
            x = _probe_input(3, first.in_features, first.weight)
            ref = _mlp_reference(x, first.weight, first.bias, second.weight, second.bias, activation)
            if not _close(_run_plain(module, x), ref):
                return _NOT_A_PATTERN
        return _make_mlp_rule(first, second, activation)
    rms = _rms_norm_like(module)
    if rms is not None:
        return rms
    rope = _rope_like(module)
    if rope is not None:
        return rope
    key_length_attention = _key_length_attention_like(module)
    if key_length_attention is not None:
        return key_length_attention
    from ._blocks import adaln_block_rule, attention_module_rule, wan_attention_rule, wan_block_rule

    block = (adaln_block_rule(module) or wan_block_rule(module) or attention_module_rule(module)
             or wan_attention_rule(module))
    if block is not None:
        return block
    return _NOT_A_PATTERN


def _make_mlp_rule(first: nn.Linear, second: nn.Linear, activation: str):
    first_ref, second_ref = weakref.ref(first), weakref.ref(second)

    def mlp_rule(module, args, kwargs):
        if kwargs or len(args) != 1:
            return NotImplemented
        fc1, fc2 = first_ref(), second_ref()
        x_p, x_t = split_dual(args[0])
        if x_t is None or fc1 is None or fc2 is None:
            return NotImplemented
        w1, b1, w2, b2 = fc1.weight, fc1.bias, fc2.weight, fc2.bias
        if torch.is_autocast_enabled(x_p.device.type):
            x_p, x_t, w1, b1, w2, b2 = autocast_lower_precision(x_p.device.type, x_p, x_t, w1, b1, w2, b2)
        elif x_p.dtype != w1.dtype:
            return NotImplemented  # the plain module raises its own dtype error
        what = f"{type(module).__name__} (MLP {activation})"
        result, why = call_op("mlp_jvp", what, x_p, x_t, w1, b1, w2, b2, activation=activation)
        if result is None:
            record_fallback(what, why)
            return NotImplemented
        return wrap_op_result(*result)

    # Its input only feeds the first Linear (the structure was recognized or probed), whose autocast cast makes a
    # 16-bit input of the same values equivalent: see facm_ext.jvp._blocks._autocast_input_dtype.
    mlp_rule.input_only_to_a_linear = lambda mod: True
    # (first Linear or None once freed, second Linear, activation): what the native block op runs for this MLP.
    mlp_rule.layers = lambda: (first_ref(), second_ref(), activation)
    return mlp_rule


def _rms_norm_like(module: nn.Module):
    """An rms_norm_jvp rule for a verified RMSNorm-like module, or None."""
    if any(True for _ in module.children()) or module._buffers:
        return None
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if len(params) != 1 or weight is None or weight.dim() != 1:
        return None
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(eps, float):
        return None
    features = weight.shape[0]
    x = _probe_input(4, features, weight)
    wide = x.double()
    ref = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(weight.dtype)
    if not _close(_run_plain(module, x), ref):
        return None
    # The output dtype rule: probe with an input of another dtype.
    other = torch.bfloat16 if weight.dtype != torch.bfloat16 else torch.float32
    out_other = _run_plain(module, _probe_input(4, features, weight, dtype=other))
    if not isinstance(out_other, torch.Tensor):
        return None
    if out_other.dtype == other:
        policy = "input"
    elif out_other.dtype == torch.promote_types(other, weight.dtype):
        policy = "promote"
    elif out_other.dtype == weight.dtype:
        policy = "weight"
    else:
        return None
    weight_ref = weakref.ref(module)

    def rms_norm_rule(mod, args, kwargs):
        if kwargs or len(args) != 1 or weight_ref() is not mod:
            return NotImplemented
        result = rms_norm_pair(mod, *split_dual(args[0]))
        return NotImplemented if result is None else wrap_op_result(*result)

    def rms_norm_pair(mod, x_p, x_t):
        """The fused op's (primal, tangent) for the input pair (x_p, x_t), or None where the module's own forward
        must run (no tangent, another width, the op declined)."""
        if x_t is None or x_p.shape[-1] != features:
            return None
        w = mod.weight
        if policy == "input":
            out_dtype = x_p.dtype
        elif policy == "promote":
            out_dtype = torch.promote_types(x_p.dtype, w.dtype)
        else:
            out_dtype = w.dtype
        x_c = x_p if x_p.dtype == out_dtype else x_p.to(out_dtype)
        t_c = x_t if x_t.dtype == out_dtype else x_t.to(out_dtype)
        w_c = w if w.dtype == out_dtype else w.to(out_dtype)
        what = f"{type(mod).__name__} (RMSNorm-like)"
        result, why = call_op("rms_norm_jvp", what, x_c, t_c, w_c, eps=mod.eps if hasattr(mod, "eps") else eps)
        if result is None:
            record_fallback(what, why)
        return result

    rms_norm_rule.norm_spec = ("rms", policy)
    rms_norm_rule.pair_rule = rms_norm_pair
    return rms_norm_rule


_KEY_LENGTH_ATTENTION_ARGS = ["q", "k", "v", "key_lengths"]


def _key_length_attention_like(module: nn.Module):
    """An attention_jvp rule for a verified key-length attention module, or None: no parameters, buffers or
    children; ``forward(q, k, v, key_lengths=None)`` on [B, H, L, D] tensors, keys at index >= key_lengths[b]
    ignored (Wan's variable-length attention, e.g. facm_ext.models.wan.KeyLengthAttention). The per-op path would
    see the boolean mask such a module builds and recover the lengths from it with a device synchronization
    (which a CUDA graph cannot capture); the rule hands the lengths to the fused op directly. Verified on probes
    with and without lengths."""
    if module._parameters or module._buffers or any(True for _ in module.children()):
        return None
    parameters = forward_parameters(module)
    if parameters is None or [p.name for p in parameters] != _KEY_LENGTH_ATTENTION_ARGS \
            or parameters[3].default is not None:
        return None
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in parameters):
        return None
    like = torch.empty(0)
    q, k, v = (_probe_input(2 * 2 * rows, 8, like).reshape(2, 2, rows, 8) * scale
               for rows, scale in ((3, 0.5), (4, 0.7), (4, 1.1)))
    k = k.flip(2)
    lengths = torch.tensor([4, 2])
    mask = (torch.arange(4)[None, :] < lengths[:, None])[:, None, None, :]
    reference = torch.nn.functional.scaled_dot_product_attention
    if not (_close(_run_plain(module, q, k, v, lengths), reference(q, k, v, attn_mask=mask))
            and _close(_run_plain(module, q, k, v), reference(q, k, v))):
        return None
    module_ref = weakref.ref(module)

    def key_length_attention_rule(mod, args, kwargs):
        if module_ref() is not mod or len(args) + len(kwargs) > 4:
            return NotImplemented
        if set(kwargs) - set(_KEY_LENGTH_ATTENTION_ARGS[len(args):]):
            return NotImplemented
        values = list(args) + [kwargs.get(name) for name in _KEY_LENGTH_ATTENTION_ARGS[len(args):]]
        q, k, v, key_lengths = values
        if key_lengths is None or type(key_lengths) is DualTensor:
            return NotImplemented  # without lengths the per-op path fuses the plain SDPA call
        (qp, tq), (kp, tk), (vp, tv) = split_dual(q), split_dual(k), split_dual(v)
        if tq is None and tk is None and tv is None:
            return NotImplemented
        result, why = sdpa_pairs(qp, kp, vp, tq, tk, tv, key_lengths=key_lengths)
        if result is None:
            record_fallback(f"{type(mod).__name__} (key-length attention)", why)
            return NotImplemented
        return wrap_op_result(*result)

    return key_length_attention_rule


def _rope_reference(x, cos, sin, interleaved: bool):
    from facm_ext.reference.rope import rope

    return rope(x, cos, sin, interleaved=interleaved)


def _rope_like(module: nn.Module):
    """A rope_jvp rule for a verified rotary-embedding module, or None. Two forms, both without parameters:
    ``forward(x)`` with two [L, D] or [L, D/2] float buffers as the cos/sin tables (LightningDiT's
    VisionRotaryEmbedding2D), or ``forward(x, cos, sin)`` with the tables as arguments (Wan's InterleavedRoPE).
    Verified on a probe for each table assignment and pair convention; the output-dtype rule is probed too."""
    if module._parameters or any(True for _ in module.children()):
        return None
    buffers = [(name, b) for name, b in module.named_buffers(recurse=False) if b is not None]
    if len(buffers) == 2:
        (_, first), (_, second) = buffers
        if first.shape != second.shape or first.dim() != 2 or not first.is_floating_point():
            return None
        tokens, width = first.shape
        table_dtype = first.dtype
        device = first.device
        candidates = [(order, interleaved) for order in ((0, 1), (1, 0)) for interleaved in (True, False)]
        for head_dim in ({width, 2 * width}):
            x = _probe_input(2 * tokens, head_dim, first).reshape(1, 2, tokens, head_dim)
            out = _run_plain(module, x)
            for order, interleaved in candidates:
                cos, sin = (first, second) if order == (0, 1) else (second, first)
                if _close(out, _rope_reference(x, cos, sin, interleaved)):
                    return _make_rope_rule(module, "buffers", order, interleaved, table_dtype, device)
        return None
    if buffers:
        return None
    # forward(x, cos, sin): probe with small random-looking tables.
    parameters = forward_parameters(module)
    if parameters is None or len(parameters) != 3:
        return None
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters):
        return None
    like = torch.empty(0)
    tokens, head_dim = 3, 8
    x = _probe_input(2 * tokens, head_dim, like).reshape(1, 2, tokens, head_dim)
    cos = _probe_input(tokens, head_dim, like) * 0.5
    sin = _probe_input(tokens, head_dim, like).flip(0) * 0.7
    out = _run_plain(module, x, cos, sin)
    for interleaved in (True, False):
        if _close(out, _rope_reference(x, cos, sin, interleaved)):
            return _make_rope_rule(module, "arguments", (0, 1), interleaved, None, None)
    return None


def _make_rope_rule(module: nn.Module, source: str, order, interleaved: bool, table_dtype, device):
    """The rope_jvp rule; its output dtype follows the module's own rule, probed here (x's dtype, or x promoted
    with the tables')."""
    if source == "buffers":
        first = dict(module.named_buffers(recurse=False))
        names = list(first)
        tokens, width = first[names[0]].shape
        head_dim = width
        other = torch.bfloat16 if table_dtype != torch.bfloat16 else torch.float32
        out = _run_plain(module, _probe_input(2 * tokens, head_dim, first[names[0]], dtype=other)
                         .reshape(1, 2, tokens, head_dim))
        promote = isinstance(out, torch.Tensor) and out.dtype == torch.promote_types(other, table_dtype)
        cos_name, sin_name = (names[0], names[1]) if order == (0, 1) else (names[1], names[0])
    else:
        like = torch.empty(0)
        x = _probe_input(6, 8, like, dtype=torch.bfloat16).reshape(1, 2, 3, 8)
        tables = _probe_input(3, 8, like)
        out = _run_plain(module, x, tables, tables)
        promote = isinstance(out, torch.Tensor) and out.dtype == torch.float32
        cos_name = sin_name = None
    module_ref = weakref.ref(module)

    def rope_rule(mod, args, kwargs):
        if kwargs or module_ref() is not mod:
            return NotImplemented
        if source == "buffers":
            if len(args) != 1:
                return NotImplemented
            cos, sin = getattr(mod, cos_name), getattr(mod, sin_name)
        else:
            if len(args) != 3 or _carries_tangent(args[1]) or _carries_tangent(args[2]):
                return NotImplemented
            cos, sin = split_dual(args[1])[0], split_dual(args[2])[0]
        x_p, x_t = split_dual(args[0])
        result = rope_on_tables(mod, x_p, x_t, cos, sin)
        return NotImplemented if result is None else wrap_op_result(*result)

    def rope_pair(mod, x_p, x_t, *tables):
        """The fused op's (primal, tangent) for the input pair of ``mod(x)`` (tables from the module's buffers) or
        ``mod(x, cos, sin)`` (``tables``: plain cos and sin), or None where the module's own forward must run."""
        if module_ref() is not mod:
            return None
        if source == "buffers":
            if tables:
                return None
            return rope_on_tables(mod, x_p, x_t, getattr(mod, cos_name), getattr(mod, sin_name))
        if len(tables) != 2 or any(type(t) is DualTensor for t in tables):
            return None
        return rope_on_tables(mod, x_p, x_t, *tables)

    def rope_on_tables(mod, x_p, x_t, cos, sin):
        if x_t is None or x_p.dim() != 4 or cos.dim() != 2 or cos.shape[0] != x_p.shape[2]:
            return None
        out_dtype = torch.promote_types(x_p.dtype, cos.dtype) if promote else x_p.dtype
        if x_p.dtype != out_dtype:
            x_p, x_t = x_p.to(out_dtype), x_t.to(out_dtype)
        what = f"{type(mod).__name__} (RoPE-like)"
        result, why = call_op("rope_jvp", what, x_p, x_t, cos, sin, interleaved=interleaved, layout="BHLD")
        if result is None:
            record_fallback(what, why)
        return result

    def rope_tables(mod):
        """(cos, sin) of ``mod(x)`` for a module whose tables are its buffers, else None."""
        if source != "buffers" or module_ref() is not mod:
            return None
        return getattr(mod, cos_name), getattr(mod, sin_name)

    rope_rule.pair_rule = rope_pair
    rope_rule.rope_tables = rope_tables
    rope_rule.interleaved = interleaved
    rope_rule.promotes = promote
    return rope_rule


__all__ = ["install", "intercept_module_call", "register_jvp_rule", "register_module_call_handler",
           "run_module", "uninstall"]
