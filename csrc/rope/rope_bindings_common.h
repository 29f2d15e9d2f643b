// Argument checks and operand setup shared by the RoPE-family torch ops (rope_jvp_bindings.cpp,
// rms_norm_rope_jvp_bindings.cpp): x, tx as [B, H, L, D] views in either layout, fp32 cos/sin tables. Host code only.
#pragma once

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/format.h"
#include "rope_jvp.h"

namespace facm_ext::rope {

inline DType kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": x has dtype ", std::string(c10::toString(t.scalar_type())),
                  "; the CUDA kernel takes float32, float16 or bfloat16");
  }
}

// (batch, head, position) strides of a 4-d tensor in the given layout.
inline void strides_of(const at::Tensor& t, bool tokens_first, int64_t& b, int64_t& h, int64_t& l) {
  b = t.stride(0);
  h = tokens_first ? t.stride(2) : t.stride(1);
  l = tokens_first ? t.stride(1) : t.stride(2);
}

// t as the kernels read it: in place when its channel stride is 1, else a contiguous copy (kept alive in `keep`).
inline Operand4 operand_of(const at::Tensor& t_in, bool tokens_first, at::Tensor& keep) {
  keep = (t_in.size(3) == 1 || t_in.stride(3) == 1) ? t_in : t_in.contiguous();
  Operand4 op;
  op.ptr = keep.data_ptr();
  strides_of(keep, tokens_first, op.stride_b, op.stride_h, op.stride_l);
  return op;
}

// Tensors a RopeArgs points into, kept alive until the launch.
struct RopeOperands {
  at::Tensor x, tx, cos, sin;
};

// Checks x, tx, the tables and the layout (TORCH_CHECK messages prefixed with `op`) and fills `args` but for its
// outputs (see set_outputs). Returns whether x is in [B, L, H, D] order (layout "BLHD").
inline bool prepare_rope_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& tx,
                              const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                              c10::string_view layout, RopeArgs& args, RopeOperands& keep) {
  TORCH_CHECK(layout == "BHLD" || layout == "BLHD", op, ": layout must be 'BHLD' or 'BLHD', got '",
              std::string(layout), "'");
  const bool tokens_first = layout == "BLHD";
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, op, ": x must be a 4-d CUDA tensor, got ", facm_ext::dims_str(x.sizes()));
  args.dtype = kernel_dtype(x, op);
  args.batches = x.size(0);
  args.heads = tokens_first ? x.size(2) : x.size(1);
  args.tokens = tokens_first ? x.size(1) : x.size(2);
  args.head_dim = x.size(3);
  TORCH_CHECK(args.head_dim % 2 == 0, op, ": head_dim (x's last dim) must be even, got ",
              std::to_string(args.head_dim));
  if (tx.has_value()) {
    TORCH_CHECK(tx->sizes() == x.sizes() && tx->scalar_type() == x.scalar_type() && tx->device() == x.device(), op,
                ": tx must match x's shape, dtype and device");
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, op,
              ": cos and sin must be float32 tables");
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), op, ": cos and sin must be on x's device");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == args.tokens &&
                  (cos.size(1) == args.head_dim || cos.size(1) == args.head_dim / 2),
              op, ": cos and sin must both be [L, D] or [L, D/2] with L = ", std::to_string(args.tokens), ", D = ",
              std::to_string(args.head_dim), "; got ", facm_ext::dims_str(cos.sizes()), " and ",
              facm_ext::dims_str(sin.sizes()));
  keep.cos = cos;
  keep.sin = sin;
  if (cos.stride(1) != 1 || sin.stride(1) != 1 || cos.stride(0) != sin.stride(0)) {
    keep.cos = cos.contiguous();
    keep.sin = sin.contiguous();
  }
  if (x.numel() > 0) {
    args.x = operand_of(x, tokens_first, keep.x);
    if (tx.has_value()) args.tx = operand_of(*tx, tokens_first, keep.tx);
  }
  args.cos = keep.cos.data_ptr<float>();
  args.sin = keep.sin.data_ptr<float>();
  args.table_row_stride = keep.cos.size(0) > 1 ? keep.cos.stride(0) : 0;
  args.per_pair = keep.cos.size(1) != args.head_dim;
  args.interleaved = interleaved;
  return tokens_first;
}

// The outputs of a RopeArgs: out, tout of x's shape, in the layout's (batch, head, position) strides.
inline void set_outputs(RopeArgs& args, const at::Tensor& out, const at::Tensor& tout, bool tokens_first) {
  args.out = out.data_ptr();
  args.tout = tout.data_ptr();
  strides_of(out, tokens_first, args.out_stride_b, args.out_stride_h, args.out_stride_l);
}

}  // namespace facm_ext::rope
