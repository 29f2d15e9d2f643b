// Launch interface of the pointwise JVP kernels (pointwise_jvp.cu), shared with their bindings
// (pointwise_jvp_bindings.cpp). Plain structs and raw pointers only, so the .cu needs no torch headers.
//
// Every operand is seen as a [batches, tokens, channels] view with unit channel stride and element strides
// (stride_b, stride_t) for the other two dims; a stride may be 0 (broadcast, e.g. a [B, 1, C] gate). Outputs are
// contiguous [batches, tokens, channels]. A null tangent pointer means a zero tangent: its reads are skipped.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace facm_ext::pointwise {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Operand {
  const void* ptr = nullptr;  // element [0, 0, 0]; null for an absent (zero) tangent
  int64_t stride_b = 0;       // elements between consecutive batches
  int64_t stride_t = 0;       // elements between consecutive tokens
  DType dtype = DType::kFloat32;
};

struct Shape3 {
  int64_t batches = 0, tokens = 0, channels = 0;
};

// y = gelu(x), ty = gelu'(x) tx. out, tout: contiguous, x's dtype.
cudaError_t launch_gelu_jvp(Shape3 shape, Operand x, Operand tx, void* out, void* tout, bool tanh_form,
                            cudaStream_t stream);
// y = silu(x), ty = silu'(x) tx.
cudaError_t launch_silu_jvp(Shape3 shape, Operand x, Operand tx, void* out, void* tout, cudaStream_t stream);
// h = silu(a) b, th = silu'(a) ta b + silu(a) tb. a, b (and their tangents) share one dtype.
cudaError_t launch_swiglu_jvp(Shape3 shape, Operand a, Operand ta, Operand b, Operand tb, void* out, void* tout,
                              cudaStream_t stream);
// h = x + g y, th = tx + tg y + g ty. Output in x's dtype. Supported (x, gate, y) dtypes: see
// gated_residual_supported(); tangents have their primal's dtype.
cudaError_t launch_gated_residual_jvp(Shape3 shape, Operand x, Operand tx, Operand gate, Operand tgate, Operand y,
                                      Operand ty, void* out, void* tout, cudaStream_t stream);
bool gated_residual_supported(DType x, DType gate, DType y);

}  // namespace facm_ext::pointwise
