// torch op facm_ext::norm_modulate_jvp_cuda: checks its inputs, allocates the outputs and launches the fused
// norm + modulate JVP kernel (norm_jvp.cu) on the current stream. The Python op layer (facm_ext/ops/norms.py)
// prepares the [B, L, C] views; this op re-checks everything it relies on.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/kernel_ops.h"
#include "norm_jvp.h"
#include "common/format.h"

namespace facm_ext::norms {
namespace {

ElemType elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: TORCH_CHECK(false, "norm_modulate_jvp_cuda: ", name, " must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return ElemType::kFloat32;
}

// A [B, L, C] tensor with a contiguous channel dim; strides of size-1 dims do not matter and read as 0.
Operand3d operand(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->is_cuda() && t->device() == x.device(), "norm_modulate_jvp_cuda: ", name,
              " must be on the device of x (", x.device(), "), got ", t->device());
  TORCH_CHECK(t->dim() == 3 && t->sizes() == x.sizes(), "norm_modulate_jvp_cuda: ", name,
              " must have the shape of x ", facm_ext::dims_str(x.sizes()), " (expand broadcast modulation first), got ", facm_ext::dims_str(t->sizes()));
  TORCH_CHECK(t->size(2) <= 1 || t->stride(2) == 1, "norm_modulate_jvp_cuda: ", name,
              " must be contiguous in its last dim, got strides ", facm_ext::dims_str(t->strides()));
  Operand3d op;
  op.data = t->data_ptr();
  op.stride_b = t->size(0) == 1 ? 0 : t->stride(0);
  op.stride_l = t->size(1) == 1 ? 0 : t->stride(1);
  return op;
}

const float* channel_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->device() == x.device(), "norm_modulate_jvp_cuda: ", name,
              " must be on the device of x (", x.device(), "), got ", t->device());
  // Messages carry numbers as strings (std::to_string, facm_ext::dims_str): on torch 2.11 a failed TORCH_CHECK whose
  // message streamed an integer crashed the process (SIGSEGV) instead of raising.
  const std::string what = std::string("norm_modulate_jvp_cuda: ") + name +
                           " must be a contiguous float32 tensor of shape [" + std::to_string(x.size(2)) + "]";
  TORCH_CHECK(t->scalar_type() == at::kFloat, what, ", got dtype ", std::string(c10::toString(t->scalar_type())));
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(2), what, ", got shape ", facm_ext::dims_str(t->sizes()));
  TORCH_CHECK(t->is_contiguous(), what, ", got a non-contiguous tensor");
  return t->data_ptr<float>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_jvp_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& tx, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& tshift, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& tscale, int64_t norm, double eps, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.is_cuda(), "norm_modulate_jvp_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "norm_modulate_jvp_cuda: x must be [B, L, C], got ", facm_ext::dims_str(x.sizes()));
  TORCH_CHECK(x.size(2) >= 1, "norm_modulate_jvp_cuda: x must have at least one channel, got ", facm_ext::dims_str(x.sizes()));
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1,
              "norm_modulate_jvp_cuda: x must be contiguous in its last dim, got strides ", facm_ext::dims_str(x.strides()));
  TORCH_CHECK(norm >= 0 && norm <= 2, "norm_modulate_jvp_cuda: norm must be 0 (none), 1 (layer) or 2 (rms), got ",
              std::to_string(norm));
  TORCH_CHECK(eps >= 0.0, "norm_modulate_jvp_cuda: eps must be >= 0, got ", std::to_string(eps));
  TORCH_CHECK(norm != 0 || (!weight.has_value() && !bias.has_value()),
              "norm_modulate_jvp_cuda: weight and bias need a norm (norm = 1 or 2)");
  TORCH_CHECK(norm != 2 || !bias.has_value(), "norm_modulate_jvp_cuda: RMSNorm takes no bias");
  TORCH_CHECK(shift.has_value() || !tshift.has_value(), "norm_modulate_jvp_cuda: tshift given without shift");
  TORCH_CHECK(scale.has_value() || !tscale.has_value(), "norm_modulate_jvp_cuda: tscale given without scale");

  NormJvpParams p;
  p.batch = x.size(0);
  p.length = x.size(1);
  p.channels = x.size(2);
  p.x_type = elem_type(x, "x");
  p.y_type = p.x_type;
  p.norm = static_cast<NormKind>(norm);
  p.eps = static_cast<float>(eps);
  p.x = operand(x, "x", x);
  if (tx.has_value()) {
    TORCH_CHECK(tx->scalar_type() == x.scalar_type(), "norm_modulate_jvp_cuda: tx must have the dtype of x (",
                x.scalar_type(), "), got ", tx->scalar_type());
  }
  p.tx = operand(tx, "tx", x);

  // All modulation tensors share one dtype: x's or float32.
  std::optional<at::ScalarType> mod_dtype;
  const std::pair<const std::optional<at::Tensor>*, const char*> mods[] = {
      {&shift, "shift"}, {&tshift, "tshift"}, {&scale, "scale"}, {&tscale, "tscale"}};
  for (const auto& [t, name] : mods) {
    if (!t->has_value()) continue;
    const at::ScalarType dt = (*t)->scalar_type();
    TORCH_CHECK(dt == x.scalar_type() || dt == at::kFloat, "norm_modulate_jvp_cuda: ", name,
                " must be float32 or the dtype of x (", x.scalar_type(), "), got ", dt);
    TORCH_CHECK(!mod_dtype.has_value() || *mod_dtype == dt,
                "norm_modulate_jvp_cuda: shift, tshift, scale and tscale must share one dtype; ", name, " is ", dt,
                ", an earlier one is ", *mod_dtype);
    mod_dtype = dt;
  }
  p.mod_type = mod_dtype.has_value() && *mod_dtype == at::kFloat ? ElemType::kFloat32 : p.x_type;
  p.shift = operand(shift, "shift", x);
  p.tshift = operand(tshift, "tshift", x);
  p.scale = operand(scale, "scale", x);
  p.tscale = operand(tscale, "tscale", x);
  p.weight = channel_vector(weight, "weight", x);
  p.bias = channel_vector(bias, "bias", x);

  // An output dtype other than x's: a 16-bit type for fp32 x is written by the kernel where it can
  // (narrow_output_supported), rounding the fp32 result once; any other (and that one elsewhere) is a cast of the
  // outputs in x's dtype, which for fp32 x also rounds the fp32 result once.
  const at::ScalarType y_dtype = out_dtype.value_or(x.scalar_type());
  bool cast_after = false;
  if (y_dtype != x.scalar_type()) {
    TORCH_CHECK(y_dtype == at::kFloat || y_dtype == at::kHalf || y_dtype == at::kBFloat16 || y_dtype == at::kDouble,
                "norm_modulate_jvp_cuda: out_dtype must be a floating dtype, got ", std::string(c10::toString(y_dtype)));
    cast_after = true;
    if (x.scalar_type() == at::kFloat && (y_dtype == at::kBFloat16 || y_dtype == at::kHalf)) {
      p.y_type = y_dtype == at::kBFloat16 ? ElemType::kBFloat16 : ElemType::kFloat16;
      cast_after = !narrow_output_supported(p);
      if (cast_after) p.y_type = p.x_type;
    }
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto y_options = x.options().dtype(cast_after ? x.scalar_type() : y_dtype)
                             .memory_format(at::MemoryFormat::Contiguous);
  at::Tensor y = at::empty(x.sizes(), y_options);
  at::Tensor ty = at::empty(x.sizes(), y_options);
  const int64_t rows = p.batch * p.length;
  const auto stat_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({norm == 1 ? rows : 0}, stat_options);
  at::Tensor rstd = at::empty({norm != 0 ? rows : 0}, stat_options);
  p.y = y.data_ptr();
  p.ty = ty.data_ptr();
  p.mean = norm == 1 ? mean.data_ptr<float>() : nullptr;
  p.rstd = norm != 0 ? rstd.data_ptr<float>() : nullptr;

  TORCH_CHECK(p.channels <= max_channels(p), "norm_modulate_jvp_cuda: C = ", std::to_string(p.channels),
              " exceeds the kernel's limit of ", std::to_string(max_channels(p)),
              " channels for these inputs (use the PyTorch path: facm_ext.ops.norms)");
  const cudaError_t err = launch_norm_jvp(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "norm_modulate_jvp_cuda: kernel launch failed: ", cudaGetErrorString(err));
  if (cast_after) return {y.to(y_dtype), ty.to(y_dtype), mean, rstd};
  return {y, ty, mean, rstd};
}

}  // namespace facm_ext::norms

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def(
      "norm_modulate_jvp_cuda(Tensor x, Tensor? tx, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? tshift, "
      "Tensor? scale, Tensor? tscale, int norm, float eps, ScalarType? out_dtype=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) {
  m.impl("norm_modulate_jvp_cuda", &facm_ext::norms::norm_modulate_jvp_cuda);
}
