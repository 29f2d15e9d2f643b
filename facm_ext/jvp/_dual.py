"""Dual values for the forward-mode transform: a tensor subclass that IS the primal and carries its tangent.

``make_dual(primal, tangent)`` returns ``primal.as_subclass(DualTensor)``: an alias of the primal that keeps its
autograd identity (gradients through it reach the primal's graph), with the tangent attached as ``_facm_tangent``
(None means zero). ``DualTensor.__torch_function__`` sends every torch function called on a dual to
:func:`dispatch`, which either runs a fused rule (facm_ext.jvp._rules) or PyTorch's own forward-mode rule for that
single op. In both cases:

- the primal output is computed with autograd exactly as the plain function would (same saved tensors), so a
  backward through the transform's primal output gives the plain forward's gradients;
- the tangent output is computed under ``torch.no_grad`` and never carries a graph;
- tangents follow their primal's dtype (under autocast a bf16 primal gets a bf16 tangent).

Tangents of ops that are linear in their tensor inputs (views, reshapes, casts, sums, concatenations, ...) are
the same op applied to the tangents; a few common nonlinear elementwise ops have closed-form rules here; anything
else goes through ``torch.func.jvp`` of that one op on plain tensors.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass


class _no_grad:
    """``torch.no_grad()`` for the per-op paths: the same grad-mode switch without the decorator machinery of
    torch.no_grad (which builds a torch.set_grad_enabled object on entry); a third of its cost, and the transform
    enters it once per op."""

    __slots__ = ("prev",)

    def __enter__(self):
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc_info):
        torch._C._set_grad_enabled(self.prev)


class JVPTransformError(RuntimeError):
    """A construct inside the transformed function that facm_ext.jvp cannot differentiate correctly."""


def _is_differentiable_dtype(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class DualTensor(torch.Tensor):
    """A primal tensor (an alias of it, same autograd graph) carrying its tangent in ``_facm_tangent``.

    Made only by :func:`make_dual`; reading the pair back is :func:`split_dual`. Attributes (plain Python, not
    torch functions): ``_facm_tangent`` (Tensor of the primal's shape or None for zero) and ``_facm_shares_memory``
    (True once a view of it was taken or it is a view of another dual: in-place updates are then refused, because
    the tangents of the other aliases could not be kept in step).
    """

    _facm_tangent: Optional[torch.Tensor]
    _facm_shares_memory: bool

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents=None):
        with DisableTorchFunctionSubclass():
            primal = repr(self.as_subclass(torch.Tensor))
        return f"DualTensor(primal={primal}, tangent={'zero' if self._facm_tangent is None else 'set'})"


def make_dual(primal: torch.Tensor, tangent: Optional[torch.Tensor]) -> torch.Tensor:
    """A dual value: ``primal`` (keeping its autograd graph) carrying ``tangent`` (None = zero).

    primal: any tensor. Non-floating tensors (integer, bool) cannot carry a tangent: they are returned unchanged
    when ``tangent`` is None, and a non-None tangent raises ValueError. tangent: same shape as primal; it is
    detached and cast to the primal's dtype (a broadcastable smaller tangent is expanded).
    """
    if not isinstance(primal, torch.Tensor):
        raise ValueError(f"primal: expected a torch.Tensor, got {type(primal).__name__}")
    with DisableTorchFunctionSubclass():
        if type(primal) is DualTensor:
            primal = primal.as_subclass(torch.Tensor)
        if not _is_differentiable_dtype(primal):
            if tangent is not None:
                raise ValueError(f"tangent: a {primal.dtype} primal cannot carry a tangent; pass None")
            return primal
        if tangent is not None:
            if not isinstance(tangent, torch.Tensor):
                raise ValueError(f"tangent: expected a torch.Tensor or None, got {type(tangent).__name__}")
            if type(tangent) is DualTensor:
                tangent = tangent.as_subclass(torch.Tensor)
            tangent = tangent.detach()
            if tangent.dtype != primal.dtype:
                tangent = tangent.to(primal.dtype)
            if tangent.shape != primal.shape:
                try:
                    tangent = tangent.expand(primal.shape)
                except RuntimeError as exc:
                    raise ValueError(f"tangent: shape {tuple(tangent.shape)} does not match the primal's shape "
                                     f"{tuple(primal.shape)}") from exc
        dual = primal.as_subclass(DualTensor)
    dual._facm_tangent = tangent
    dual._facm_shares_memory = False
    return dual


def split_dual(x: Any) -> tuple[Any, Optional[torch.Tensor]]:
    """``(primal, tangent)`` of a dual value; ``(x, None)`` for anything else (plain tensors, numbers, None).

    The primal is a plain ``torch.Tensor`` with the dual's autograd graph; the tangent is None (zero) or a tensor
    of the primal's shape without graph.
    """
    if type(x) is DualTensor:
        with DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor), x._facm_tangent
    return x, None


def tangent_of(x: Any) -> Optional[torch.Tensor]:
    """The tangent carried by ``x`` (None for zero or for non-dual values)."""
    return x._facm_tangent if type(x) is DualTensor else None


def plain(x: Any) -> Any:
    """The primal of a dual as a plain tensor (autograd graph kept); anything else unchanged."""
    if type(x) is DualTensor:
        with DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    return x


# ------------------------------------------------------------------------------------------------------ recording
class JVPReport:
    """Which functions and modules ran fused and which fell back to PyTorch's per-op forward-mode rules.

    ``fused``: {"what -> op": count}; ``fallback``: {"what": count}; ``reasons``: {"what": {reason, ...}} for
    fallbacks that a fused rule would have handled (op unavailable, unsupported arguments).
    ``str(report)`` is a readable table.
    """

    def __init__(self):
        self.fused: dict[str, int] = {}
        self.fallback: dict[str, int] = {}
        self.reasons: dict[str, set] = {}

    def add_fused(self, what: str) -> None:
        self.fused[what] = self.fused.get(what, 0) + 1

    def add_fallback(self, what: str, reason: Optional[str] = None) -> None:
        self.fallback[what] = self.fallback.get(what, 0) + 1
        if reason:
            self.reasons.setdefault(what, set()).add(reason)

    def __str__(self) -> str:
        lines = ["facm_ext.jvp report", "fused:"]
        lines += [f"  {count:6d}  {what}" for what, count in sorted(self.fused.items(), key=lambda kv: -kv[1])]
        lines.append("fallback (PyTorch forward-mode rule of the single op):")
        for what, count in sorted(self.fallback.items(), key=lambda kv: -kv[1]):
            why = self.reasons.get(what)
            lines.append(f"  {count:6d}  {what}" + (f"  [{'; '.join(sorted(why))}]" if why else ""))
        return "\n".join(lines)

    __repr__ = __str__


class _State(threading.local):
    def __init__(self):
        self.depth = 0  # nesting of active transforms in this thread
        self.report: Optional[JVPReport] = None
        # id(module) -> (module, the modules of its subtree), kept for one facm_ext.jvp call (see
        # facm_ext.jvp._modules._tree_has_hooks); None outside a call.
        self.subtrees: Optional[dict] = None
        # True while facm_ext.jvp.graph warms up and captures: blocks keep the per-op path there (see
        # facm_ext.jvp._graph._JVPModule.forward).
        self.per_op_blocks = False


STATE = _State()


def is_active() -> bool:
    """True while a facm_ext.jvp transform is running in this thread."""
    return STATE.depth > 0


def record_fused(what: str) -> None:
    if STATE.report is not None:
        STATE.report.add_fused(what)


def record_fallback(what: str, reason: Optional[str] = None) -> None:
    if STATE.report is not None:
        STATE.report.add_fallback(what, reason)


def func_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return f"Tensor.{getattr(owner, '__name__', 'attribute')}"
    module = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", name)
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    if qual.startswith("TensorBase.") or qual.startswith("Tensor."):
        return f"Tensor.{name}"
    return f"torch.{name}" if module.startswith("torch") else qual


# -------------------------------------------------------------------------------------------------- rule tables
# Fused rules (facm_ext.jvp._rules) register here: func -> rule(args, kwargs) returning the output (duals
# included) or NotImplemented to fall back.
FUSED_FUNCTION_RULES: dict[Callable, Callable] = {}

# Functions whose result never carries a tangent (metadata, factories shaped like the input, comparisons, ...).
_NO_TANGENT_NAMES = {
    "size", "dim", "numel", "stride", "storage_offset", "is_contiguous", "data_ptr", "element_size", "nelement",
    "ndimension", "is_floating_point", "is_complex", "get_device", "__len__", "__bool__", "__int__", "__float__",
    "__index__", "item", "tolist", "numpy", "untyped_storage", "is_set_to", "equal", "allclose", "isclose",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "randint_like", "detach", "argmax", "argmin", "argsort", "sign",
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "isnan",
    "isinf", "isfinite", "logical_not", "logical_and", "logical_or", "__format__", "__repr__", "__str__",
    "__hash__", "__reduce_ex__", "__deepcopy__", "requires_grad_", "retain_grad", "register_hook", "record_stream",
    "share_memory_", "is_shared", "is_pinned", "pin_memory", "__dlpack__", "__dlpack_device__",
    "has_names", "is_inference", "nonzero", "floor", "ceil", "round", "trunc", "bucketize", "searchsorted",
}
# View-producing ops linear in the first tensor: the tangent is the same view of the tangent.
_VIEW_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "swapdims", "permute", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "t", "narrow", "select", "chunk", "split",
    "tensor_split", "split_with_sizes", "unbind", "movedim", "moveaxis", "diagonal", "__getitem__", "as_strided",
    "unfold", "view_as_real", "view_as_complex", "real", "imag", "mT", "T", "H", "mH", "hsplit", "vsplit",
    "dsplit", "contiguous",
}
# Other ops linear in the first tensor argument, with every other argument constant (indices, shapes, dtypes).
_LINEAR_FIRST_NAMES = _VIEW_NAMES | {
    "clone", "to", "type", "float", "double", "half", "bfloat16", "type_as", "sum", "mean", "cumsum", "flip", "roll",
    "repeat", "repeat_interleave", "tile", "index_select", "gather", "take_along_dim", "tril", "triu", "neg",
    "negative", "__neg__", "positive", "__pos__", "conj", "resolve_conj", "resolve_neg", "trace", "diag",
    "diag_embed", "nansum", "fliplr", "flipud", "rot90",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "broadcast_to", "ravel", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
}
# Ops of those two kinds whose second argument is read only for its metadata (dtype or shape): its tangent does not
# enter the result's, which is the op applied to the first argument's tangent whatever the second carries.
_METADATA_SECOND_ARG_NAMES = {"type_as", "view_as", "expand_as", "reshape_as"}
# Ops linear in ALL their tensor arguments jointly (sum of the op applied to each tangent with the others zero).
_JOINTLY_LINEAR_NAMES = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
# Ops multilinear in their tensor arguments: tangent = sum over dual args of op(..., tangent_i, ...).
_MULTILINEAR_NAMES = {"mul", "__mul__", "__rmul__", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "einsum",
                      "outer", "dot", "mv", "kron", "multiply", "inner", "tensordot"}
# Elementwise unary ops with a closed-form derivative: name -> derivative(x_plain, out_plain).
_UNARY_DERIVATIVES: dict[str, Callable] = {
    "exp": lambda x, y: y,
    "sin": lambda x, y: torch.cos(x),
    "cos": lambda x, y: -torch.sin(x),
    "tanh": lambda x, y: 1 - y * y,
    "sigmoid": lambda x, y: y * (1 - y),
    "rsqrt": lambda x, y: -0.5 * y * y * y,
    "sqrt": lambda x, y: 0.5 / y,
    "log": lambda x, y: 1 / x,
    "square": lambda x, y: 2 * x,
    "reciprocal": lambda x, y: -y * y,
    "relu": lambda x, y: (x > 0).to(x.dtype),
}


# Ops that draw random numbers: their primal and tangent must see the same draw (see fallback).
_RANDOM_NAMES = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                 "native_dropout", "rrelu", "fused_dropout", "bernoulli", "normal", "multinomial",
                 "gumbel_softmax"}


def _name(func) -> str:
    return getattr(func, "__name__", "")


def _is_inplace(func, kwargs) -> bool:
    name = _name(func)
    if "out" in kwargs and kwargs["out"] is not None:
        return True
    if name in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ipow__", "__setitem__",
                "__imatmul__", "__iand__", "__ior__"):
        return True
    if kwargs.get("inplace") is True:
        return True
    return name.endswith("_") and not name.endswith("__") and name not in _NO_TANGENT_NAMES


# ------------------------------------------------------------------------------------------------------ dispatch
class _FlatSpec:
    """Spec of a call whose positional args are flat (no containers) and whose kwargs hold no tensors: the
    common case, rebuilt without pytree."""

    __slots__ = ("kwargs",)

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs


def _flatten_call(args: tuple, kwargs: dict):
    """(flat values, spec) of a call; pytree only when some argument is a container or a kwarg is a tensor."""
    for a in args:
        if type(a) in (list, tuple, dict):
            return tree_flatten((args, kwargs))
    for v in kwargs.values():
        if isinstance(v, (torch.Tensor, list, tuple, dict)):
            return tree_flatten((args, kwargs))
    return list(args), _FlatSpec(kwargs)


def _rebuild(values: list, spec) -> tuple[tuple, dict]:
    if type(spec) is _FlatSpec:
        return tuple(values), spec.kwargs
    return tree_unflatten(values, spec)


def _flatten_out(out):
    """(leaves, rebuild) of an op's output, fast for a tensor or a flat tuple/list of tensors."""
    if type(out) in (tuple, list) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out), type(out)
    leaves, spec = tree_flatten(out)
    return leaves, spec


def _unflatten_out(leaves: list, how):
    if how is tuple or how is list:
        return how(leaves)
    return tree_unflatten(leaves, how)


_KIND_CACHE: dict = {}


def _classify(func) -> tuple[str, str]:
    """(kind, name) of a torch function, cached: how its tangent is computed."""
    try:
        return _KIND_CACHE[func]
    except (KeyError, TypeError):
        pass
    name = _name(func)
    if name == "__get__":
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        kind = "view" if prop in _VIEW_NAMES else "meta"
        name = prop
    elif name in _NO_TANGENT_NAMES:
        kind = "meta"
    elif _is_inplace(func, {}):
        kind = "inplace"
    elif name in _VIEW_NAMES:
        kind = "view"
    elif name in _LINEAR_FIRST_NAMES:
        kind = "linear_first"
    elif name in _ADD_SUB_NAMES:
        kind = "add_sub"
    elif name in _JOINTLY_LINEAR_NAMES or name == "where":
        kind = "joint"
    elif name in _MULTILINEAR_NAMES:
        kind = "multilinear"
    elif name in ("div", "__truediv__", "true_divide", "divide"):
        kind = "div"
    elif name == "__rtruediv__":
        kind = "rtruediv"
    elif name in ("pow", "__pow__"):
        kind = "pow"
    elif name in _UNARY_DERIVATIVES:
        kind = "unary"
    elif name in ("masked_fill", "pad"):
        kind = name
    elif name in _RANDOM_NAMES:
        kind = "random"
    elif name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        kind = "conv"
    else:
        kind = "generic"
    try:
        _KIND_CACHE[func] = (kind, name)
    except TypeError:
        pass
    return kind, name


def dispatch(func, args: tuple, kwargs: dict):
    """The transform's handler for one torch function called with dual arguments."""
    rule = FUSED_FUNCTION_RULES.get(func)
    if rule is not None:
        out = rule(args, kwargs)
        if out is not NotImplemented:
            return out
        return fallback(func, args, kwargs)
    if _classify(func)[0] == "meta":
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    return fallback(func, args, kwargs)


def fallback(func, args: tuple, kwargs: dict, *, tangent_context: Optional[Callable] = None,
             what: Optional[str] = None, reason: Optional[str] = None):
    """Run ``func`` with PyTorch's own forward-mode rule for it: primal with autograd, tangent without graph.

    tangent_context: a context-manager factory entered around the tangent computation (e.g. the math SDPA
    backend, the only one with a forward-mode rule). what/reason: the report's name for the call and why a fused
    rule did not take it.
    """
    if args and type(args[0]) is DualTensor and args[0]._facm_tangent is not None:
        kind, name = _classify(func)
        if (kind in ("view", "linear_first") and kwargs.get("inplace") is not True and kwargs.get("out") is None
                and (_only_first_is_dual(args, kwargs)
                     or (name in _METADATA_SECOND_ARG_NAMES and len(args) == 2 and not kwargs))):
            return _same_op_on_tangent(func, kind, args, kwargs, what, reason)
    flat, spec = _flatten_call(args, kwargs)
    dual_idx = [i for i, a in enumerate(flat) if type(a) is DualTensor]
    if not any(flat[i]._facm_tangent is not None for i in dual_idx):
        with DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    kind, name = _classify(func)
    if kind == "inplace" or kwargs.get("inplace") is True or kwargs.get("out") is not None:
        return _inplace(func, args, kwargs, flat, spec, dual_idx)
    if STATE.report is not None:
        record_fallback(what or func_name(func), reason)

    if kind == "random":
        # The tangent is computed by replaying the op under torch.func.jvp: run the primal inside fork_rng so the
        # replay starts from the same generator state (same mask), and the state afterwards is the state one
        # plain call leaves.
        cuda_devices = sorted({a.device.index or 0 for a in flat if isinstance(a, torch.Tensor) and a.is_cuda})
        with torch.random.fork_rng(devices=cuda_devices), DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        out_flat, how = _flatten_out(out)
        diff_positions = [i for i, o in enumerate(out_flat)
                          if isinstance(o, torch.Tensor) and _is_differentiable_dtype(o)]
        if not diff_positions:
            return out
        with torch.no_grad(), DisableTorchFunctionSubclass():
            tangents_flat = _functorch_tangent(func, flat, spec, dual_idx, out_flat, diff_positions,
                                               tangent_context)
        result = list(out_flat)
        for i in diff_positions:
            tangent = tangents_flat[i]
            result[i] = _wrap(out_flat[i], tangent if isinstance(tangent, torch.Tensor) else None)
        return _unflatten_out(result, how) if how is not None else result[0]

    with DisableTorchFunctionSubclass():
        out = func(*args, **kwargs)
    outputs = _differentiable_outputs(out)
    if outputs is None:
        return out
    out_flat, how, diff_positions = outputs

    first_dual = bool(args) and type(args[0]) is DualTensor
    tangents_flat: Optional[list] = None
    with _no_grad(), DisableTorchFunctionSubclass():
        if kind in ("view", "linear_first"):
            if first_dual and all(i == 0 or flat[i]._facm_tangent is None for i in dual_idx):
                tangents_flat = _as_list(func(args[0]._facm_tangent, *args[1:], **kwargs))
        elif kind == "add_sub":
            tangents_flat = [_add_sub_tangent(name, args, kwargs)]
        elif kind in ("joint", "multilinear"):
            tangents_flat = _linear_combination_tangent(func, name, flat, spec, dual_idx)
        elif kind == "div":
            if "rounding_mode" not in kwargs and len(args) == 2:
                tangents_flat = [_div_tangent(args, out)]
        elif kind == "rtruediv":
            x = args[0]  # scalar / x: the tangent is -scalar t / x^2 = -out t / x
            tangents_flat = [-(out * x._facm_tangent) / x]
        elif kind == "pow":
            if first_dual and len(args) == 2 and type(args[1]) in (int, float) and not kwargs:
                x, exponent = args
                tangents_flat = [None if exponent == 0 else exponent * x.pow(exponent - 1) * x._facm_tangent]
        elif kind == "unary":
            if first_dual and len(args) == 1 and not kwargs:
                x = args[0]
                tangents_flat = [_UNARY_DERIVATIVES[name](x, out) * x._facm_tangent]
        elif kind == "masked_fill":
            value = args[2] if len(args) > 2 else kwargs.get("value")
            if first_dual and not _carries_tangent(value):
                mask = args[1] if len(args) > 1 else kwargs["mask"]
                tangents_flat = [args[0]._facm_tangent.masked_fill(mask, 0)]
        elif kind == "conv":
            # Linear in the input: the tangent is the same convolution of the input's tangent, without bias.
            if first_dual and len(args) >= 2 and all(i == 0 or flat[i]._facm_tangent is None for i in dual_idx):
                rest = list(args[1:])
                conv_kwargs = dict(kwargs)
                if len(rest) >= 2:
                    rest[1] = None
                else:
                    conv_kwargs["bias"] = None
                tangents_flat = [func(args[0]._facm_tangent, *rest, **conv_kwargs)]
        elif kind == "pad":
            if first_dual:
                _, pad, mode = _pad_arguments(args, kwargs)
                if mode == "constant":
                    tangents_flat = [func(args[0]._facm_tangent, pad, mode="constant", value=0.0)]
                else:
                    tangents_flat = [func(args[0]._facm_tangent, pad, mode=mode)]
    if tangents_flat is None:
        tangents_flat = _functorch_tangent(func, flat, spec, dual_idx, out_flat, diff_positions, tangent_context)

    # reshape/contiguous/flatten/... return a view only sometimes: flag memory sharing only when it happened.
    is_view = kind == "view" and bool(args) and type(args[0]) is DualTensor and _shares_storage(out_flat, args[0])
    if is_view:
        for i in dual_idx:
            flat[i]._facm_shares_memory = True
    return _wrap_outputs(out, out_flat, how, tangents_flat, diff_positions, is_view)


def _shares_storage(outputs: list, source: torch.Tensor) -> bool:
    with DisableTorchFunctionSubclass():
        source_ptr = source.untyped_storage().data_ptr()
        return any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == source_ptr for o in outputs)


def _only_first_is_dual(args: tuple, kwargs: dict) -> bool:
    """True when no argument but ``args[0]`` is a dual, looking one level into lists and tuples; False (so the
    caller takes the general path) as well for dicts and deeper nesting, which are not looked into."""
    for i in range(1, len(args)):
        a = args[i]
        if type(a) is DualTensor or isinstance(a, dict):
            return False
        if isinstance(a, (list, tuple)):
            for v in a:
                if type(v) is DualTensor or isinstance(v, (list, tuple, dict)):
                    return False
    for v in kwargs.values():
        if type(v) is DualTensor or isinstance(v, (list, tuple, dict)):
            return False
    return True


def _same_op_on_tangent(func, kind: str, args: tuple, kwargs: dict, what: Optional[str], reason: Optional[str]):
    """fallback() of a view or an op linear in its first argument, when that argument carries a tangent and is the
    only dual (or the other is the metadata argument of type_as/view_as/...): the tangent is ``func`` applied to
    that tangent with the other arguments unchanged. The same values and memory-sharing flags as fallback()'s
    general path, which flattens the call first (and for a dual metadata argument with a tangent, runs
    torch.func.jvp of the op); this is the transform's most common fallback (reshape, permute, chunk, to, ...)."""
    if STATE.report is not None:
        record_fallback(what or func_name(func), reason)
    source = args[0]
    with DisableTorchFunctionSubclass():
        out = func(*args, **kwargs)
        outputs = _differentiable_outputs(out)
        if outputs is None:
            return out
        out_flat, how, diff_positions = outputs
        with _no_grad():
            tangents_flat = _as_list(func(source._facm_tangent, *args[1:], **kwargs))
        # reshape/contiguous/flatten/... return a view only sometimes: flag memory sharing only when it happened.
        is_view = False
        if kind == "view":
            source_ptr = source.untyped_storage().data_ptr()
            is_view = any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() == source_ptr
                          for o in out_flat)
    if is_view:
        # As the general path: every dual argument is flagged (the metadata one of view_as/expand_as included).
        for a in args:
            if type(a) is DualTensor:
                a._facm_shares_memory = True
    return _wrap_outputs(out, out_flat, how, tangents_flat, diff_positions, is_view)


def _differentiable_outputs(out):
    """(flat outputs, how to rebuild them (None: ``out`` is one tensor), positions of the floating outputs), or None
    when no output can carry a tangent (integer results, shapes, ...)."""
    if isinstance(out, torch.Tensor):
        return ([out], None, [0]) if _is_differentiable_dtype(out) else None
    out_flat, how = _flatten_out(out)
    diff_positions = [i for i, o in enumerate(out_flat) if isinstance(o, torch.Tensor) and _is_differentiable_dtype(o)]
    return (out_flat, how, diff_positions) if diff_positions else None


def _wrap_outputs(out, out_flat: list, how, tangents_flat: list, diff_positions, is_view: bool):
    """The op's outputs as duals carrying their tangents (``how`` None: the single tensor ``out``), each flagged as
    sharing memory when the op returned a view."""
    if how is None:
        tangent = tangents_flat[0]
        result = _wrap(out, tangent if isinstance(tangent, torch.Tensor) else None)
        if is_view:
            result._facm_shares_memory = True
        return result
    result = list(out_flat)
    for i in diff_positions:
        tangent = tangents_flat[i] if i < len(tangents_flat) else None
        result[i] = _wrap(out_flat[i], tangent if isinstance(tangent, torch.Tensor) else None)
        if is_view:
            result[i]._facm_shares_memory = True
    return _unflatten_out(result, how)


def _as_list(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    return _flatten_out(out)[0]


def _wrap(primal: torch.Tensor, tangent: Optional[torch.Tensor]) -> "DualTensor":
    """make_dual without argument checks, for the transform's own outputs (a floating primal, a graph-free
    tangent). The primal may itself be a dual (an op that returned its input): the result is a new alias of it."""
    with DisableTorchFunctionSubclass():
        if tangent is not None:
            if tangent.dtype != primal.dtype:
                tangent = tangent.to(primal.dtype)
            if tangent.shape != primal.shape:
                tangent = tangent.expand(primal.shape)
        dual = primal.as_subclass(DualTensor)
    dual._facm_tangent = tangent
    dual._facm_shares_memory = False
    return dual


def wrap_op_result(primal: torch.Tensor, tangent: Optional[torch.Tensor]) -> "DualTensor":
    """The dual of a fused op's ``(primal, tangent)`` result: make_dual without its argument checks. The ops return
    a plain floating primal and a tangent marked non-differentiable; a tangent that still requires grad (which
    none should) is detached, as make_dual would."""
    if tangent is not None and tangent.requires_grad:
        tangent = tangent.detach()
    return _wrap(primal, tangent)


def _pad_arguments(args: tuple, kwargs: dict) -> tuple:
    """(input, pad, mode) of F.pad(input, pad, mode="constant", value=None)."""
    values = list(args) + [None] * (4 - len(args))
    pad = values[1] if len(args) > 1 else kwargs["pad"]
    mode = values[2] if len(args) > 2 else kwargs.get("mode", "constant")
    return values[0], pad, mode


def _carries_tangent(x) -> bool:
    return type(x) is DualTensor and x._facm_tangent is not None


def _zero_tangent_args(flat: list, keep: int) -> list:
    """flat args with every dual replaced by its primal, except position ``keep`` replaced by its tangent;
    other duals' tangents are dropped (treated as constants)."""
    vals = list(flat)
    for i, a in enumerate(vals):
        if type(a) is DualTensor:
            vals[i] = a._facm_tangent if i == keep else a
    return vals


def _linear_combination_tangent(func, name: str, flat: list, spec, dual_idx: list) -> list:
    """Tangent of an op that is linear (add/sub/cat/where) or multilinear (mul/matmul/einsum) in its tensor args.

    For jointly linear ops, zero tangents are materialized for duals and plain tensors without one; for
    multilinear ops each dual with a tangent contributes op(..., tangent_i, ...) with the others at their primal.
    """
    if name in _JOINTLY_LINEAR_NAMES or name == "where":
        vals = list(flat)
        for i, a in enumerate(vals):
            if isinstance(a, torch.Tensor):
                if name == "where" and i == 0:
                    continue  # the condition
                t = a._facm_tangent if type(a) is DualTensor else None
                if t is None:
                    t = torch.zeros((), dtype=a.dtype, device=a.device) if name not in _JOINTLY_LINEAR_NAMES \
                        else torch.zeros_like(a)
                vals[i] = t
            elif isinstance(a, (int, float, complex)) and not isinstance(a, bool) and name == "where":
                vals[i] = 0  # a scalar branch of where is a constant: its tangent is zero
        a, k = _rebuild(vals, spec)
        return _as_list(func(*a, **k))
    total = None
    for i in dual_idx:
        if flat[i]._facm_tangent is None:
            continue
        a, k = _rebuild(_zero_tangent_args(flat, i), spec)
        part = func(*a, **k)
        total = part if total is None else total + part
    return [total]


_ADD_SUB_NAMES = {"add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "rsub", "subtract"}


def _add_sub_tangent(name: str, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Tangent of a + alpha*b, a - alpha*b and the reflected forms (other - self for __rsub__/rsub).

    Tangents are never written in place by the transform (in-place ops replace a dual's tangent), so returning an
    input's tangent unchanged, without a copy, is safe.
    """
    self_, other = args[0], (args[1] if len(args) > 1 else kwargs.get("other"))
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    t_self, t_other = tangent_of(self_), tangent_of(other)
    if name in ("__rsub__", "rsub"):
        # other - alpha * self
        first, second, sign = t_other, t_self, -1
    elif name in ("sub", "__sub__", "subtract"):
        first, second, sign = t_self, t_other, -1
    else:
        first, second, sign = t_self, t_other, 1
    scale = sign * alpha
    if second is not None and scale != 1:
        second = second * scale
    if first is None:
        return second
    if second is None:
        return first
    return first + second


def _div_tangent(args: tuple, out: torch.Tensor) -> torch.Tensor:
    a, b = args[0], args[1]
    ta = tangent_of(a)
    tb = tangent_of(b)
    tangent = None
    if ta is not None:
        tangent = ta / b
    if tb is not None:
        term = out * tb / b
        tangent = -term if tangent is None else tangent - term
    return tangent


def _functorch_tangent(func, flat: list, spec, dual_idx: list, out_flat: list, diff_positions: list,
                       tangent_context: Optional[Callable]) -> list:
    """The tangent of one op by ``torch.func.jvp`` on plain detached tensors (no graph kept)."""
    live = [i for i in dual_idx if flat[i]._facm_tangent is not None]
    base = list(flat)
    for i in dual_idx:
        base[i] = flat[i].as_subclass(torch.Tensor).detach()
    primals = tuple(base[i] for i in live)
    tangents = tuple(flat[i]._facm_tangent.to(base[i].dtype) for i in live)

    def single_op(*values):
        vals = list(base)
        for i, v in zip(live, values):
            vals[i] = v
        a, k = _rebuild(vals, spec)
        out = func(*a, **k)
        leaves = _as_list(out)
        return tuple(leaves[i] for i in diff_positions)

    if tangent_context is not None:
        with tangent_context():
            _, t_out = torch.func.jvp(single_op, primals, tangents)
    else:
        _, t_out = torch.func.jvp(single_op, primals, tangents)
    result: list = [None] * len(out_flat)
    for pos, t in zip(diff_positions, t_out):
        result[pos] = t
    return result


def _inplace(func, args: tuple, kwargs: dict, flat: list, spec, dual_idx: list):
    """In-place ops and ``out=``: the tangent is computed from the pre-update values with the out-of-place rule,
    then the primal is updated in place and the target's tangent replaced.

    Refused (JVPTransformError) when the target is not a dual (its new tangent would be lost), when ``out=`` is
    used, and when the target shares memory with another dual (a view was taken of it, or it is a view): the other
    aliases' tangents could not be kept in step.
    """
    name = _name(func)
    if "out" in kwargs and kwargs["out"] is not None:
        raise JVPTransformError(f"facm_ext.jvp: {func_name(func)}(..., out=...) writes into a preallocated tensor, "
                                "whose tangent cannot be tracked; call the op without out=")
    target = args[0]
    if _classify(func)[1] in _RANDOM_NAMES or _name(func).rstrip("_") in _RANDOM_NAMES:
        raise JVPTransformError(f"facm_ext.jvp: in-place random op {func_name(func)} (e.g. dropout with "
                                "inplace=True) cannot replay its draw for the tangent; use inplace=False")
    if type(target) is not DualTensor:
        raise JVPTransformError(
            f"facm_ext.jvp: in-place {func_name(func)} writes a value carrying a tangent into a tensor that has none "
            f"(shape {tuple(target.shape)}); build the result out of place (torch.cat/stack/where) instead")
    if target._facm_shares_memory:
        raise JVPTransformError(
            f"facm_ext.jvp: in-place {func_name(func)} on a tensor that shares memory with another traced tensor "
            f"(a view of it was taken, or it is a view); its aliases' tangents cannot be kept in step. Use the "
            f"out-of-place op (e.g. x = x + y instead of x += y)")
    with torch.no_grad(), DisableTorchFunctionSubclass():
        if name == "__setitem__":
            index, value = args[1], args[2]
            new_tangent = target._facm_tangent.clone() if target._facm_tangent is not None \
                else torch.zeros_like(target)
            value_tangent = tangent_of(value)
            new_tangent[index] = value_tangent if value_tangent is not None else 0
        elif name == "copy_":
            source = args[1]
            source_tangent = tangent_of(source)
            new_tangent = None if source_tangent is None else \
                source_tangent.to(target.dtype).expand(target.shape).clone()
        elif name in ("zero_",):
            new_tangent = None
        else:
            out_of_place = _out_of_place(func)
            if out_of_place is None:
                raise JVPTransformError(f"facm_ext.jvp: no rule for the in-place op {func_name(func)}; use its "
                                        "out-of-place form")
            snapshot = list(flat)
            snapshot[0] = make_dual(target.as_subclass(torch.Tensor).clone(), target._facm_tangent)
            a, k = _rebuild(snapshot, spec)
            if "inplace" in k:
                k = dict(k, inplace=False)
            result = dispatch(out_of_place, a, k)
            new_tangent = tangent_of(result)
    with DisableTorchFunctionSubclass():
        out = func(*args, **kwargs)
    if new_tangent is not None and new_tangent.dtype != target.dtype:
        new_tangent = new_tangent.to(target.dtype)
    if new_tangent is not None and new_tangent.shape != target.shape:
        new_tangent = new_tangent.expand(target.shape)
    target._facm_tangent = new_tangent
    if name == "__setitem__":
        return None
    return target if name.startswith("__i") else out


def _out_of_place(func) -> Optional[Callable]:
    name = _name(func)
    if not name.endswith("_"):
        return func  # a functional op called with inplace=True: the same op with inplace=False
    if name.startswith("__i") and name.endswith("__"):
        candidate = "__" + name[3:]
    elif name.endswith("_"):
        candidate = name[:-1]
    else:
        return None
    owner = torch.Tensor if hasattr(torch.Tensor, candidate) else None
    if owner is not None:
        return getattr(owner, candidate)
    functional = getattr(torch.nn.functional, candidate, None)
    return functional
