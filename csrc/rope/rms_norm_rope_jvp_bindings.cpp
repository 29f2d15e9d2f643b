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

#include "rms_norm_rope_jvp.h"
#include "common/format.h"

namespace facm_ext::rope {
namespace {

constexpr const char* kOp = "rms_norm_rope_jvp_cuda";

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, kOp, ": x has dtype ", std::string(c10::toString(t.scalar_type())),
                  "; the CUDA kernel takes float32, float16 or bfloat16");
  }
}

// (batch, head, position) strides of a 4-d tensor in the given layout.
void strides_of(const at::Tensor& t, bool tokens_first, int64_t& b, int64_t& h, int64_t& l) {
  b = t.stride(0);
  h = tokens_first ? t.stride(2) : t.stride(1);
  l = tokens_first ? t.stride(1) : t.stride(2);
}

Operand4 operand_of(const at::Tensor& t_in, bool tokens_first, at::Tensor& keep) {
  keep = (t_in.size(3) == 1 || t_in.stride(3) == 1) ? t_in : t_in.contiguous();
  Operand4 op;
  op.ptr = keep.data_ptr();
  strides_of(keep, tokens_first, op.stride_b, op.stride_h, op.stride_l);
  return op;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_jvp_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& tx, const std::optional<at::Tensor>& weight, double eps,
    const at::Tensor& cos, const at::Tensor& sin, bool interleaved, c10::string_view layout) {
  TORCH_CHECK(layout == "BHLD" || layout == "BLHD", kOp, ": layout must be 'BHLD' or 'BLHD', got '",
              std::string(layout), "'");
  const bool tokens_first = layout == "BLHD";
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, kOp, ": x must be a 4-d CUDA tensor, got ", facm_ext::dims_str(x.sizes()));
  const DType dtype = kernel_dtype(x);
  const int64_t batches = x.size(0), heads = tokens_first ? x.size(2) : x.size(1);
  const int64_t tokens = tokens_first ? x.size(1) : x.size(2), head_dim = x.size(3);
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= kRmsNormRopeMaxHeadDim, kOp,
              ": head_dim (x's last dim) must be even and at most ", std::to_string(kRmsNormRopeMaxHeadDim), ", got ",
              std::to_string(head_dim));
  TORCH_CHECK(eps >= 0.0, kOp, ": eps must be >= 0, got ", std::to_string(eps));
  if (tx.has_value()) {
    TORCH_CHECK(tx->sizes() == x.sizes() && tx->scalar_type() == x.scalar_type() && tx->device() == x.device(), kOp,
                ": tx must match x's shape, dtype and device");
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->dim() == 1 && weight->size(0) == head_dim &&
                    weight->is_contiguous() && weight->device() == x.device(),
                kOp, ": weight must be a contiguous float32 [", std::to_string(head_dim), "] tensor on x's device, got ",
                facm_ext::dims_str(weight->sizes()));
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, kOp,
              ": cos and sin must be float32 tables");
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), kOp, ": cos and sin must be on x's device");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == tokens &&
                  (cos.size(1) == head_dim || cos.size(1) == head_dim / 2),
              kOp, ": cos and sin must both be [L, D] or [L, D/2] with L = ", std::to_string(tokens), ", D = ",
              std::to_string(head_dim), "; got ", facm_ext::dims_str(cos.sizes()), " and ",
              facm_ext::dims_str(sin.sizes()));
  at::Tensor cos_c = cos, sin_c = sin;
  if (cos.stride(1) != 1 || sin.stride(1) != 1 || cos.stride(0) != sin.stride(0)) {
    cos_c = cos.contiguous();
    sin_c = sin.contiguous();
  }

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor tout = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {out, tout, rstd};

  at::Tensor keep_x, keep_tx;
  RmsNormRopeArgs args;
  args.batches = batches;
  args.heads = heads;
  args.tokens = tokens;
  args.head_dim = head_dim;
  args.dtype = dtype;
  args.x = operand_of(x, tokens_first, keep_x);
  if (tx.has_value()) args.tx = operand_of(*tx, tokens_first, keep_tx);
  args.out = out.data_ptr();
  args.tout = tout.data_ptr();
  strides_of(out, tokens_first, args.out_stride_b, args.out_stride_h, args.out_stride_l);
  args.rstd = rstd.data_ptr<float>();
  args.rstd_stride_b = rstd.stride(0);
  args.rstd_stride_h = tokens_first ? rstd.stride(2) : rstd.stride(1);
  args.rstd_stride_l = tokens_first ? rstd.stride(1) : rstd.stride(2);
  args.weight = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  args.eps = static_cast<float>(eps);
  args.cos = cos_c.data_ptr<float>();
  args.sin = sin_c.data_ptr<float>();
  args.table_row_stride = cos_c.size(0) > 1 ? cos_c.stride(0) : 0;
  args.per_pair = cos_c.size(1) != head_dim;
  args.interleaved = interleaved;
  const cudaError_t err = launch_rms_norm_rope_jvp(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, tout, rstd};
}

}  // namespace
}  // namespace facm_ext::rope

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def("rms_norm_rope_jvp_cuda(Tensor x, Tensor? tx, Tensor? weight, float eps, Tensor cos, Tensor sin, "
        "bool interleaved, str layout) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) {
  m.impl("rms_norm_rope_jvp_cuda", &facm_ext::rope::rms_norm_rope_jvp_cuda);
}
