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
import os
from typing import Iterable, Sequence

import torch

from facm_ext import _extension

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
def check_tensor(name: str, value, *, ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """Raise ValueError naming ``name`` unless ``value`` is a tensor of an accepted dtype and rank."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    dtypes = tuple(dtypes)
    if value.dtype not in dtypes:
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
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), "
                             f"got {value.device}")


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.dtype != reference.dtype:
            raise ValueError(f"{name}: expected dtype {reference.dtype} (the dtype of {reference_name}), "
                             f"got {value.dtype}")


def check_tangent(name: str, tangent, primal_name: str, primal: torch.Tensor) -> None:
    """A tangent is None or a tensor of its primal's shape, device and floating dtype."""
    if tangent is None:
        return
    check_tensor(name, tangent)
    if tangent.shape != primal.shape:
        raise ValueError(f"{name}: tangent shape {tuple(tangent.shape)} differs from the shape "
                         f"{tuple(primal.shape)} of its primal {primal_name}")
    check_same_device(primal_name, primal, **{name: tangent})


def check_broadcastable(name: str, value: torch.Tensor, target_name: str, target_shape) -> None:
    try:
        shape = torch.broadcast_shapes(value.shape, tuple(target_shape))
    except RuntimeError:
        shape = None
    if shape != tuple(target_shape):
        raise ValueError(f"{name}: shape {tuple(value.shape)} does not broadcast to the shape "
                         f"{tuple(target_shape)} of {target_name}")


# ---------------------------------------------------------------------------------------------------------- backends
def _forced_backend() -> str | None:
    """FACM_EXT_BACKEND=reference|triton|cuda forces one backend where it applies (tests and benchmarks)."""
    value = os.environ.get("FACM_EXT_BACKEND", "").strip().lower()
    return value or None


def use_cuda_kernel(kernel: str, *tensors) -> bool:
    """True when every given tensor is a CUDA tensor of a kernel dtype and the compiled kernel exists."""
    forced = _forced_backend()
    if forced is not None and forced != "cuda":
        return False
    live = [t for t in tensors if t is not None]
    if not live or not all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in live):
        return False
    return _extension.has_kernel(kernel)


def use_triton(*tensors, dtypes: Iterable[torch.dtype] = KERNEL_DTYPES) -> bool:
    """True when every given tensor is on CUDA with a supported dtype and Triton imports."""
    forced = _forced_backend()
    if forced is not None and forced != "triton":
        return False
    dtypes = tuple(dtypes)
    live = [t for t in tensors if t is not None]
    if not live or not all(t.is_cuda and t.dtype in dtypes for t in live):
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


def zeros_tangent(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------ custom ops, eager path
_EXACT_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _eager_dispatch_forced() -> bool:
    return os.environ.get("FACM_EXT_EAGER_DISPATCH", "").strip().lower() == "custom_op"


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
        impl = self._impl

        def forward(*args):
            return impl(*args)

        self._function = type(self.name.split("::")[-1] + "_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        })

    def _eager_ok(self, args) -> bool:
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or torch._C._functorch.peek_interpreter_stack() is not None or _eager_dispatch_forced()):
            return False
        return all(type(a) in _EXACT_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))

    def __call__(self, *args):
        if not self._eager_ok(args):
            return self.op(*args)
        if (self._function is not None and torch.is_grad_enabled()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return self._function.apply(*args)
        return self._impl(*args)


def jvp_custom_op(name: str, *, mutates_args=()):
    """Decorator: register ``fn`` as the torch custom op ``name`` and return a :class:`JVPCustomOp` for it."""
    def wrap(fn) -> JVPCustomOp:
        return JVPCustomOp(name, fn, mutates_args=mutates_args)

    return wrap
