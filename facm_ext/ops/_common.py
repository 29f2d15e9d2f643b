"""Validation, backend selection and the op registry shared by every facm_ext op.

Conventions every op follows:
- Public function ``<name>_jvp(...) -> (primal_out, tangent_out)``; any tangent argument may be ``None`` (zero).
- The public function validates its arguments (``ValueError`` naming the argument), then calls the registered
  torch custom op ``torch.ops.facm_ext.<name>_jvp``. The custom op has a fake implementation, a backward for the
  primal output, and picks its backend at run time: the CUDA kernel (facm_ext._C), else Triton, else the
  plain-PyTorch path, which is also the CPU path.
- Math in fp32, outputs (primal and tangent) in the input dtype. The tangent output never carries a graph.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch

from facm_ext import _env, _extension

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------- registry
@dataclasses.dataclass
class OpInfo:
    """What ``python -m facm_ext.info`` prints for one public op."""

    name: str
    backends: dict  # backend name -> when it is used, e.g. {"cuda": "fp16/bf16/fp32 on CUDA", "reference": "..."}
    kernel: str | None = None  # name of the compiled kernel op in torch.ops.facm_ext, if any
    notes: str = ""


OP_REGISTRY: dict[str, OpInfo] = {}


def register_op_info(info: OpInfo) -> OpInfo:
    OP_REGISTRY[info.name] = info
    return info


# -------------------------------------------------------------------------------------------------------- validation
# The validation below runs on every op call, several times per call (one fused op per layer of a transformed
# model), so each check is written for the passing case: a set lookup for the default dtypes, the reference's
# device and dtype read once; the messages are built only on failure.
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)
_KERNEL_DTYPE_SET = frozenset(KERNEL_DTYPES)


def check_tensor(name: str, value, *, ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """Raise ValueError naming ``name`` unless ``value`` is a tensor of an accepted dtype and rank."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is FLOAT_DTYPES:
        dtype_ok = value.dtype in _FLOAT_DTYPE_SET
    else:
        dtypes = tuple(dtypes)
        dtype_ok = value.dtype in dtypes
    if not dtype_ok:
        raise ValueError(f"{name}: dtype {value.dtype} is not supported; expected one of "
                         f"{', '.join(str(d) for d in dtypes)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, got shape "
                             f"{tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Raise ValueError naming the first tensor in ``others`` that is not on ``reference``'s device."""
    device = reference.device
    for name, value in others.items():
        if value is not None and value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of {reference_name}), "
                             f"got {value.device}")


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others) -> None:
    dtype = reference.dtype
    for name, value in others.items():
        if value is not None and value.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (the dtype of {reference_name}), "
                             f"got {value.dtype}")


def check_tangent(name: str, tangent, primal_name: str, primal: torch.Tensor) -> None:
    """A tangent is None or a tensor of its primal's shape, device and floating dtype."""
    if tangent is None:
        return
    check_tensor(name, tangent)
    if tangent.shape != primal.shape:
        raise ValueError(f"{name}: tangent shape {tuple(tangent.shape)} differs from the shape "
                         f"{tuple(primal.shape)} of its primal {primal_name}")
    if tangent.device != primal.device:  # check_same_device(primal_name, primal, **{name: tangent}), inlined
        raise ValueError(f"{name}: expected a tensor on {primal.device} (the device of {primal_name}), "
                         f"got {tangent.device}")


def plain_tangent(tangent, shape, device) -> bool:
    """True when :func:`check_tangent` passes for a primal of ``shape`` on ``device``: None, or a floating tensor of
    that shape and device. For the ops' one-pass checks of their common case (see linear._plain_linear_args)."""
    return tangent is None or (isinstance(tangent, torch.Tensor) and tangent.dtype in _FLOAT_DTYPE_SET
                               and tangent.shape == shape and tangent.device == device)


def check_broadcastable(name: str, value: torch.Tensor, target_name: str, target_shape) -> None:
    """ValueError unless broadcasting ``value`` against ``target_shape`` gives ``target_shape``: each of value's
    dims, aligned from the right, equals the target's or is 1, and value has no more dims. (Decided here rather
    than through torch.broadcast_shapes, which runs Python reference code: ~10 us per check.)"""
    shape, target = tuple(value.shape), tuple(target_shape)
    offset = len(target) - len(shape)
    if offset < 0 or any(size != 1 and size != target[offset + i] for i, size in enumerate(shape)):
        raise ValueError(f"{name}: shape {shape} does not broadcast to the shape {target} of {target_name}")


# ---------------------------------------------------------------------------------------------------------- backends
@_env.per_snapshot
def _forced_backend() -> str | None:
    """FACM_EXT_BACKEND=reference|triton|cuda forces one backend where it applies (tests and benchmarks)."""
    value = _env.get("FACM_EXT_BACKEND", "").strip().lower()
    return value or None


def _all_cuda(tensors: tuple, dtypes) -> bool:
    """At least one tensor, and every one that is not None a CUDA tensor with a dtype in ``dtypes``."""
    live = False
    for t in tensors:
        if t is not None:
            if not (t.is_cuda and t.dtype in dtypes):
                return False
            live = True
    return live


def use_cuda_kernel(kernel: str, *tensors) -> bool:
    """True when every given tensor is a CUDA tensor of a kernel dtype and the compiled kernel exists."""
    forced = _forced_backend()
    if forced is not None and forced != "cuda":
        return False
    if not _all_cuda(tensors, _KERNEL_DTYPE_SET):
        return False
    return _extension.has_kernel(kernel)


def use_triton(*tensors, dtypes: Iterable[torch.dtype] = KERNEL_DTYPES) -> bool:
    """True when every given tensor is on CUDA with a supported dtype and Triton imports."""
    forced = _forced_backend()
    if forced is not None and forced != "triton":
        return False
    if not _all_cuda(tensors, tuple(dtypes)):
        return False
    return triton_available()


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


class autocast_disabled:
    """``torch.autocast(device_type, enabled=False)`` for op bodies, which enter it on every call: the same changes
    to the autocast state (that device's enabled flag, the nesting count, the cast cache dropped when the count
    returns to zero), without torch.autocast's constructor and argument checks (3 us per entry measured on the CPU,
    a third of a small op's host time)."""

    __slots__ = ("device_type", "prev")

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __enter__(self):
        self.prev = torch.is_autocast_enabled(self.device_type)
        torch.set_autocast_enabled(self.device_type, False)
        torch.autocast_increment_nesting()

    def __exit__(self, *exc_info):
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(self.device_type, self.prev)


def zeros_tangent(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------ custom ops, eager path
_EXACT_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


@_env.per_snapshot
def _eager_dispatch_forced() -> bool:
    return _env.get("FACM_EXT_EAGER_DISPATCH", "").strip().lower() == "custom_op"


class JVPCustomOp:
    """A registered torch custom op (``torch.ops.facm_ext.<name>``) whose plain eager calls skip the dispatcher.

    ``torch.compile`` traces the registered op and ``torch.library.opcheck`` checks it; so do tensor subclasses,
    dispatch modes and functorch transforms, which always get the dispatcher path. A plain eager call runs the same
    implementation directly, and when grad is enabled and an input requires grad, through a
    ``torch.autograd.Function`` built from the same ``setup_context`` and backward. Why: one LightningDiT-XL JVP
    makes ~1,200 op calls and is host-bound at small batches (benchmarks/profile_overhead.py); the dispatcher
    round trip is host work the eager call does not need. Measured: no wall-time change beyond run-to-run noise on
    an H200 (the host time is spread over the whole transform; facm_ext.jvp.graph is what removes it).
    ``FACM_EXT_EAGER_DISPATCH=custom_op`` sends eager calls through the dispatcher as well.
    """

    def __init__(self, name: str, fn, mutates_args=()):
        self.name = name
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        self._impl = fn
        self._function = None

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        op = self

        # The eager Function has the form whose forward takes ctx and runs setup_context itself: when a Function
        # defines setup_context separately, every Function.apply binds its arguments through inspect.signature
        # (torch 2.14: 40 us per apply instead of 10, measured on the CPU; one apply per op of a JVP with grad).
        def forward(ctx, *args):
            output = op._impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(self.name.split("::")[-1] + "_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    def __call__(self, *args):
        # Tensor types (only exact tensors take the eager path) and requires_grad read in one pass over the
        # arguments: this runs once per op call.
        requires_grad = False
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) not in _EXACT_TENSOR_TYPES:
                    return self.op(*args)
                requires_grad = requires_grad or a.requires_grad
        # The dispatcher path when compiling, under a dispatch mode or a functorch transform, or when forced.
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._functorch.peek_interpreter_stack() is not None or _eager_dispatch_forced()):
            return self.op(*args)
        if requires_grad and self._function is not None and torch.is_grad_enabled():
            return self._function.apply(*args)
        return self._impl(*args)


def jvp_custom_op(name: str, *, mutates_args=()):
    """Decorator: register ``fn`` as the torch custom op ``name`` and return a :class:`JVPCustomOp` for it."""
    def wrap(fn) -> JVPCustomOp:
        return JVPCustomOp(name, fn, mutates_args=mutates_args)

    return wrap
