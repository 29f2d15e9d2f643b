// Launch interface of the CUDA C++ attention JVP forward (attention_jvp.cu), shared with
// attention_jvp_bindings.cpp. Plain structs and raw pointers only, so the .cu needs no torch headers.
//
// Operands are [B, H, L, D] views with unit channel stride; every pointer 16-byte aligned and every element stride
// a multiple of 8 (16-byte rows; the bindings copy an operand that is not). Outputs o, to: contiguous [B, H, Lq, D]
// in the operands' dtype; lse: contiguous [B, H, Lq] fp32 (natural log, -inf for a row without keys).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../common/operand4.h"
#include "../pointwise/pointwise_jvp.h"

namespace facm_ext::attention {

using pointwise::DType;

struct AttentionJvpArgs {
  int64_t batches = 0, heads = 0, len_q = 0, len_k = 0, head_dim = 0;
  DType dtype = DType::kBFloat16;  // kFloat16 or kBFloat16
  Operand4 q, k, v, tq, tk, tv;    // tq or tk must be present (the score tangent); tv may be absent
  void* o = nullptr;
  void* to = nullptr;
  float* lse = nullptr;
  const void* key_lengths = nullptr;  // optional [B]; keys at positions >= key_lengths[b] are masked
  bool key_lengths_int64 = false;
  float scale = 1.0f;
};

// Head dims with a compiled kernel (64, 72, 80, 96).
bool attention_jvp_head_dim_supported(int64_t head_dim);

cudaError_t launch_attention_jvp(const AttentionJvpArgs& args, cudaStream_t stream);

}  // namespace facm_ext::attention
