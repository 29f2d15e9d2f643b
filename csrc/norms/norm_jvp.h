// Fused forward-mode JVP of norm (none | LayerNorm | RMSNorm over the last dim) + optional affine + optional adaLN
// modulation, primal and tangent in one pass over each row. Plain C++/CUDA interface: no torch types, so the .cu
// file stays on light headers. The torch op wrapper is norm_jvp_bindings.cpp.
//
//   n  = norm(x)                        (layer: (x - mu) r;  rms: x r;  none: x)
//   n' = r (x' - mean(x') - n mean(n x'))  (layer)     r (x' - n mean(n x'))  (rms)     x'  (none)
//   a  = n w + b,   a' = n' w           (w, b: fp32 [C], absent = 1 / 0)
//   y  = a (1 + scale) + shift,   y' = a' (1 + scale) + a scale' + shift'
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace facm_ext::norms {

enum class NormKind : int { kNone = 0, kLayer = 1, kRms = 2 };
enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A [B, L, C] operand whose element (b, l, c) lives at data + b * stride_b + l * stride_l + c (strides in elements;
// the channel dim is contiguous). stride 0 broadcasts ([B, C] modulation: stride_l = 0). data == nullptr: absent,
// i.e. zero (a None tangent, no shift).
struct Operand3d {
  const void* data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_l = 0;
};

struct NormJvpParams {
  int64_t batch = 0, length = 0, channels = 0;
  ElemType x_type = ElemType::kFloat32;    // dtype of x and tx
  ElemType y_type = ElemType::kFloat32;    // dtype of y and ty: x_type, or 16-bit for fp32 x (narrow_output_supported)
  ElemType mod_type = ElemType::kFloat32;  // dtype of shift, tshift, scale, tscale: x_type or kFloat32
  NormKind norm = NormKind::kNone;
  float eps = 1e-6f;
  Operand3d x, tx, shift, tshift, scale, tscale;
  const float* weight = nullptr;  // [C] fp32 contiguous, or nullptr
  const float* bias = nullptr;    // [C] fp32 contiguous, or nullptr
  void* y = nullptr;              // [B, L, C] contiguous, y_type
  void* ty = nullptr;             // [B, L, C] contiguous, y_type
  float* mean = nullptr;          // [B * L] (layer norm) or nullptr
  float* rstd = nullptr;          // [B * L] (layer / rms norm) or nullptr
};

// True when every row start, stride and pointer allows 16-byte vector loads and C is a multiple of the vector width.
bool can_vectorize(const NormJvpParams& p);

// Largest C the kernels handle for these parameters (register-resident rows); larger rows must use another path.
int64_t max_channels(const NormJvpParams& p);

// Whether the kernel writes y, ty in a 16-bit y_type for fp32 x with these parameters (rows staged in shared
// memory, the fp32 x of fp32-parameter models under autocast); elsewhere y_type must equal x_type. y and ty need not
// be set yet (allocations are 16-byte aligned).
bool narrow_output_supported(const NormJvpParams& p);

// Launches the kernel on `stream`; returns the launch's cudaError_t (cudaSuccess when nothing to do).
cudaError_t launch_norm_jvp(const NormJvpParams& p, cudaStream_t stream);

}  // namespace facm_ext::norms
