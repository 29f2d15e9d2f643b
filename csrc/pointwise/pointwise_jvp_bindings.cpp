// Schemas and CUDA implementations of the pointwise JVP kernel ops:
//   facm_ext::gelu_jvp_cuda, silu_jvp_cuda, swiglu_jvp_cuda, gated_residual_jvp_cuda.
// The Python ops (facm_ext/ops/pointwise.py) validate arguments and call these; their fake implementations are
// registered from Python. Inputs of any strides: an operand whose leading dims do not collapse to one stride, or
// whose last dim is strided, is copied contiguous first (correct, one extra pass).
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/kernel_ops.h"
#include "pointwise_jvp.h"
#include "common/format.h"

namespace facm_ext::pointwise {
namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", t.scalar_type(),
                  "; the CUDA kernel takes float32, float16 or bfloat16");
  }
}

// Element stride that walks dims [0, n - 2) of t as one collapsed batch dim; false when they do not collapse.
bool collapsed_batch_stride(const at::Tensor& t, int64_t* stride_b) {
  bool found = false;
  int64_t stride = 0, expected = 0;
  for (int64_t i = t.dim() - 3; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (found && t.stride(i) != expected) return false;
    if (!found) stride = t.stride(i);
    found = true;
    expected = t.stride(i) * t.size(i);
  }
  *stride_b = found ? stride : 0;
  return true;
}

Shape3 shape3_of(at::IntArrayRef sizes) {
  Shape3 s;
  const int64_t n = static_cast<int64_t>(sizes.size());
  s.channels = sizes[n - 1];
  s.tokens = n >= 2 ? sizes[n - 2] : 1;
  s.batches = 1;
  for (int64_t i = 0; i + 2 < n; ++i) s.batches *= sizes[i];
  return s;
}

// The [B, T, C] operand view of `t` broadcast to `sizes`; `keep` holds any contiguous copy alive.
Operand operand_of(const at::Tensor& t_in, at::IntArrayRef sizes, at::Tensor& keep) {
  at::Tensor t = t_in.expand(sizes);
  const int64_t n = t.dim();
  int64_t stride_b = 0;
  const bool unit_channels = t.size(n - 1) == 1 || t.stride(n - 1) == 1;
  if (!unit_channels || !collapsed_batch_stride(t, &stride_b)) {
    t = t.contiguous();
    TORCH_INTERNAL_ASSERT(collapsed_batch_stride(t, &stride_b));
  }
  keep = t;
  Operand op;
  op.ptr = t.data_ptr();
  op.stride_b = stride_b;
  op.stride_t = (n >= 2 && t.size(n - 2) > 1) ? t.stride(n - 2) : 0;
  op.dtype = kernel_dtype(t, "pointwise JVP", "operand");
  return op;
}

void check_input(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension");
  kernel_dtype(t, op, name);
}

void check_tangent(const std::optional<at::Tensor>& tangent, const at::Tensor& primal, const char* op,
                   const char* name) {
  if (!tangent.has_value()) return;
  check_input(*tangent, op, name, primal);
  TORCH_CHECK(tangent->sizes() == primal.sizes(), op, ": ", name, " has shape ", facm_ext::dims_str(tangent->sizes()),
              ", expected its primal's shape ", facm_ext::dims_str(primal.sizes()));
  TORCH_CHECK(tangent->scalar_type() == primal.scalar_type(), op, ": ", name, " has dtype ",
              tangent->scalar_type(), ", expected its primal's dtype ", primal.scalar_type());
}

Operand optional_operand(const std::optional<at::Tensor>& t, at::IntArrayRef sizes, at::Tensor& keep) {
  if (!t.has_value()) return Operand{};
  return operand_of(*t, sizes, keep);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TensorPair gelu_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx, c10::string_view approximate) {
  constexpr const char* kOp = "gelu_jvp_cuda";
  check_input(x, kOp, "x", x);
  check_tangent(tx, x, kOp, "tx");
  TORCH_CHECK(approximate == "tanh" || approximate == "none", kOp, ": approximate must be 'tanh' or 'none', got '",
              approximate, "'");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor tout = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {out, tout};
  at::Tensor keep_x, keep_tx;
  const Operand xo = operand_of(x, x.sizes(), keep_x);
  const Operand to = optional_operand(tx, x.sizes(), keep_tx);
  check_launch(launch_gelu_jvp(shape3_of(x.sizes()), xo, to, out.data_ptr(), tout.data_ptr(), approximate == "tanh",
                               c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {out, tout};
}

TensorPair silu_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx) {
  constexpr const char* kOp = "silu_jvp_cuda";
  check_input(x, kOp, "x", x);
  check_tangent(tx, x, kOp, "tx");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor tout = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {out, tout};
  at::Tensor keep_x, keep_tx;
  const Operand xo = operand_of(x, x.sizes(), keep_x);
  const Operand to = optional_operand(tx, x.sizes(), keep_tx);
  check_launch(launch_silu_jvp(shape3_of(x.sizes()), xo, to, out.data_ptr(), tout.data_ptr(),
                               c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {out, tout};
}

TensorPair swiglu_jvp_cuda(const at::Tensor& a, const std::optional<at::Tensor>& ta, const at::Tensor& b,
                           const std::optional<at::Tensor>& tb) {
  constexpr const char* kOp = "swiglu_jvp_cuda";
  check_input(a, kOp, "a", a);
  check_input(b, kOp, "b", a);
  TORCH_CHECK(b.sizes() == a.sizes(), kOp, ": b has shape ", facm_ext::dims_str(b.sizes()), ", expected a's shape ", facm_ext::dims_str(a.sizes()));
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), kOp, ": b has dtype ", b.scalar_type(), ", expected a's dtype ",
              a.scalar_type());
  check_tangent(ta, a, kOp, "ta");
  check_tangent(tb, b, kOp, "tb");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(a.sizes(), a.options());
  at::Tensor tout = at::empty(a.sizes(), a.options());
  if (a.numel() == 0) return {out, tout};
  at::Tensor keep[4];
  const Operand ao = operand_of(a, a.sizes(), keep[0]);
  const Operand tao = optional_operand(ta, a.sizes(), keep[1]);
  const Operand bo = operand_of(b, a.sizes(), keep[2]);
  const Operand tbo = optional_operand(tb, a.sizes(), keep[3]);
  check_launch(launch_swiglu_jvp(shape3_of(a.sizes()), ao, tao, bo, tbo, out.data_ptr(), tout.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {out, tout};
}

// gate broadcasts to x by PyTorch's rules (the Python op turns a [B, C] gate of a [B, L, C] x into [B, 1, C]).
TensorPair gated_residual_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx, const at::Tensor& gate,
                                   const std::optional<at::Tensor>& tgate, const at::Tensor& y,
                                   const std::optional<at::Tensor>& ty) {
  constexpr const char* kOp = "gated_residual_jvp_cuda";
  check_input(x, kOp, "x", x);
  check_input(gate, kOp, "gate", x);
  check_input(y, kOp, "y", x);
  TORCH_CHECK(y.sizes() == x.sizes(), kOp, ": y has shape ", facm_ext::dims_str(y.sizes()), ", expected x's shape ", facm_ext::dims_str(x.sizes()));
  TORCH_CHECK(gate.dim() <= x.dim(), kOp, ": gate has shape ", facm_ext::dims_str(gate.sizes()), ", which does not broadcast to x's ",
              facm_ext::dims_str(x.sizes()));
  for (int64_t i = 1; i <= gate.dim(); ++i) {
    const int64_t g = gate.size(-i);
    TORCH_CHECK(g == 1 || g == x.size(-i), kOp, ": gate has shape ", facm_ext::dims_str(gate.sizes()),
                ", which does not broadcast to x's ", facm_ext::dims_str(x.sizes()));
  }
  check_tangent(tx, x, kOp, "tx");
  check_tangent(tgate, gate, kOp, "tgate");
  check_tangent(ty, y, kOp, "ty");
  const DType dx = kernel_dtype(x, kOp, "x"), dg = kernel_dtype(gate, kOp, "gate"), dy = kernel_dtype(y, kOp, "y");
  TORCH_CHECK(gated_residual_supported(dx, dg, dy), kOp, ": unsupported dtype combination x=", x.scalar_type(),
              ", gate=", gate.scalar_type(), ", y=", y.scalar_type(),
              " (supported: one dtype; an fp32 gate with x and y of one dtype; fp32 x with fp16/bf16 y and an fp32 "
              "gate or one of y's dtype)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor tout = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {out, tout};
  at::Tensor keep[6];
  const Operand xo = operand_of(x, x.sizes(), keep[0]);
  const Operand txo = optional_operand(tx, x.sizes(), keep[1]);
  const Operand go = operand_of(gate, x.sizes(), keep[2]);
  const Operand tgo = optional_operand(tgate, x.sizes(), keep[3]);
  const Operand yo = operand_of(y, x.sizes(), keep[4]);
  const Operand tyo = optional_operand(ty, x.sizes(), keep[5]);
  check_launch(launch_gated_residual_jvp(shape3_of(x.sizes()), xo, txo, go, tgo, yo, tyo, out.data_ptr(),
                                         tout.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {out, tout};
}

}  // namespace facm_ext::pointwise

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def("gelu_jvp_cuda(Tensor x, Tensor? tx, str approximate) -> (Tensor, Tensor)");
  m.def("silu_jvp_cuda(Tensor x, Tensor? tx) -> (Tensor, Tensor)");
  m.def("swiglu_jvp_cuda(Tensor a, Tensor? ta, Tensor b, Tensor? tb) -> (Tensor, Tensor)");
  m.def("gated_residual_jvp_cuda(Tensor x, Tensor? tx, Tensor gate, Tensor? tgate, Tensor y, Tensor? ty) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) {
  m.impl("gelu_jvp_cuda", &facm_ext::pointwise::gelu_jvp_cuda);
  m.impl("silu_jvp_cuda", &facm_ext::pointwise::silu_jvp_cuda);
  m.impl("swiglu_jvp_cuda", &facm_ext::pointwise::swiglu_jvp_cuda);
  m.impl("gated_residual_jvp_cuda", &facm_ext::pointwise::gated_residual_jvp_cuda);
}
