// One templated kernel family for norm (none / layer / rms) x modulation (none / [B, C] / per-token strided) x
// tangent presence. Rows live in registers: each row is handled by a group of `tpr` threads (4..32 lanes of one
// warp for short rows such as qk-norm's 72 channels, or a whole block of up to 512 threads for 1152 / 5120
// channels), each thread holding ITEMS vectors of VEC elements of x and x'. One read of every input, one write
// of every output. Reductions are in fp32 with a fixed order (deterministic).
#include "norm_jvp.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace facm_ext::norms {
namespace {

constexpr int kMaxThreads = 512;           // threads of one row group at most (block-per-row mode)
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kSubWarpBlock = 128;         // block size when several rows share a block (tpr <= 32)
constexpr int kMaxItemsVector = 4;
constexpr int kMaxItemsScalar = 16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements of U starting at p, as floats, in the widest loads (up to 16 bytes) the size allows.
// p must be aligned to min(16, VEC * sizeof(U)) bytes (the host checks alignment before choosing the vector path).
template <typename U, int VEC>
__device__ __forceinline__ void load_vec(const U* p, float (&out)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(U));
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else if constexpr (kBytes >= 16) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(U));
    static_assert(VEC % kPer == 0, "vector loads are whole 16-byte chunks");
#pragma unroll
    for (int c = 0; c < VEC / kPer; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + c * kPer);
      const U* v = reinterpret_cast<const U*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[c * kPer + j] = to_float(v[j]);
    }
  } else {
    static_assert(kBytes == 8 || kBytes == 4, "8- or 4-byte vector");
    using Word = std::conditional_t<kBytes == 8, uint2, unsigned int>;
    const Word raw = *reinterpret_cast<const Word*>(p);
    const U* v = reinterpret_cast<const U*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(v[j]);
  }
}

// The modulation tensors are either x's dtype or fp32 (runtime, uniform across the grid).
template <typename T, int VEC>
__device__ __forceinline__ void load_mod(const Operand3d& op, bool mod_f32, int64_t b, int64_t l, int64_t e,
                                         float (&out)[VEC]) {
  if (op.data == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = 0.f;
    return;
  }
  const int64_t off = b * op.stride_b + l * op.stride_l + e;
  if (mod_f32) {
    load_vec<float, VEC>(static_cast<const float*>(op.data) + off, out);
  } else {
    load_vec<T, VEC>(static_cast<const T*>(op.data) + off, out);
  }
}

// Raw register storage of one vector of x or x' (packed: 16 bytes, or one element on the scalar path).
template <typename T, int VEC>
using Raw = std::conditional_t<VEC == 1, T, uint4>;

template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> raw_zero() {
  if constexpr (VEC == 1) {
    return from_float<T>(0.f);
  } else {
    return make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Raw<T, VEC>& raw, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(raw);
  } else {
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(v[j]);
  }
}

// Sum of N values over the tpr threads of a row group; every thread of the group gets the sums. tpr is a power of
// two <= 32 (groups inside one warp) or a multiple of 32 equal to blockDim.x (one row per block). `scratch` holds
// kMaxWarps * N floats and must not be reused by another reduction in the same kernel.
template <int N>
__device__ __forceinline__ void row_allreduce(float (&v)[N], int tpr, float* scratch) {
  const int width = tpr < 32 ? tpr : 32;
  for (int offset = width / 2; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  if (tpr > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) scratch[warp * N + k] = v[k];
    }
    __syncthreads();
    const int warps = tpr / 32;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float s = 0.f;
      for (int w = 0; w < warps; ++w) s += scratch[w * N + k];
      v[k] = s;
    }
  }
}

template <typename T, int NORM, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads) norm_jvp_kernel(const NormJvpParams p, const int tpr) {
  __shared__ float scratch_first[kMaxWarps * 2];
  __shared__ float scratch_second[kMaxWarps * 2];

  const int rows_per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t rows = p.batch * p.length;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr;
  // Threads of a row past the end still take part in the shuffles and barriers; they load and store nothing.
  const bool row_ok = row < rows;
  const int64_t b = row_ok ? row / p.length : 0;
  const int64_t l = row_ok ? row % p.length : 0;
  const int64_t C = p.channels;
  const bool has_tx = p.tx.data != nullptr;
  const bool mod_f32 = p.mod_type == ElemType::kFloat32;

  const T* x_row = static_cast<const T*>(p.x.data) + b * p.x.stride_b + l * p.x.stride_l;
  const T* tx_row = has_tx ? static_cast<const T*>(p.tx.data) + b * p.tx.stride_b + l * p.tx.stride_l : nullptr;

  Raw<T, VEC> x_raw[ITEMS], tx_raw[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t e = (static_cast<int64_t>(i) * tpr + lane) * VEC;
    const bool ok = row_ok && e < C;
    x_raw[i] = ok ? *reinterpret_cast<const Raw<T, VEC>*>(x_row + e) : raw_zero<T, VEC>();
    tx_raw[i] = (ok && has_tx) ? *reinterpret_cast<const Raw<T, VEC>*>(tx_row + e) : raw_zero<T, VEC>();
  }

  const float inv_c = 1.f / static_cast<float>(C);
  float mean = 0.f, rstd = 1.f, tx_mean = 0.f, ntx_mean = 0.f;  // ntx_mean = mean(n * x')
  if constexpr (NORM == static_cast<int>(NormKind::kLayer)) {
    float sums[2] = {0.f, 0.f};  // sum x, sum x'
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      float xv[VEC], tv[VEC];
      unpack<T, VEC>(x_raw[i], xv);
      unpack<T, VEC>(tx_raw[i], tv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sums[0] += xv[j];
        sums[1] += tv[j];
      }
    }
    row_allreduce<2>(sums, tpr, scratch_first);
    mean = sums[0] * inv_c;
    tx_mean = sums[1] * inv_c;
    // Centered second pass over the registers: no cancellation from sum(x^2) - C mean^2.
    float centered[2] = {0.f, 0.f};  // sum (x - mu)^2, sum (x - mu) x'
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t e = (static_cast<int64_t>(i) * tpr + lane) * VEC;
      if (e < C) {
        float xv[VEC], tv[VEC];
        unpack<T, VEC>(x_raw[i], xv);
        unpack<T, VEC>(tx_raw[i], tv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = xv[j] - mean;
          centered[0] += d * d;
          centered[1] += d * tv[j];
        }
      }
    }
    row_allreduce<2>(centered, tpr, scratch_second);
    rstd = rsqrtf(centered[0] * inv_c + p.eps);
    ntx_mean = centered[1] * inv_c * rstd;
  } else if constexpr (NORM == static_cast<int>(NormKind::kRms)) {
    float sums[2] = {0.f, 0.f};  // sum x^2, sum x x'
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      float xv[VEC], tv[VEC];
      unpack<T, VEC>(x_raw[i], xv);
      unpack<T, VEC>(tx_raw[i], tv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sums[0] += xv[j] * xv[j];
        sums[1] += xv[j] * tv[j];
      }
    }
    row_allreduce<2>(sums, tpr, scratch_first);
    rstd = rsqrtf(sums[0] * inv_c + p.eps);
    ntx_mean = sums[1] * inv_c * rstd;
  }

  if (!row_ok) return;  // no barrier or shuffle below
  if (lane == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    if (p.rstd != nullptr) p.rstd[row] = rstd;
  }

  T* y_row = static_cast<T*>(p.y) + row * C;
  T* ty_row = static_cast<T*>(p.ty) + row * C;
  // The fp32 side inputs (weight, bias, four modulation tensors) are read in 16-byte chunks of kChunk channels, so
  // at most 6 x kChunk of them are live at once: keeps wide bf16 vectors (8 channels) within the register budget.
  constexpr int kChunk = VEC < 4 ? VEC : 4;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t e = (static_cast<int64_t>(i) * tpr + lane) * VEC;
    if (e >= C) continue;
    // Inputs are unpacked and outputs packed chunk by chunk: only the packed vectors stay live across chunks.
    const T* xs = reinterpret_cast<const T*>(&x_raw[i]);
    const T* ts = reinterpret_cast<const T*>(&tx_raw[i]);
    Raw<T, VEC> y_raw, ty_raw;
    T* ys = reinterpret_cast<T*>(&y_raw);
    T* tys = reinterpret_cast<T*>(&ty_raw);
#pragma unroll
    for (int c0 = 0; c0 < VEC; c0 += kChunk) {
      float w[kChunk], bias[kChunk], shift[kChunk], tshift[kChunk], scale[kChunk], tscale[kChunk];
      if (p.weight != nullptr) {
        load_vec<float, kChunk>(p.weight + e + c0, w);
      } else {
#pragma unroll
        for (int j = 0; j < kChunk; ++j) w[j] = 1.f;
      }
      if (p.bias != nullptr) {
        load_vec<float, kChunk>(p.bias + e + c0, bias);
      } else {
#pragma unroll
        for (int j = 0; j < kChunk; ++j) bias[j] = 0.f;
      }
      load_mod<T, kChunk>(p.shift, mod_f32, b, l, e + c0, shift);
      load_mod<T, kChunk>(p.tshift, mod_f32, b, l, e + c0, tshift);
      load_mod<T, kChunk>(p.scale, mod_f32, b, l, e + c0, scale);
      load_mod<T, kChunk>(p.tscale, mod_f32, b, l, e + c0, tscale);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const float xj = to_float(xs[c0 + j]), tj = to_float(ts[c0 + j]);
        float n, nt;
        if constexpr (NORM == static_cast<int>(NormKind::kLayer)) {
          n = (xj - mean) * rstd;
          nt = rstd * (tj - tx_mean - n * ntx_mean);
        } else if constexpr (NORM == static_cast<int>(NormKind::kRms)) {
          n = xj * rstd;
          nt = rstd * (tj - n * ntx_mean);
        } else {
          n = xj;
          nt = tj;
        }
        const float a = n * w[j] + bias[j];
        const float at = nt * w[j];
        const float gain = 1.f + scale[j];
        ys[c0 + j] = from_float<T>(a * gain + shift[j]);
        tys[c0 + j] = from_float<T>(at * gain + a * tscale[j] + tshift[j]);
      }
    }
    *reinterpret_cast<Raw<T, VEC>*>(y_row + e) = y_raw;
    *reinterpret_cast<Raw<T, VEC>*>(ty_row + e) = ty_raw;
  }
}

int elem_size(ElemType t) { return t == ElemType::kFloat32 ? 4 : 2; }

int vector_width(ElemType t) { return 16 / elem_size(t); }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct LaunchShape {
  int tpr = 0;    // threads per row
  int items = 0;  // vectors per thread
  int block = 0;  // threads per block
  int64_t grid = 0;
};

// Short rows (<= 128 vectors): 4..32 lanes per row, 128-thread blocks holding several rows. Longer rows: one block
// per row, as many threads as vectors up to 512, then 2, 4 (.. 16 scalar) vectors per thread.
// Measured on one H200 (torch 2.11): Wan rows (C = 5120) reach 94% of copy bandwidth with fp32 x and fp32
// per-token modulation, 87% with bf16 x and fp32 modulation, but only 54-65% with bf16 x and bf16 / no
// modulation: at ~85 registers per thread two 320-thread blocks fit an SM, i.e. two rows (40 KB) in flight.
// Staging rows in shared memory (cp.async) instead of registers is the known next step for 16-bit rows.
LaunchShape choose_shape(int64_t rows, int64_t vectors, int max_items) {
  LaunchShape s;
  if (vectors <= 128) {
    s.tpr = static_cast<int>(vectors <= 32 ? (next_pow2(vectors) < 4 ? 4 : next_pow2(vectors)) : 32);
    s.items = static_cast<int>(next_pow2(ceil_div(vectors, s.tpr)));
    s.block = kSubWarpBlock;
  } else {
    s.items = 1;
    while (s.items < max_items && ceil_div(vectors, s.items) > kMaxThreads) s.items *= 2;
    s.tpr = static_cast<int>(ceil_div(ceil_div(vectors, s.items), 32) * 32);
    s.block = s.tpr;
  }
  s.grid = ceil_div(rows, s.block / s.tpr);
  return s;
}

template <typename T, int NORM, int VEC>
cudaError_t launch_items(const NormJvpParams& p, const LaunchShape& s, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(s.grid)), block(static_cast<unsigned>(s.block));
  switch (s.items) {
    case 1: norm_jvp_kernel<T, NORM, VEC, 1><<<grid, block, 0, stream>>>(p, s.tpr); break;
    case 2: norm_jvp_kernel<T, NORM, VEC, 2><<<grid, block, 0, stream>>>(p, s.tpr); break;
    case 4: norm_jvp_kernel<T, NORM, VEC, 4><<<grid, block, 0, stream>>>(p, s.tpr); break;
    case 8:
      if constexpr (VEC == 1) {
        norm_jvp_kernel<T, NORM, VEC, 8><<<grid, block, 0, stream>>>(p, s.tpr);
        break;
      }
      return cudaErrorInvalidConfiguration;
    case 16:
      if constexpr (VEC == 1) {
        norm_jvp_kernel<T, NORM, VEC, 16><<<grid, block, 0, stream>>>(p, s.tpr);
        break;
      }
      return cudaErrorInvalidConfiguration;
    default: return cudaErrorInvalidConfiguration;
  }
  return cudaGetLastError();
}

template <typename T, int NORM>
cudaError_t launch_vec(const NormJvpParams& p, bool vectorized, const LaunchShape& s, cudaStream_t stream) {
  if (vectorized) return launch_items<T, NORM, 16 / sizeof(T)>(p, s, stream);
  return launch_items<T, NORM, 1>(p, s, stream);
}

template <typename T>
cudaError_t launch_norm(const NormJvpParams& p, bool vectorized, const LaunchShape& s, cudaStream_t stream) {
  switch (p.norm) {
    case NormKind::kNone: return launch_vec<T, static_cast<int>(NormKind::kNone)>(p, vectorized, s, stream);
    case NormKind::kLayer: return launch_vec<T, static_cast<int>(NormKind::kLayer)>(p, vectorized, s, stream);
    case NormKind::kRms: return launch_vec<T, static_cast<int>(NormKind::kRms)>(p, vectorized, s, stream);
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool operand_vectorizable(const Operand3d& op, int elem_bytes) {
  if (op.data == nullptr) return true;
  return aligned16(op.data) && (op.stride_b * elem_bytes) % 16 == 0 && (op.stride_l * elem_bytes) % 16 == 0;
}

}  // namespace

bool can_vectorize(const NormJvpParams& p) {
  const int xb = elem_size(p.x_type), mb = elem_size(p.mod_type);
  if (p.channels % vector_width(p.x_type) != 0) return false;
  if (!operand_vectorizable(p.x, xb) || !operand_vectorizable(p.tx, xb)) return false;
  for (const Operand3d* op : {&p.shift, &p.tshift, &p.scale, &p.tscale}) {
    if (!operand_vectorizable(*op, mb)) return false;
  }
  if ((p.weight != nullptr && !aligned16(p.weight)) || (p.bias != nullptr && !aligned16(p.bias))) return false;
  return aligned16(p.y) && aligned16(p.ty);  // rows of the contiguous outputs are then aligned too (C % VEC == 0)
}

int64_t max_channels(const NormJvpParams& p) {
  if (can_vectorize(p)) return static_cast<int64_t>(kMaxThreads) * kMaxItemsVector * vector_width(p.x_type);
  return static_cast<int64_t>(kMaxThreads) * kMaxItemsScalar;
}

cudaError_t launch_norm_jvp(const NormJvpParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.length;
  if (rows == 0 || p.channels == 0) return cudaSuccess;
  if (p.channels > max_channels(p)) return cudaErrorInvalidValue;
  const bool vectorized = can_vectorize(p);
  const int vec = vectorized ? vector_width(p.x_type) : 1;
  const LaunchShape s = choose_shape(rows, ceil_div(p.channels, vec), vectorized ? kMaxItemsVector : kMaxItemsScalar);
  if (s.grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (p.x_type) {
    case ElemType::kFloat32: return launch_norm<float>(p, vectorized, s, stream);
    case ElemType::kFloat16: return launch_norm<__half>(p, vectorized, s, stream);
    case ElemType::kBFloat16: return launch_norm<__nv_bfloat16>(p, vectorized, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace facm_ext::norms
