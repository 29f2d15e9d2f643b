// Launch interface of the RoPE JVP kernel (rope_jvp.cu), shared with rope_jvp_bindings.cpp.
//
// x, tx: a [B, H, L, D] view (either memory layout: the bindings pass the strides of a [B, L, H, D] tensor in this
// order) with unit channel stride. Tables cos, sin: fp32 [L, D] (per channel) or [L, D/2] (per pair), unit
// channel stride, row stride `table_row_stride`. Output: the given element strides (b, h, l), unit channel stride.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../common/operand4.h"
#include "../pointwise/pointwise_jvp.h"

namespace facm_ext::rope {

using pointwise::DType;

struct RopeArgs {
  int64_t batches = 0, heads = 0, tokens = 0, head_dim = 0;
  DType dtype = DType::kFloat32;  // x, tx, out, tout
  Operand4 x, tx;
  void* out = nullptr;
  void* tout = nullptr;
  int64_t out_stride_b = 0, out_stride_h = 0, out_stride_l = 0;
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t table_row_stride = 0;
  bool per_pair = false;     // tables [L, D/2] instead of [L, D]
  bool interleaved = true;   // pairs (2i, 2i+1); else (j, j + D/2)
};

cudaError_t launch_rope_jvp(const RopeArgs& args, cudaStream_t stream);

}  // namespace facm_ext::rope
