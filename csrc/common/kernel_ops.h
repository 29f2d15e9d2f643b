// The tensor-level entry points of the CUDA kernel ops, for host code that chains several kernels in one op
// (csrc/blocks). Each is the implementation registered as torch.ops.facm_ext.<name>: it checks its arguments,
// allocates its outputs and launches on the current stream. Defined in the families' *_bindings.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace facm_ext {

namespace norms {
// -> (y, ty, mean, rstd); norm: 0 none, 1 layer, 2 rms.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_jvp_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& tx, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& tshift, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& tscale, int64_t norm, double eps, std::optional<at::ScalarType> out_dtype);
}  // namespace norms

namespace pointwise {
std::tuple<at::Tensor, at::Tensor> gelu_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx,
                                                 c10::string_view approximate);
std::tuple<at::Tensor, at::Tensor> silu_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx);
std::tuple<at::Tensor, at::Tensor> swiglu_jvp_cuda(const at::Tensor& a, const std::optional<at::Tensor>& ta,
                                                   const at::Tensor& b, const std::optional<at::Tensor>& tb);
std::tuple<at::Tensor, at::Tensor> gated_residual_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx,
                                                           const at::Tensor& gate,
                                                           const std::optional<at::Tensor>& tgate, const at::Tensor& y,
                                                           const std::optional<at::Tensor>& ty);
}  // namespace pointwise

namespace rope {
// -> (out, tout, rstd); layout "BHLD" or "BLHD".
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_jvp_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& tx, const std::optional<at::Tensor>& weight, double eps,
    const at::Tensor& cos, const at::Tensor& sin, bool interleaved, c10::string_view layout);
}  // namespace rope

namespace attention {
// q, k, v and tangents [B, H, L, D] -> (o, to [B, H, Lq, D] contiguous, lse [B, H, Lq] fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_jvp_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tq,
    const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv,
    const std::optional<at::Tensor>& key_lengths, double scale);
}  // namespace attention

}  // namespace facm_ext
