// Device helpers shared by the pointwise and RoPE JVP kernels: fp32 conversion of fp32/fp16/bf16 elements and
// loads/stores of E consecutive elements, as 16-byte transactions when the caller guarantees alignment.
#pragma once

#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace facm_ext::vec_io {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T per 16-byte transaction.
template <typename T>
inline constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));

// Loads p[0..E) as fp32. kAligned: p is 16-byte aligned and E a multiple of kPer16<T> (16-byte loads through the
// read-only path); otherwise element by element.
template <int E, bool kAligned, typename T>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[E]) {
  if constexpr (kAligned) {
    static_assert(E % kPer16<T> == 0, "vector width must cover whole 16-byte transactions");
#pragma unroll
    for (int chunk = 0; chunk < E / kPer16<T>; ++chunk) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + chunk);
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer16<T>; ++i) out[chunk * kPer16<T> + i] = to_f32(vals[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = to_f32(__ldg(p + i));
  }
}

// E elements of T as raw 16-byte words: loads issued early (before a branch or a second row's math) and converted
// later, so a thread keeps several transactions in flight. Needs the 16-byte alignment of load<E, true>.
template <typename T, int E>
struct RawVec {
  static_assert(E % kPer16<T> == 0, "vector width must cover whole 16-byte transactions");
  uint4 words[E / kPer16<T>];
};

template <int E, typename T>
__device__ __forceinline__ RawVec<T, E> load_raw(const T* __restrict__ p) {
  RawVec<T, E> r;
#pragma unroll
  for (int chunk = 0; chunk < E / kPer16<T>; ++chunk) r.words[chunk] = __ldg(reinterpret_cast<const uint4*>(p) + chunk);
  return r;
}

template <int E, typename T>
__device__ __forceinline__ void unpack(const RawVec<T, E>& r, float (&out)[E]) {
#pragma unroll
  for (int chunk = 0; chunk < E / kPer16<T>; ++chunk) {
    const T* vals = reinterpret_cast<const T*>(&r.words[chunk]);
#pragma unroll
    for (int i = 0; i < kPer16<T>; ++i) out[chunk * kPer16<T> + i] = to_f32(vals[i]);
  }
}

// Raw bits of one element, widened to 32 bits.
__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Stores in[0..E) converted to T at p. kAligned: as in load(); each 16-byte word is packed explicitly and written
// with the st.global.wb.v4 intrinsic (a plain uint4 store was split into four 4-byte stores when the pointer came
// from a struct parameter, the compiler no longer proving its alignment).
template <int E, bool kAligned, typename T>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[E]) {
  if constexpr (kAligned) {
    static_assert(E % kPer16<T> == 0, "vector width must cover whole 16-byte transactions");
    static_assert(sizeof(T) == 4 || sizeof(T) == 2, "fp32, fp16 or bf16 elements");
#pragma unroll
    for (int chunk = 0; chunk < E / kPer16<T>; ++chunk) {
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        if constexpr (sizeof(T) == 4) {
          words[w] = bits_of(from_f32<T>(in[chunk * 4 + w]));
        } else {
          const int i = chunk * 8 + 2 * w;
          words[w] = bits_of(from_f32<T>(in[i])) | (bits_of(from_f32<T>(in[i + 1])) << 16);
        }
      }
      __stwb(reinterpret_cast<uint4*>(p) + chunk, make_uint4(words[0], words[1], words[2], words[3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) p[i] = from_f32<T>(in[i]);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Blocks of `threads` threads that give each of `items` grid-stride steps its own thread: a one-shot grid. Measured
// on an H200 (GELU JVP, bf16, 32760 x 13824, scratch microbenchmark, 2026-11-26): one-shot 4,212 GB/s against 3,111
// for a grid of resident blocks looping over the work, the copy engine 4,257. The kernels keep their grid-stride
// loops only for grids past the 2^31 - 1 block limit.
inline int64_t covering_blocks(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return blocks < 1 ? 1 : (blocks > INT32_MAX ? INT32_MAX : blocks);
}

}  // namespace facm_ext::vec_io
