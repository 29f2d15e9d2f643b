// A [B, H, L, D] operand as the kernels see it: a data pointer and element strides along (batch, head, position),
// the channel stride being 1. Plain struct (no torch headers), shared by the RoPE and attention launch interfaces.
#pragma once

#include <cstdint>

namespace facm_ext {

struct Operand4 {
  const void* ptr = nullptr;  // null: an absent (zero) tangent
  int64_t stride_b = 0, stride_h = 0, stride_l = 0;
};

}  // namespace facm_ext
