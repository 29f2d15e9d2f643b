// Schema and CUDA implementation of facm_ext::attention_jvp_cuda (see attention_jvp.h). The Python op
// (facm_ext/ops/attention.py) validates arguments and picks this kernel; its fake implementation is that op's.
// Operands may be any [B, H, L, D] views with unit channel stride, 16-byte aligned rows and element strides that
// are multiples of 8; any other operand is copied to a fresh contiguous tensor first.
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/kernel_ops.h"
#include "attention_jvp.h"
#include "common/format.h"

namespace facm_ext::attention {
namespace {

constexpr const char* kOp = "attention_jvp_cuda";

bool kernel_ready(const at::Tensor& t) {
  const auto address = reinterpret_cast<uintptr_t>(t.data_ptr());
  return t.stride(3) == 1 && address % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

Operand4 operand_of(const at::Tensor& t, at::Tensor& keep) {
  keep = kernel_ready(t) ? t : t.clone(at::MemoryFormat::Contiguous);
  return {keep.data_ptr(), keep.stride(0), keep.stride(1), keep.stride(2)};
}

void check_operand(const char* name, const at::Tensor& t, const at::Tensor& q, int64_t len) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == len &&
                  t.size(3) == q.size(3),
              kOp, ": ", name, " must be [B, H, L, D] = [", std::to_string(q.size(0)), ", ", std::to_string(q.size(1)),
              ", ", std::to_string(len), ", ", std::to_string(q.size(3)), "], got ", facm_ext::dims_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(), kOp, ": ", name,
              " must have q's dtype and device");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jvp_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tq,
    const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv,
    const std::optional<at::Tensor>& key_lengths, double scale) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4, kOp, ": q must be a 4-d CUDA tensor, got ", facm_ext::dims_str(q.sizes()),
              " on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp, ": q has dtype ",
              q.scalar_type(), "; the CUDA kernel takes float16 or bfloat16");
  TORCH_CHECK(attention_jvp_head_dim_supported(q.size(3)), kOp, ": head_dim ", std::to_string(q.size(3)),
              " has no CUDA kernel (64, 72, 80, 96)");
  TORCH_CHECK(tq.has_value() || tk.has_value(), kOp, ": needs tq or tk (the score tangent); without both the op "
              "runs the Triton kernel");
  const int64_t len_k = k.size(2);
  check_operand("k", k, q, len_k);
  check_operand("v", v, q, len_k);
  if (tq.has_value()) check_operand("tq", *tq, q, q.size(2));
  if (tk.has_value()) check_operand("tk", *tk, q, len_k);
  if (tv.has_value()) check_operand("tv", *tv, q, len_k);
  if (key_lengths.has_value()) {
    TORCH_CHECK(key_lengths->dim() == 1 && key_lengths->size(0) == q.size(0) &&
                    (key_lengths->scalar_type() == at::kInt || key_lengths->scalar_type() == at::kLong) &&
                    key_lengths->device() == q.device(),
                kOp, ": key_lengths must be an int32/int64 [B] tensor on q's device");
  }

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor to = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {o, to, lse};

  at::Tensor keep[7];
  AttentionJvpArgs args;
  args.batches = q.size(0);
  args.heads = q.size(1);
  args.len_q = q.size(2);
  args.len_k = len_k;
  args.head_dim = q.size(3);
  args.dtype = q.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  args.q = operand_of(q, keep[0]);
  args.k = operand_of(k, keep[1]);
  args.v = operand_of(v, keep[2]);
  if (tq.has_value()) args.tq = operand_of(*tq, keep[3]);
  if (tk.has_value()) args.tk = operand_of(*tk, keep[4]);
  if (tv.has_value()) args.tv = operand_of(*tv, keep[5]);
  if (key_lengths.has_value()) {
    keep[6] = key_lengths->contiguous();
    args.key_lengths = keep[6].data_ptr();
    args.key_lengths_int64 = keep[6].scalar_type() == at::kLong;
  }
  args.o = o.data_ptr();
  args.to = to.data_ptr();
  args.lse = lse.data_ptr<float>();
  args.scale = static_cast<float>(scale);
  const cudaError_t err = launch_attention_jvp(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return {o, to, lse};
}

}  // namespace facm_ext::attention

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def("attention_jvp_cuda(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv, Tensor? key_lengths, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) {
  m.impl("attention_jvp_cuda", &facm_ext::attention::attention_jvp_cuda);
}
