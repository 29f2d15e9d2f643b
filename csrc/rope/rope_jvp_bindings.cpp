// Schema and CUDA implementation of facm_ext::rope_jvp_cuda (see rope_jvp.h). The Python op
// (facm_ext/ops/rope.py) validates arguments, converts the tables to fp32 and calls this; its fake implementation
// is registered from Python. x may be any strided view with a unit channel stride (else it is copied contiguous);
// outputs are contiguous in x's logical layout.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rope_jvp.h"
#include "common/format.h"

namespace facm_ext::rope {
namespace {

constexpr const char* kOp = "rope_jvp_cuda";

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, kOp, ": ", name, " has dtype ", t.scalar_type(),
                  "; the CUDA kernel takes float32, float16 or bfloat16");
  }
}

// Strides of a 4-d tensor in (batch, head, position) order for the given layout.
Operand4 operand_of(const at::Tensor& t_in, bool tokens_first, at::Tensor& keep) {
  at::Tensor t = (t_in.size(3) == 1 || t_in.stride(3) == 1) ? t_in : t_in.contiguous();
  keep = t;
  Operand4 op;
  op.ptr = t.data_ptr();
  op.stride_b = t.stride(0);
  op.stride_h = tokens_first ? t.stride(2) : t.stride(1);
  op.stride_l = tokens_first ? t.stride(1) : t.stride(2);
  return op;
}

std::tuple<at::Tensor, at::Tensor> rope_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx,
                                                 const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                                                 c10::string_view layout) {
  TORCH_CHECK(layout == "BHLD" || layout == "BLHD", kOp, ": layout must be 'BHLD' or 'BLHD', got '", layout, "'");
  const bool tokens_first = layout == "BLHD";
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, kOp, ": x must be a 4-d CUDA tensor, got ", facm_ext::dims_str(x.sizes()), " on ",
              x.device());
  const DType dtype = kernel_dtype(x, "x");
  const int64_t batches = x.size(0), heads = tokens_first ? x.size(2) : x.size(1);
  const int64_t tokens = tokens_first ? x.size(1) : x.size(2), head_dim = x.size(3);
  TORCH_CHECK(head_dim % 2 == 0, kOp, ": head_dim (x's last dim) must be even, got ", std::to_string(head_dim));
  if (tx.has_value()) {
    TORCH_CHECK(tx->sizes() == x.sizes() && tx->scalar_type() == x.scalar_type() && tx->device() == x.device(), kOp,
                ": tx must match x's shape, dtype and device");
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, kOp,
              ": cos and sin must be float32 tables");
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), kOp, ": cos and sin must be on ",
              x.device());
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == tokens &&
                  (cos.size(1) == head_dim || cos.size(1) == head_dim / 2),
              kOp, ": cos and sin must both be [L, D] or [L, D/2] with L = ", std::to_string(tokens), ", D = ",
              std::to_string(head_dim), "; got ",
              facm_ext::dims_str(cos.sizes()), " and ", facm_ext::dims_str(sin.sizes()));
  at::Tensor cos_c = cos, sin_c = sin;
  if (cos.stride(1) != 1 || sin.stride(1) != 1 || cos.stride(0) != sin.stride(0)) {
    cos_c = cos.contiguous();
    sin_c = sin.contiguous();
  }

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor tout = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {out, tout};

  at::Tensor keep_x, keep_tx;
  RopeArgs args;
  args.batches = batches;
  args.heads = heads;
  args.tokens = tokens;
  args.head_dim = head_dim;
  args.dtype = dtype;
  args.x = operand_of(x, tokens_first, keep_x);
  if (tx.has_value()) args.tx = operand_of(*tx, tokens_first, keep_tx);
  args.out = out.data_ptr();
  args.tout = tout.data_ptr();
  args.out_stride_b = out.stride(0);
  args.out_stride_h = tokens_first ? out.stride(2) : out.stride(1);
  args.out_stride_l = tokens_first ? out.stride(1) : out.stride(2);
  args.cos = cos_c.data_ptr<float>();
  args.sin = sin_c.data_ptr<float>();
  args.table_row_stride = cos_c.size(0) > 1 ? cos_c.stride(0) : 0;
  args.per_pair = cos_c.size(1) != head_dim;
  args.interleaved = interleaved;
  const cudaError_t err = launch_rope_jvp(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, tout};
}

}  // namespace
}  // namespace facm_ext::rope

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def("rope_jvp_cuda(Tensor x, Tensor? tx, Tensor cos, Tensor sin, bool interleaved, str layout) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) { m.impl("rope_jvp_cuda", &facm_ext::rope::rope_jvp_cuda); }
