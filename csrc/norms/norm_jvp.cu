// The norm (layer / rms) x modulation (none / [B, C] / per-token strided) x tangent-presence JVP kernels. Rows of
// more than 128 16-byte vectors that fit 46 KB (LightningDiT's 1152 and Wan's 5120 channels) are staged in shared
// memory, one block per row (norm_jvp_smem_kernel). Other rows live in registers (norm_jvp_kernel): a group of
// `tpr` threads per row (4..32 lanes of one warp for short rows such as qk-norm's 72 channels, or a whole block of
// up to 512 threads), each thread holding ITEMS vectors of VEC elements of x and x'. One read of every input, one
// write of every output. Reductions are in fp32 with a fixed order (deterministic). Modulation without a norm runs
// an elementwise kernel instead (modulate_jvp_kernel).
#include "norm_jvp.h"

#include "pointwise/vec_io.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace facm_ext::norms {
namespace {

constexpr int kMaxThreads = 512;           // threads of one row group at most (block-per-row mode)
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kSubWarpBlock = 128;         // block size when several rows share a block (tpr <= 32)
constexpr int kMaxItemsVector = 4;
constexpr int kMaxItemsScalar = 16;
constexpr int kStagedThreads = 128;         // threads per row of the shared-memory-staged kernel at most
constexpr int kStagedMinBlocks = 8;        // 64 registers: eight 128-thread staged rows per SM
// Staged x (+ x') per block at most: the default 48 KB per-block shared memory limit less room for the static
// reduction scratch (fp32 rows of 6144 channels with a tangent would need exactly 48 KB and fail to launch).
constexpr int64_t kMaxStagedBytes = 46 * 1024;
constexpr int kElementwiseThreads = 256;       // per-token modulation without a norm: one vector per thread

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

// Per-row statistics the epilogue needs. ntx_mean = mean(n * x').
struct RowStats {
  float mean = 0.f, rstd = 1.f, tx_mean = 0.f, ntx_mean = 0.f;
};

// First-pass partial sums of one vector: LayerNorm (sum x, sum x'), RMSNorm (sum x^2, sum x x').
template <typename T, int NORM, int VEC>
__device__ __forceinline__ void add_first_sums(const Raw<T, VEC>& x_raw, const Raw<T, VEC>& tx_raw,
                                               float (&sums)[2]) {
  float xv[VEC], tv[VEC];
  unpack<T, VEC>(x_raw, xv);
  unpack<T, VEC>(tx_raw, tv);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if constexpr (NORM == static_cast<int>(NormKind::kLayer)) {
      sums[0] += xv[j];
      sums[1] += tv[j];
    } else {
      sums[0] += xv[j] * xv[j];
      sums[1] += xv[j] * tv[j];
    }
  }
}

// LayerNorm's centered second pass (sum (x - mu)^2, sum (x - mu) x'): no cancellation from sum x^2 - C mu^2.
template <typename T, int VEC>
__device__ __forceinline__ void add_centered_sums(const Raw<T, VEC>& x_raw, const Raw<T, VEC>& tx_raw, float mean,
                                                  float (&sums)[2]) {
  float xv[VEC], tv[VEC];
  unpack<T, VEC>(x_raw, xv);
  unpack<T, VEC>(tx_raw, tv);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float d = xv[j] - mean;
    sums[0] += d * d;
    sums[1] += d * tv[j];
  }
}

// n and n' of one channel from the row statistics (the formulas of norm_jvp.h).
template <int NORM>
__device__ __forceinline__ void normalize(float x, float tx, const RowStats& st, float& n, float& nt) {
  static_assert(NORM != static_cast<int>(NormKind::kNone), "modulation alone runs modulate_jvp_kernel");
  if constexpr (NORM == static_cast<int>(NormKind::kLayer)) {
    n = (x - st.mean) * st.rstd;
    nt = st.rstd * (tx - st.tx_mean - n * st.ntx_mean);
  } else {
    n = x * st.rstd;
    nt = st.rstd * (tx - n * st.ntx_mean);
  }
}

// y and y' of one vector of VEC channels starting at channel e of row (b, l) = row index `row`.
template <typename T, int NORM, int VEC>
__device__ __forceinline__ void write_outputs(const NormJvpParams& p, bool mod_f32, int64_t b, int64_t l,
                                              int64_t row, int64_t e, const Raw<T, VEC>& x_raw,
                                              const Raw<T, VEC>& tx_raw, const RowStats& st) {
  // The fp32 side inputs (weight, bias, four modulation tensors) are read in 16-byte chunks of kChunk channels, so
  // at most 6 x kChunk of them are live at once: keeps wide bf16 vectors (8 channels) within the register budget.
  constexpr int kChunk = VEC < 4 ? VEC : 4;
  // Inputs are unpacked and outputs packed chunk by chunk: only the packed vectors stay live across chunks.
  const T* xs = reinterpret_cast<const T*>(&x_raw);
  const T* ts = reinterpret_cast<const T*>(&tx_raw);
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
      normalize<NORM>(xj, tj, st, n, nt);
      const float a = n * w[j] + bias[j];
      const float at = nt * w[j];
      const float gain = 1.f + scale[j];
      ys[c0 + j] = from_float<T>(a * gain + shift[j]);
      tys[c0 + j] = from_float<T>(at * gain + a * tscale[j] + tshift[j]);
    }
  }
  *reinterpret_cast<Raw<T, VEC>*>(static_cast<T*>(p.y) + row * p.channels + e) = y_raw;
  *reinterpret_cast<Raw<T, VEC>*>(static_cast<T*>(p.ty) + row * p.channels + e) = ty_raw;
}

// Rows in registers: ITEMS vectors per thread, `tpr` threads per row (several rows per block when tpr <= 32).
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
  RowStats st;
  static_assert(NORM != static_cast<int>(NormKind::kNone), "modulation alone runs modulate_jvp_kernel");
  float sums[2] = {0.f, 0.f};  // zero-filled vectors past C add nothing
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) add_first_sums<T, NORM, VEC>(x_raw[i], tx_raw[i], sums);
  row_allreduce<2>(sums, tpr, scratch_first);
  if constexpr (NORM == static_cast<int>(NormKind::kLayer)) {
    st.mean = sums[0] * inv_c;
    st.tx_mean = sums[1] * inv_c;
    float centered[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if ((static_cast<int64_t>(i) * tpr + lane) * VEC < C) {
        add_centered_sums<T, VEC>(x_raw[i], tx_raw[i], st.mean, centered);
      }
    }
    row_allreduce<2>(centered, tpr, scratch_second);
    st.rstd = rsqrtf(centered[0] * inv_c + p.eps);
    st.ntx_mean = centered[1] * inv_c * st.rstd;
  } else {
    st.rstd = rsqrtf(sums[0] * inv_c + p.eps);
    st.ntx_mean = sums[1] * inv_c * st.rstd;
  }

  if (!row_ok) return;  // no barrier or shuffle below
  if (lane == 0) {
    if (p.mean != nullptr) p.mean[row] = st.mean;
    if (p.rstd != nullptr) p.rstd[row] = st.rstd;
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t e = (static_cast<int64_t>(i) * tpr + lane) * VEC;
    if (e < C) write_outputs<T, NORM, VEC>(p, mod_f32, b, l, row, e, x_raw[i], tx_raw[i], st);
  }
}

// Modulation alone (no norm) is elementwise: a thread owns one VEC-wide channel vector in ROWS consecutive rows and
// issues the loads of x and x' for all of them before any math. [B, C] modulation (every present tensor broadcast
// over tokens) is read once per batch index the thread's rows cover (ROWS > 1), not once per token: re-reading it
// per token moved four times x's bytes from L2 (the row kernels, and a one-row elementwise version, ran the
// LightningDiT [B, C] case at 75 us against torch.compile's 42 us on an H200). Per-token modulation uses ROWS = 1.
template <typename M, int VEC, bool kPresent>
__device__ __forceinline__ void load_mod_vec(const Operand3d& op, int64_t b, int64_t l, int64_t e,
                                             float (&out)[VEC]) {
  if (!kPresent && op.data == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = 0.f;
    return;
  }
  load_vec<M, VEC>(static_cast<const M*>(op.data) + b * op.stride_b + l * op.stride_l + e, out);
}

// kDenseAll: x and x' laid out like the outputs and all four modulation tensors present, as compile-time facts, so a
// row is addressed as row * C with the kernel's index type and no load is conditional (at the LightningDiT [B, C]
// shape the general form ran 43.0 us against ~41.5 us for this structure in a standalone kernel).
template <typename T, typename M, int VEC, int ROWS, int THREADS, typename Idx, bool kDenseAll>
__global__ void __launch_bounds__(THREADS) modulate_jvp_kernel(const NormJvpParams p) {
  const Idx vectors_per_row = static_cast<Idx>(p.channels / VEC);
  const Idx length = static_cast<Idx>(p.length);
  const Idx rows = static_cast<Idx>(p.batch) * length;
  const Idx total = (rows + ROWS - 1) / ROWS * vectors_per_row;
  const bool has_tx = kDenseAll || p.tx.data != nullptr;
  for (Idx v = static_cast<Idx>(blockIdx.x) * THREADS + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * THREADS) {
    const Idx group = v / vectors_per_row;
    const int64_t e = static_cast<int64_t>(v - group * vectors_per_row) * VEC;
    Raw<T, VEC> x_raw[ROWS], tx_raw[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const Idx row = group * ROWS + r;
      if (row < rows) {
        if constexpr (kDenseAll) {
          const Idx offset = row * static_cast<Idx>(p.channels) + static_cast<Idx>(e);
          x_raw[r] = *reinterpret_cast<const Raw<T, VEC>*>(static_cast<const T*>(p.x.data) + offset);
          tx_raw[r] = *reinterpret_cast<const Raw<T, VEC>*>(static_cast<const T*>(p.tx.data) + offset);
        } else {
          const int64_t b = static_cast<int64_t>(row / length), l = static_cast<int64_t>(row % length);
          x_raw[r] = *reinterpret_cast<const Raw<T, VEC>*>(static_cast<const T*>(p.x.data) + b * p.x.stride_b +
                                                           l * p.x.stride_l + e);
          tx_raw[r] = has_tx ? *reinterpret_cast<const Raw<T, VEC>*>(static_cast<const T*>(p.tx.data) +
                                                                     b * p.tx.stride_b + l * p.tx.stride_l + e)
                             : raw_zero<T, VEC>();
        }
      }
    }
    float shift[VEC], tshift[VEC], scale[VEC], tscale[VEC];
    int64_t loaded_b = -1;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const Idx row = group * ROWS + r;
      if (row >= rows) break;
      const int64_t b = static_cast<int64_t>(row / length), l = static_cast<int64_t>(row % length);
      if (b != loaded_b) {  // always for ROWS == 1; for [B, C] modulation once per batch index
        load_mod_vec<M, VEC, kDenseAll>(p.shift, b, l, e, shift);
        load_mod_vec<M, VEC, kDenseAll>(p.tshift, b, l, e, tshift);
        load_mod_vec<M, VEC, kDenseAll>(p.scale, b, l, e, scale);
        load_mod_vec<M, VEC, kDenseAll>(p.tscale, b, l, e, tscale);
        loaded_b = b;
      }
      float xv[VEC], tv[VEC];
      unpack<T, VEC>(x_raw[r], xv);
      unpack<T, VEC>(tx_raw[r], tv);
      Raw<T, VEC> y_raw, ty_raw;
      T* ys = reinterpret_cast<T*>(&y_raw);
      T* tys = reinterpret_cast<T*>(&ty_raw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float gain = 1.f + scale[j];
        ys[j] = from_float<T>(xv[j] * gain + shift[j]);
        tys[j] = from_float<T>(tv[j] * gain + xv[j] * tscale[j] + tshift[j]);
      }
      const int64_t out = static_cast<int64_t>(row) * p.channels + e;
      *reinterpret_cast<Raw<T, VEC>*>(static_cast<T*>(p.y) + out) = y_raw;
      *reinterpret_cast<Raw<T, VEC>*>(static_cast<T*>(p.ty) + out) = ty_raw;
    }
  }
}

// 16-byte asynchronous global -> shared copy (sm_80+; older targets copy through registers).
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned smem_addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Rows staged in shared memory: one block per row, the whole row of x (and x') copied with cp.async before any
// arithmetic. No register holds a row, so an SM keeps many rows (bytes) in flight; used for rows of more than 128
// vectors that fit kMaxStagedBytes, whose register-resident version is limited to two rows per SM (see choose_shape).
// Needs the vector path (16-byte aligned rows, C % VEC == 0) and blockDim.x a multiple of 32, <= kStagedThreads.
// What the row carries is compile-time (AFFINE: weight and/or bias; MOD: no modulation, modulation in x's dtype or
// fp32) and every operand is addressed from a per-row base pointer with 32-bit channel offsets: a generic version
// (runtime null checks and 64-bit strided addressing per vector) issued 1.7x the instructions and was
// issue-bound at 65% of DRAM bandwidth at Wan's LayerNorm shape (ncu, H200, 2026-11-26), against 82% for this form.
// FACM_EXT_NORMS_ROW_STAGING=registers selects the register-resident kernel instead.
constexpr int kAffineWeight = 1, kAffineBias = 2;   // AFFINE bit flags
constexpr int kModNone = 0, kModSame = 1, kModF32 = 2;  // MOD: modulation absent, in x's dtype, or fp32

template <typename T, int MOD>
using ModElem = std::conditional_t<MOD == kModF32, float, T>;

template <typename M>
__device__ __forceinline__ const M* operand_row(const Operand3d& op, int64_t b, int64_t l) {
  return op.data == nullptr ? nullptr : static_cast<const M*>(op.data) + b * op.stride_b + l * op.stride_l;
}

template <typename M, int N>
__device__ __forceinline__ void load_or_zero(const M* row, int e, float (&out)[N]) {
  if (row == nullptr) {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = 0.f;
  } else {
    load_vec<M, N>(row + e, out);
  }
}

template <typename T, int MOD, typename O>
struct StagedRow {
  const ModElem<T, MOD>* shift;
  const ModElem<T, MOD>* tshift;
  const ModElem<T, MOD>* scale;
  const ModElem<T, MOD>* tscale;
  O* y;
  O* ty;
};

// VEC outputs of type O stored as one transaction (16 bytes when O is x's type; 8 for 16-bit outputs of fp32 x).
template <typename O, int VEC>
struct alignas(VEC * sizeof(O)) OutVec {
  O v[VEC];
};

// y and y' of one staged vector at channel e (the affine and modulation inputs read in 4-channel chunks), written
// as O (x's type, or the 16-bit type an fp32 x's consumer casts to: rounded once, as that cast would).
template <typename T, int NORM, int AFFINE, int MOD, int VEC, typename O>
__device__ __forceinline__ void write_staged_vector(const NormJvpParams& p, const StagedRow<T, MOD, O>& r, int e,
                                                    const Raw<T, VEC>& x_raw, const Raw<T, VEC>& tx_raw,
                                                    const RowStats& st) {
  using M = ModElem<T, MOD>;
  constexpr int kChunk = 4;
  const T* xs = reinterpret_cast<const T*>(&x_raw);
  const T* ts = reinterpret_cast<const T*>(&tx_raw);
  OutVec<O, VEC> y_out, ty_out;
  O* ys = y_out.v;
  O* tys = ty_out.v;
#pragma unroll
  for (int c0 = 0; c0 < VEC; c0 += kChunk) {
    float w[kChunk], bias[kChunk], shift[kChunk], tshift[kChunk], scale[kChunk], tscale[kChunk];
    if constexpr ((AFFINE & kAffineWeight) != 0) load_vec<float, kChunk>(p.weight + e + c0, w);
    if constexpr ((AFFINE & kAffineBias) != 0) load_vec<float, kChunk>(p.bias + e + c0, bias);
    if constexpr (MOD != kModNone) {
      load_or_zero<M, kChunk>(r.shift, e + c0, shift);
      load_or_zero<M, kChunk>(r.tshift, e + c0, tshift);
      load_or_zero<M, kChunk>(r.scale, e + c0, scale);
      load_or_zero<M, kChunk>(r.tscale, e + c0, tscale);
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const float xj = to_float(xs[c0 + j]), tj = to_float(ts[c0 + j]);
      float n, nt;
      normalize<NORM>(xj, tj, st, n, nt);
      float a = n, at = nt;
      if constexpr ((AFFINE & kAffineWeight) != 0) {
        a *= w[j];
        at *= w[j];
      }
      if constexpr ((AFFINE & kAffineBias) != 0) a += bias[j];
      if constexpr (MOD != kModNone) {
        const float gain = 1.f + scale[j];
        ys[c0 + j] = from_float<O>(a * gain + shift[j]);
        tys[c0 + j] = from_float<O>(at * gain + a * tscale[j] + tshift[j]);
      } else {
        ys[c0 + j] = from_float<O>(a);
        tys[c0 + j] = from_float<O>(at);
      }
    }
  }
  *reinterpret_cast<OutVec<O, VEC>*>(r.y + e) = y_out;
  *reinterpret_cast<OutVec<O, VEC>*>(r.ty + e) = ty_out;
}

template <typename T, int NORM, int AFFINE, int MOD, typename O>
__global__ void __launch_bounds__(kStagedThreads, kStagedMinBlocks) norm_jvp_smem_kernel(const NormJvpParams p) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static_assert(NORM != static_cast<int>(NormKind::kNone), "modulation alone runs modulate_jvp_kernel");
  extern __shared__ __align__(16) unsigned char staged[];
  __shared__ float scratch_first[kMaxWarps * 2];
  __shared__ float scratch_second[kMaxWarps * 2];

  const int64_t row = blockIdx.x;
  const int64_t b = row / p.length;
  const int64_t l = row - b * p.length;
  const int C = static_cast<int>(p.channels);
  const int vectors = C / VEC;
  const int threads = blockDim.x;
  const bool has_tx = p.tx.data != nullptr;
  T* x_s = reinterpret_cast<T*>(staged);
  T* tx_s = x_s + C;  // present only with a tangent (the launch sizes the buffer accordingly)

  const T* x_row = operand_row<T>(p.x, b, l);
  for (int v = threadIdx.x; v < vectors; v += threads) copy16_async(x_s + v * VEC, x_row + v * VEC);
  if (has_tx) {
    const T* tx_row = operand_row<T>(p.tx, b, l);
    for (int v = threadIdx.x; v < vectors; v += threads) copy16_async(tx_s + v * VEC, tx_row + v * VEC);
  }
  using M = ModElem<T, MOD>;
  StagedRow<T, MOD, O> r;
  r.shift = operand_row<M>(p.shift, b, l);
  r.tshift = operand_row<M>(p.tshift, b, l);
  r.scale = operand_row<M>(p.scale, b, l);
  r.tscale = operand_row<M>(p.tscale, b, l);
  r.y = static_cast<O*>(p.y) + row * C;
  r.ty = static_cast<O*>(p.ty) + row * C;
  wait_async_copies();
  __syncthreads();

  using Vec = Raw<T, VEC>;
  const Vec zero = raw_zero<T, VEC>();
  const float inv_c = 1.f / static_cast<float>(C);
  RowStats st;
  float sums[2] = {0.f, 0.f};
  for (int v = threadIdx.x; v < vectors; v += threads) {
    const Vec xr = *reinterpret_cast<const Vec*>(x_s + v * VEC);
    const Vec tr = has_tx ? *reinterpret_cast<const Vec*>(tx_s + v * VEC) : zero;
    add_first_sums<T, NORM, VEC>(xr, tr, sums);
  }
  row_allreduce<2>(sums, threads, scratch_first);
  if constexpr (NORM == static_cast<int>(NormKind::kLayer)) {
    st.mean = sums[0] * inv_c;
    st.tx_mean = sums[1] * inv_c;
    float centered[2] = {0.f, 0.f};
    for (int v = threadIdx.x; v < vectors; v += threads) {
      const Vec xr = *reinterpret_cast<const Vec*>(x_s + v * VEC);
      const Vec tr = has_tx ? *reinterpret_cast<const Vec*>(tx_s + v * VEC) : zero;
      add_centered_sums<T, VEC>(xr, tr, st.mean, centered);
    }
    row_allreduce<2>(centered, threads, scratch_second);
    st.rstd = rsqrtf(centered[0] * inv_c + p.eps);
    st.ntx_mean = centered[1] * inv_c * st.rstd;
  } else {
    st.rstd = rsqrtf(sums[0] * inv_c + p.eps);
    st.ntx_mean = sums[1] * inv_c * st.rstd;
  }

  if (threadIdx.x == 0) {
    if (p.mean != nullptr) p.mean[row] = st.mean;
    if (p.rstd != nullptr) p.rstd[row] = st.rstd;
  }
#pragma unroll 1
  for (int v = threadIdx.x; v < vectors; v += threads) {
    const Vec xr = *reinterpret_cast<const Vec*>(x_s + v * VEC);
    const Vec tr = has_tx ? *reinterpret_cast<const Vec*>(tx_s + v * VEC) : zero;
    write_staged_vector<T, NORM, AFFINE, MOD, VEC, O>(p, r, v * VEC, xr, tr, st);
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
// Long rows take this register-resident path only when they do not fit the staging buffer (or with
// FACM_EXT_NORMS_ROW_STAGING=registers). Measured on one H200 (torch 2.11) at Wan rows (C = 5120): 52-94% of copy
// bandwidth here (at ~85 registers per thread two 320-thread blocks fit an SM, i.e. two rows in flight), 89-103%
// for the staged kernel (benchmarks/RESULTS.md, fourth session).
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
    case NormKind::kNone: return cudaErrorInvalidValue;  // modulation alone takes the elementwise kernel
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

int64_t staged_bytes(const NormJvpParams& p) {
  return (p.tx.data != nullptr ? 2 : 1) * p.channels * elem_size(p.x_type);
}

// Rows of more than 128 aligned vectors that fit the staging buffer go through the shared-memory-staged kernel,
// unless the environment sets FACM_EXT_NORMS_ROW_STAGING=registers (A/B comparisons; the register kernel then takes
// every row).
bool use_staged_rows(const NormJvpParams& p, bool vectorized, int64_t vectors) {
  if (!vectorized || vectors <= 128 || staged_bytes(p) > kMaxStagedBytes) return false;
  const char* choice = std::getenv("FACM_EXT_NORMS_ROW_STAGING");
  return choice == nullptr || std::strcmp(choice, "registers") != 0;
}

template <typename T, int NORM, int AFFINE, typename O>
void launch_staged_out(const NormJvpParams& p, const dim3 grid, const dim3 block, size_t smem, cudaStream_t stream) {
  const bool any_mod = p.shift.data != nullptr || p.tshift.data != nullptr || p.scale.data != nullptr ||
                       p.tscale.data != nullptr;
  if (!any_mod) {
    norm_jvp_smem_kernel<T, NORM, AFFINE, kModNone, O><<<grid, block, smem, stream>>>(p);
  } else if (p.mod_type == ElemType::kFloat32) {
    norm_jvp_smem_kernel<T, NORM, AFFINE, kModF32, O><<<grid, block, smem, stream>>>(p);
  } else if constexpr (!std::is_same_v<T, float>) {  // for fp32 x, "same" is kModF32
    norm_jvp_smem_kernel<T, NORM, AFFINE, kModSame, O><<<grid, block, smem, stream>>>(p);
  }
}

template <typename T, int NORM, int AFFINE>
cudaError_t launch_staged_mod(const NormJvpParams& p, const dim3 grid, const dim3 block, size_t smem,
                              cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    switch (p.y_type) {
      case ElemType::kFloat32: launch_staged_out<T, NORM, AFFINE, float>(p, grid, block, smem, stream); break;
      case ElemType::kBFloat16:
        launch_staged_out<T, NORM, AFFINE, __nv_bfloat16>(p, grid, block, smem, stream);
        break;
      case ElemType::kFloat16: launch_staged_out<T, NORM, AFFINE, __half>(p, grid, block, smem, stream); break;
    }
  } else {
    if (p.y_type != p.x_type) return cudaErrorInvalidValue;
    launch_staged_out<T, NORM, AFFINE, T>(p, grid, block, smem, stream);
  }
  return cudaGetLastError();
}

template <typename T, int NORM>
cudaError_t launch_staged_affine(const NormJvpParams& p, const dim3 grid, const dim3 block, size_t smem,
                                 cudaStream_t stream) {
  const int affine = (p.weight != nullptr ? kAffineWeight : 0) | (p.bias != nullptr ? kAffineBias : 0);
  switch (affine) {
    case 0: return launch_staged_mod<T, NORM, 0>(p, grid, block, smem, stream);
    case kAffineWeight: return launch_staged_mod<T, NORM, kAffineWeight>(p, grid, block, smem, stream);
    case kAffineBias: return launch_staged_mod<T, NORM, kAffineBias>(p, grid, block, smem, stream);
    default: return launch_staged_mod<T, NORM, kAffineWeight | kAffineBias>(p, grid, block, smem, stream);
  }
}

template <typename T>
cudaError_t launch_staged(const NormJvpParams& p, int threads, size_t smem, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.length)), block(static_cast<unsigned>(threads));
  switch (p.norm) {
    case NormKind::kLayer:
      return launch_staged_affine<T, static_cast<int>(NormKind::kLayer)>(p, grid, block, smem, stream);
    case NormKind::kRms:
      return launch_staged_affine<T, static_cast<int>(NormKind::kRms)>(p, grid, block, smem, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool broadcast_over_tokens(const Operand3d& op) { return op.data == nullptr || op.stride_l == 0; }

// Rows per thread of the modulation kernel: 4 when every modulation tensor is broadcast over tokens (reused from
// registers), else 1. The broadcast form runs 64-thread blocks: at the LightningDiT shape (bf16 [64, 256, 1152],
// 36,864 work items) 256-thread blocks gave 46.3 us and 64-thread blocks 41.5 us, the 2-in/2-out copy 40.2 us
// (scratch microbenchmark, H200, 2026-11-26; block sizes 64-256 and 1-8 rows compared). Per-token modulation keeps
// 256-thread blocks (at the memory roofline at Wan's shape).
constexpr int kBroadcastRows = 4;
constexpr int kBroadcastThreads = 64;

template <typename T, typename M, int VEC, int ROWS, int THREADS>
cudaError_t launch_modulate_rows(const NormJvpParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.length;
  const int64_t work = ceil_div(rows, ROWS) * (p.channels / VEC);
  const int64_t blocks = vec_io::covering_blocks(work, THREADS);  // one thread per work item
  const dim3 grid(static_cast<unsigned>(blocks)), block(THREADS);
  const int64_t max_index = std::max(rows * p.channels, work + blocks * THREADS);
  const auto dense = [&](const Operand3d& op) {
    return (p.length == 1 || op.stride_l == p.channels) && (p.batch == 1 || op.stride_b == p.length * p.channels);
  };
  const bool dense_all = dense(p.x) && p.tx.data != nullptr && dense(p.tx) && p.shift.data != nullptr &&
                         p.tshift.data != nullptr && p.scale.data != nullptr && p.tscale.data != nullptr;
  auto go = [&](auto kernel) { kernel<<<grid, block, 0, stream>>>(p); };
  if (max_index <= 0x7fffffffLL) {
    if (dense_all) {
      go(modulate_jvp_kernel<T, M, VEC, ROWS, THREADS, uint32_t, true>);
    } else {
      go(modulate_jvp_kernel<T, M, VEC, ROWS, THREADS, uint32_t, false>);
    }
  } else {
    go(modulate_jvp_kernel<T, M, VEC, ROWS, THREADS, uint64_t, false>);
  }
  return cudaGetLastError();
}

template <typename T, typename M, int VEC>
cudaError_t launch_modulate_vec(const NormJvpParams& p, cudaStream_t stream) {
  const bool broadcast = broadcast_over_tokens(p.shift) && broadcast_over_tokens(p.tshift) &&
                         broadcast_over_tokens(p.scale) && broadcast_over_tokens(p.tscale);
  return broadcast ? launch_modulate_rows<T, M, VEC, kBroadcastRows, kBroadcastThreads>(p, stream)
                   : launch_modulate_rows<T, M, VEC, 1, kElementwiseThreads>(p, stream);
}

template <typename T, typename M>
cudaError_t launch_modulate_typed(const NormJvpParams& p, bool vectorized, cudaStream_t stream) {
  if (vectorized) return launch_modulate_vec<T, M, 16 / sizeof(T)>(p, stream);
  return launch_modulate_vec<T, M, 1>(p, stream);
}

template <typename T>
cudaError_t launch_modulate(const NormJvpParams& p, bool vectorized, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (p.mod_type == ElemType::kFloat32) return launch_modulate_typed<T, float>(p, vectorized, stream);
  }
  return launch_modulate_typed<T, T>(p, vectorized, stream);
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

bool narrow_output_supported(const NormJvpParams& p) {
  if (p.x_type != ElemType::kFloat32 || p.norm == NormKind::kNone || p.channels > max_channels(p)) return false;
  const bool vectorized = can_vectorize(p);
  return use_staged_rows(p, vectorized, ceil_div(p.channels, vectorized ? vector_width(p.x_type) : 1));
}

cudaError_t launch_norm_jvp(const NormJvpParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.length;
  if (rows == 0 || p.channels == 0) return cudaSuccess;
  if (p.channels > max_channels(p)) return cudaErrorInvalidValue;
  if (p.y_type != p.x_type && !narrow_output_supported(p)) return cudaErrorInvalidValue;
  const bool vectorized = can_vectorize(p);
  if (p.norm == NormKind::kNone) {
    switch (p.x_type) {
      case ElemType::kFloat32: return launch_modulate<float>(p, vectorized, stream);
      case ElemType::kFloat16: return launch_modulate<__half>(p, vectorized, stream);
      case ElemType::kBFloat16: return launch_modulate<__nv_bfloat16>(p, vectorized, stream);
    }
    return cudaErrorInvalidValue;
  }
  const int vec = vectorized ? vector_width(p.x_type) : 1;
  const int64_t vectors = ceil_div(p.channels, vec);
  if (use_staged_rows(p, vectorized, vectors)) {
    if (rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    // As few passes per thread as 128 threads allow, spread evenly: 144 vectors (C = 1152) -> 96 threads x 2.
    const int64_t passes = ceil_div(vectors, kStagedThreads);
    const int threads = static_cast<int>(ceil_div(ceil_div(vectors, passes), 32) * 32);
    const size_t smem = static_cast<size_t>(staged_bytes(p));
    switch (p.x_type) {
      case ElemType::kFloat16: return launch_staged<__half>(p, threads, smem, stream);
      case ElemType::kBFloat16: return launch_staged<__nv_bfloat16>(p, threads, smem, stream);
      case ElemType::kFloat32: return launch_staged<float>(p, threads, smem, stream);
    }
    return cudaErrorInvalidValue;
  }
  const LaunchShape s = choose_shape(rows, vectors, vectorized ? kMaxItemsVector : kMaxItemsScalar);
  if (s.grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (p.x_type) {
    case ElemType::kFloat32: return launch_norm<float>(p, vectorized, s, stream);
    case ElemType::kFloat16: return launch_norm<__half>(p, vectorized, s, stream);
    case ElemType::kBFloat16: return launch_norm<__nv_bfloat16>(p, vectorized, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace facm_ext::norms
