// Fused RMSNorm + RoPE JVP (see rms_norm_rope_jvp.h for the math). One warp per row: lane j holds the pairs
// j, j + 32, ... of its row in registers (kPairs per lane, D <= 256), so the row is read once, reduced with warp
// shuffles, normalized, scaled and rotated, and written once, primal and tangent together. Interleaved pairs are
// read and written as one vector each where aligned (a warp's stores then cover whole contiguous sectors). Pairs are the two
// channels a rotation mixes: (2p, 2p + 1) interleaved or (p, p + D/2) half-split. Rows are visited heads-fastest
// ((b, l, h) order), so the warps of a block share one position's table row.
#include "rms_norm_rope_jvp.h"

#include <algorithm>

#include "../pointwise/vec_io.cuh"

namespace facm_ext::rope {
namespace {

using vec_io::from_f32;
using vec_io::to_f32;

constexpr int kWarps = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// The two members of an interleaved pair (channels 2p, 2p + 1) as one 4-byte (16-bit T) or 8-byte (fp32) access.
template <typename T>
struct alignas(2 * sizeof(T)) PairVec {
  T v[2];
};

template <bool kPairVec, typename T>
__device__ __forceinline__ void load_pair(const T* row, int64_t c0, int64_t second, float& first, float& other) {
  if constexpr (kPairVec) {
    const PairVec<T> pv = *reinterpret_cast<const PairVec<T>*>(row + c0);
    first = to_f32(pv.v[0]);
    other = to_f32(pv.v[1]);
  } else {
    first = to_f32(row[c0]);
    other = to_f32(row[c0 + second]);
  }
}

template <bool kPairVec, typename T>
__device__ __forceinline__ void store_pair(T* row, int64_t c0, int64_t second, float first, float other) {
  if constexpr (kPairVec) {
    PairVec<T> pv;
    pv.v[0] = from_f32<T>(first);
    pv.v[1] = from_f32<T>(other);
    *reinterpret_cast<PairVec<T>*>(row + c0) = pv;
  } else {
    row[c0] = from_f32<T>(first);
    row[c0 + second] = from_f32<T>(other);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// kPairVec: interleaved pairs read and written as one vector each (the host checks the alignment); else element by
// element, which also serves half-split pairs (each member's accesses are contiguous across the warp there).
template <typename T, int kPairs, bool kPairVec>
__global__ void __launch_bounds__(kWarps * 32) rms_norm_rope_jvp_kernel(RmsNormRopeArgs n) {
  const RopeArgs& a = n.rope;
  const int lane = threadIdx.x & 31;
  const int64_t pairs = a.head_dim / 2;
  const int64_t rows = a.batches * a.tokens * a.heads;
  const int64_t second = a.interleaved ? 1 : pairs;  // channel offset of a pair's second member
  const float inv_dim = 1.0f / static_cast<float>(a.head_dim);
  const bool has_tangent = a.tx.ptr != nullptr;
  const T* x = static_cast<const T*>(a.x.ptr);
  const T* tx = static_cast<const T*>(a.tx.ptr);
  T* out = static_cast<T*>(a.out);
  T* tout = static_cast<T*>(a.tout);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t h = row % a.heads;
    const int64_t bl = row / a.heads;
    const int64_t l = bl % a.tokens;
    const int64_t b = bl / a.tokens;
    const T* x_row = x + b * a.x.stride_b + h * a.x.stride_h + l * a.x.stride_l;
    const T* tx_row = has_tangent ? tx + b * a.tx.stride_b + h * a.tx.stride_h + l * a.tx.stride_l : nullptr;

    float x0[kPairs], x1[kPairs], t0[kPairs], t1[kPairs];
    float sum_xx = 0.0f, sum_xt = 0.0f;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const int64_t p = lane + 32 * i;
      x0[i] = x1[i] = t0[i] = t1[i] = 0.0f;
      if (p < pairs) {
        const int64_t c0 = a.interleaved ? 2 * p : p;
        load_pair<kPairVec>(x_row, c0, second, x0[i], x1[i]);
        if (has_tangent) load_pair<kPairVec>(tx_row, c0, second, t0[i], t1[i]);
      }
      sum_xx += x0[i] * x0[i] + x1[i] * x1[i];
      sum_xt += x0[i] * t0[i] + x1[i] * t1[i];
    }
    sum_xx = warp_sum(sum_xx);
    if (has_tangent) sum_xt = warp_sum(sum_xt);
    const float r = rsqrtf(sum_xx * inv_dim + n.eps);
    const float dr = -r * r * r * (sum_xt * inv_dim);  // r' = -r^3 mean(x x')
    if (n.rstd != nullptr && lane == 0) {
      n.rstd[b * n.rstd_stride_b + h * n.rstd_stride_h + l * n.rstd_stride_l] = r;
    }

    const float* cos_row = a.cos + l * a.table_row_stride;
    const float* sin_row = a.sin + l * a.table_row_stride;
    T* o_row = out + b * a.out_stride_b + h * a.out_stride_h + l * a.out_stride_l;
    T* to_row = tout + b * a.out_stride_b + h * a.out_stride_h + l * a.out_stride_l;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const int64_t p = lane + 32 * i;
      if (p >= pairs) continue;
      const int64_t c0 = a.interleaved ? 2 * p : p;
      const int64_t c1 = c0 + second;
      // Per-pair tables hold one angle per pair (index p); per-channel tables one per channel.
      const int64_t k0 = a.per_pair ? p : c0;
      const int64_t k1 = a.per_pair ? p : c1;
      const float cos0 = __ldg(cos_row + k0), cos1 = __ldg(cos_row + k1);
      const float sin0 = __ldg(sin_row + k0), sin1 = __ldg(sin_row + k1);
      const float w0 = n.weight != nullptr ? __ldg(n.weight + c0) : 1.0f;
      const float w1 = n.weight != nullptr ? __ldg(n.weight + c1) : 1.0f;
      const float a0 = x0[i] * r * w0, a1 = x1[i] * r * w1;
      store_pair<kPairVec>(o_row, c0, second, a0 * cos0 - a1 * sin0, a1 * cos1 + a0 * sin1);
      const float ta0 = (t0[i] * r + x0[i] * dr) * w0, ta1 = (t1[i] * r + x1[i] * dr) * w1;
      store_pair<kPairVec>(to_row, c0, second, ta0 * cos0 - ta1 * sin0, ta1 * cos1 + ta0 * sin1);
    }
  }
}

// Whether an operand's pairs (2p, 2p + 1) start on PairVec boundaries: pointer and every stride aligned.
bool pair_aligned(const void* ptr, int64_t stride_b, int64_t stride_h, int64_t stride_l, int elem_bytes) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % (2 * elem_bytes) == 0 && stride_b % 2 == 0 &&
                            stride_h % 2 == 0 && stride_l % 2 == 0);
}

template <typename T, bool kPairVec>
void launch_pairs(const RmsNormRopeArgs& n, dim3 grid, int64_t pairs_per_lane, cudaStream_t stream) {
  switch (pairs_per_lane) {
    case 1: rms_norm_rope_jvp_kernel<T, 1, kPairVec><<<grid, kWarps * 32, 0, stream>>>(n); break;
    case 2: rms_norm_rope_jvp_kernel<T, 2, kPairVec><<<grid, kWarps * 32, 0, stream>>>(n); break;
    case 3: rms_norm_rope_jvp_kernel<T, 3, kPairVec><<<grid, kWarps * 32, 0, stream>>>(n); break;
    default: rms_norm_rope_jvp_kernel<T, 4, kPairVec><<<grid, kWarps * 32, 0, stream>>>(n); break;
  }
}

template <typename T>
cudaError_t launch_typed(const RmsNormRopeArgs& n, cudaStream_t stream) {
  const RopeArgs& a = n.rope;
  const int64_t rows = a.batches * a.heads * a.tokens;
  if (rows <= 0) return cudaSuccess;
  // Enough blocks to fill the card several times over; the kernel loops over the remaining rows.
  const int64_t blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, int64_t{1} << 20);
  const int64_t pairs_per_lane = (a.head_dim / 2 + 31) / 32;
  if (pairs_per_lane < 1 || pairs_per_lane > 4) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks));
  constexpr int kBytes = static_cast<int>(sizeof(T));
  const bool pair_vectors = a.interleaved &&
                            pair_aligned(a.x.ptr, a.x.stride_b, a.x.stride_h, a.x.stride_l, kBytes) &&
                            pair_aligned(a.tx.ptr, a.tx.stride_b, a.tx.stride_h, a.tx.stride_l, kBytes) &&
                            pair_aligned(a.out, a.out_stride_b, a.out_stride_h, a.out_stride_l, kBytes) &&
                            pair_aligned(a.tout, a.out_stride_b, a.out_stride_h, a.out_stride_l, kBytes);
  if (pair_vectors) {
    launch_pairs<T, true>(n, grid, pairs_per_lane, stream);
  } else {
    launch_pairs<T, false>(n, grid, pairs_per_lane, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rms_norm_rope_jvp(const RmsNormRopeArgs& args, cudaStream_t stream) {
  const int64_t head_dim = args.rope.head_dim;
  if (head_dim < 2 || head_dim % 2 != 0 || head_dim > kRmsNormRopeMaxHeadDim) return cudaErrorInvalidValue;
  switch (args.rope.dtype) {
    case DType::kFloat32: return launch_typed<float>(args, stream);
    case DType::kFloat16: return launch_typed<__half>(args, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace facm_ext::rope
