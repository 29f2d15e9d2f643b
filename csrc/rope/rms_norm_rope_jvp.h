// Launch interface of the fused RMSNorm + RoPE JVP kernel (rms_norm_rope_jvp.cu), shared with its bindings.
//
// Per row x (the D channels of one (batch, head, position)):
//   r = rsqrt(mean(x^2) + eps),  s = mean(x x')
//   a  = x r w,                  a' = (r x' - x r^3 s) w        (w: fp32 [D], absent = 1)
//   out = R(l) a,                out' = R(l) a'                 (the rotation of rope_jvp.h)
// The qk-norm -> RoPE step of an attention layer in one pass, with the norm's fp32 result rotated before the one
// rounding to x's dtype. x, tx: a [B, H, L, D] view (strides in (batch, head, position) order) with unit channel
// stride; outputs at the given element strides, unit channel stride; rstd: fp32, one per row, (b, h, l) strides.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "rope_jvp.h"

namespace facm_ext::rope {

struct RmsNormRopeArgs {
  RopeArgs rope;          // x, tx, outputs, tables and pair convention, as for rope_jvp
  float* rstd = nullptr;  // [rows] fp32 at (b, h, l) strides below, or nullptr
  int64_t rstd_stride_b = 0, rstd_stride_h = 0, rstd_stride_l = 0;
  const float* weight = nullptr;  // [D] fp32 contiguous, or nullptr
  float eps = 1e-6f;
};

// Largest head_dim the kernel takes (pairs held in registers, one warp per row).
constexpr int64_t kRmsNormRopeMaxHeadDim = 256;

cudaError_t launch_rms_norm_rope_jvp(const RmsNormRopeArgs& args, cudaStream_t stream);

}  // namespace facm_ext::rope
