// Schema and CUDA implementation of facm_ext::rms_norm_rope_jvp_cuda (see rms_norm_rope_jvp.h). The Python op
// (facm_ext/ops/rms_norm_rope.py) validates arguments, converts the weight and tables to fp32 and calls this; its
// fake implementation is registered from Python. x may be any strided view with a unit channel stride (else it is
// copied); out, tout are contiguous in x's logical layout, rstd is fp32 of x's shape without the channel dim.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/kernel_ops.h"
#include "rms_norm_rope_jvp.h"
#include "rope_bindings_common.h"

namespace facm_ext::rope {
namespace {

constexpr const char* kOp = "rms_norm_rope_jvp_cuda";

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_jvp_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& tx, const std::optional<at::Tensor>& weight, double eps,
    const at::Tensor& cos, const at::Tensor& sin, bool interleaved, c10::string_view layout) {
  RmsNormRopeArgs args;
  RopeOperands keep;
  const bool tokens_first = prepare_rope_args(kOp, x, tx, cos, sin, interleaved, layout, args.rope, keep);
  const int64_t head_dim = args.rope.head_dim;
  TORCH_CHECK(head_dim >= 2 && head_dim <= kRmsNormRopeMaxHeadDim, kOp, ": head_dim (x's last dim) must be at most ",
              std::to_string(kRmsNormRopeMaxHeadDim), ", got ", std::to_string(head_dim));
  TORCH_CHECK(eps >= 0.0, kOp, ": eps must be >= 0, got ", std::to_string(eps));
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->dim() == 1 && weight->size(0) == head_dim &&
                    weight->is_contiguous() && weight->device() == x.device(),
                kOp, ": weight must be a contiguous float32 [", std::to_string(head_dim),
                "] tensor on x's device, got ", facm_ext::dims_str(weight->sizes()));
  }

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor tout = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {out, tout, rstd};

  set_outputs(args.rope, out, tout, tokens_first);
  args.rstd = rstd.data_ptr<float>();
  strides_of(rstd, tokens_first, args.rstd_stride_b, args.rstd_stride_h, args.rstd_stride_l);
  args.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  args.eps = static_cast<float>(eps);
  const cudaError_t err = launch_rms_norm_rope_jvp(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, tout, rstd};
}

}  // namespace facm_ext::rope

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def("rms_norm_rope_jvp_cuda(Tensor x, Tensor? tx, Tensor? weight, float eps, Tensor cos, Tensor sin, "
        "bool interleaved, str layout) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) {
  m.impl("rms_norm_rope_jvp_cuda", &facm_ext::rope::rms_norm_rope_jvp_cuda);
}
