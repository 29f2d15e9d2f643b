// One-pass flash attention JVP forward on tensor cores (mma.sync m16n8k16, fp32 accumulators), for head dims that
// Triton can only run padded to a power of two (72 for DiT and LightningDiT runs 128-wide there).
//
// Math (docs jvp_math.md, "Softmax attention"), per query row and key tile, base-2 scores s = tau log2(e) q.k:
//   P~ = exp2(s - m), S' = tau (q'.k + q.k') (natural units), l = sum P~, r = sum P~ S',
//   Acc_O = sum P~ v, Acc_T = sum P~ (S' - c) v + P~ v' with c the first key tile's r / l (see the kernel), all
//   four rescaled by exp2(m_old - m_new) when the max moves.
//   Epilogue: O = Acc_O / l, O' = Acc_T / l - (r / l - c) O, lse = (m + log2 l) ln 2.
//
// Tiling: a CTA of 4 warps owns 64 query rows (16 per warp) of one (batch, head) and walks the keys in tiles of 64
// with a two-stage cp.async pipeline (K, V, K', V' of tile j+1 load while tile j computes). Q and Q' live in
// registers as mma A fragments. Along the head, the score GEMMs run DP = D rounded up to 16 (72 -> 80: channels
// D..DP-1 are zero in shared memory), the value GEMMs run exactly D/8 column tiles (72 -> 9). Shared memory rows
// hold DP + 8 elements, so the 8 rows an ldmatrix phase reads start in 8 different 4-bank groups.
// Rows beyond Lq and keys at or beyond the row's key length load as zeros (cp.async zero fill): their S' is exactly
// 0 and their P~ is masked to 0, so no padding value can leak into the outputs.
#include "attention_jvp.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace facm_ext::attention {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
constexpr int kBlockN = 64;           // keys per tile
constexpr int kNTiles = kBlockN / 8;  // score column tiles per warp
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct HeadGeometry {
  static constexpr int kPadded = (D + 15) / 16 * 16;  // score GEMM depth
  static constexpr int kKSteps = kPadded / 16;
  static constexpr int kOutTiles = D / 8;             // value GEMM column tiles
  static constexpr int kRow = kPadded + 8;            // shared-memory row, elements
  static constexpr int kChunks = D / 8;               // 16-byte chunks of a global row
  static constexpr int kTile = kBlockN * kRow;        // elements of one K/V/K'/V' tile
  static constexpr int kSmemBytes = 2 * 4 * kTile * 2;  // two stages of K, V, K', V'
  static_assert(D % 8 == 0 && kBlockN == kBlockM, "Q tiles reuse the K tile slots");
};

// ------------------------------------------------------------------------------------------------ PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  // c += a (16x16, row) * b (16x8, col)
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ------------------------------------------------------------------------------------------------ tile loads
// Rows [row0, row0 + 64) of a [L, D] operand into a shared tile of kRow-element rows; rows >= valid_rows are zeros.
template <int D, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t row_stride, int row0, int valid_rows) {
  using G = HeadGeometry<D>;
  const uint32_t dst0 = smem_addr(tile);
  for (int c = threadIdx.x; c < kBlockN * G::kChunks; c += kThreads) {
    const int r = c / G::kChunks, chunk = c - r * G::kChunks;
    const bool valid = row0 + r < valid_rows;
    const T* src = valid ? base + static_cast<int64_t>(row0 + r) * row_stride + chunk * 8 : base;
    cp_async16(dst0 + static_cast<uint32_t>((r * G::kRow + chunk * 8) * sizeof(T)), src, valid);
  }
}

struct Rows {
  const void* ptr;
  int64_t row_stride;
};

template <typename T>
__device__ __forceinline__ Rows head_rows(const Operand4& op, int64_t b, int64_t h) {
  return {static_cast<const T*>(op.ptr) + b * op.stride_b + h * op.stride_h, op.stride_l};
}

// -------------------------------------------------------------------------------------------------- the kernel
template <typename T, int D, bool kValueTangent>
__global__ void __launch_bounds__(kThreads, 2) attention_jvp_kernel(AttentionJvpArgs a) {
  using G = HeadGeometry<D>;
  using M = Mma<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  // Stage s holds K, V, K', V' at tiles 4s + {0, 1, 2, 3}; Q and Q' first pass through stage 1's K and K' tiles.
  auto tile = [&](int stage, int which) { return smem + (stage * 4 + which) * G::kTile; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;  // mma fragment coordinates
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int q0 = blockIdx.x * kBlockM;
  const int len_q = static_cast<int>(a.len_q);
  int kv_len = static_cast<int>(a.len_k);
  if (a.key_lengths != nullptr) {
    const int64_t given = a.key_lengths_int64 ? static_cast<const int64_t*>(a.key_lengths)[b]
                                              : static_cast<const int32_t*>(a.key_lengths)[b];
    kv_len = static_cast<int>(given < 0 ? 0 : (given < a.len_k ? given : a.len_k));
  }
  const bool has_tq = a.tq.ptr != nullptr, has_tk = a.tk.ptr != nullptr;

  const Rows q = head_rows<T>(a.q, b, h), k = head_rows<T>(a.k, b, h), v = head_rows<T>(a.v, b, h);
  const Rows tq = head_rows<T>(a.tq, b, h), tk = head_rows<T>(a.tk, b, h), tv = head_rows<T>(a.tv, b, h);
  auto load_kv = [&](int stage, int key0) {
    load_tile<D>(tile(stage, 0), static_cast<const T*>(k.ptr), k.row_stride, key0, kv_len);
    load_tile<D>(tile(stage, 1), static_cast<const T*>(v.ptr), v.row_stride, key0, kv_len);
    if (has_tk) load_tile<D>(tile(stage, 2), static_cast<const T*>(tk.ptr), tk.row_stride, key0, kv_len);
    if (kValueTangent) load_tile<D>(tile(stage, 3), static_cast<const T*>(tv.ptr), tv.row_stride, key0, kv_len);
  };

  // Channels D..DP-1 of the score operands are read by the last score k-step: zero them once (cp.async never
  // writes them).
  if constexpr (G::kPadded != D) {
    constexpr int kPadChunks = (G::kPadded - D) / 8;
    for (int c = threadIdx.x; c < 2 * 2 * kBlockN * kPadChunks; c += kThreads) {
      const int row = c / kPadChunks, chunk = c % kPadChunks;
      const int stage = row / (2 * kBlockN), which = (row / kBlockN) % 2 == 0 ? 0 : 2;  // K and K' tiles
      *reinterpret_cast<uint4*>(tile(stage, which) + (row % kBlockN) * G::kRow + D + chunk * 8) =
          make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
  }

  const int num_tiles = (kv_len + kBlockN - 1) / kBlockN;
  load_tile<D>(tile(1, 0), static_cast<const T*>(q.ptr), q.row_stride, q0, len_q);
  if (has_tq) load_tile<D>(tile(1, 2), static_cast<const T*>(tq.ptr), tq.row_stride, q0, len_q);
  if (num_tiles > 0) load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // Q and Q' rows of this warp as A fragments: lane -> row (lane % 16), channel half (lane / 16).
  uint32_t q_frag[G::kKSteps][4], tq_frag[G::kKSteps][4];
  {
    const int row = warp * 16 + lane % 16, col = (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < G::kKSteps; ++kk) {
      ldmatrix_x4(q_frag[kk], smem_addr(tile(1, 0) + row * G::kRow + kk * 16 + col));
      if (has_tq) ldmatrix_x4(tq_frag[kk], smem_addr(tile(1, 2) + row * G::kRow + kk * 16 + col));
    }
  }
  __syncthreads();  // stage 1 is free for key tile 1

  float acc_o[G::kOutTiles][4], acc_t[G::kOutTiles][4];
#pragma unroll
  for (int d = 0; d < G::kOutTiles; ++d)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc_o[d][i] = acc_t[d][i] = 0.f;
  // Rows `group` (index 0) and `group + 8` (index 1) of the warp's 16: running max (base-2 units) and this lane's
  // partial sums of P~ and P~ S' over its columns (reduced across the quad in the epilogue).
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, row_r[2] = {0.f, 0.f};
  // The tangent accumulator is centred: Acc_T = sum P~ (S' - c) v + P~ v' with c = the first key tile's
  // r / l, so the bf16 operand P~ (S' - c) of its GEMM is small where S' is close to its mean (one tile of keys:
  // c = mu, and one key gives O' = V' exactly, as the math path does). c is fixed after the first tile (moving it
  // would cost a quad reduction and an update of Acc_T per tile: +7% at L 1024); the epilogue subtracts the
  // remainder (mu - c) O in fp32.
  float centre[2] = {0.f, 0.f};
  const float scale_log2 = a.scale * kLog2e;

  // Per-lane ldmatrix offsets. Scores (K as the col-major B operand): matrices (keys +0, ch +0), (keys +0, ch +8),
  // (keys +8, ch +0), (keys +8, ch +8) = b0, b1 of column tiles 2p and 2p + 1.
  const int key_off_scores = lane % 8 + (lane / 16) * 8, ch_off_scores = ((lane / 8) % 2) * 8;
  // Values (V row-major, transposed load): matrices (keys +0, ch +0), (keys +8, ch +0), (keys +0, ch +8),
  // (keys +8, ch +8) = b0, b1 of output tiles 2p and 2p + 1.
  const int key_off_values = lane % 8 + ((lane / 8) % 2) * 8, ch_off_values = (lane / 16) * 8;

  for (int j = 0; j < num_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < num_tiles) {
      load_kv(stage ^ 1, (j + 1) * kBlockN);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const T* k_tile = tile(stage, 0);
    const T* v_tile = tile(stage, 1);
    const T* tk_tile = tile(stage, 2);
    const T* tv_tile = tile(stage, 3);

    float s[kNTiles][4], ts[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[n][i] = ts[n][i] = 0.f;

#pragma unroll
    for (int kk = 0; kk < G::kKSteps; ++kk) {
#pragma unroll
      for (int p = 0; p < kNTiles / 2; ++p) {
        const int offset = (p * 16 + key_off_scores) * G::kRow + kk * 16 + ch_off_scores;
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_addr(k_tile + offset));
        M::run(s[2 * p], q_frag[kk], kb[0], kb[1]);
        M::run(s[2 * p + 1], q_frag[kk], kb[2], kb[3]);
        if (has_tq) {
          M::run(ts[2 * p], tq_frag[kk], kb[0], kb[1]);
          M::run(ts[2 * p + 1], tq_frag[kk], kb[2], kb[3]);
        }
        if (has_tk) {
          uint32_t tkb[4];
          ldmatrix_x4(tkb, smem_addr(tk_tile + offset));
          M::run(ts[2 * p], q_frag[kk], tkb[0], tkb[1]);
          M::run(ts[2 * p + 1], q_frag[kk], tkb[2], tkb[3]);
        }
      }
    }

    // Online softmax and its tangent statistics.
    const int key0 = j * kBlockN;
    const bool partial = key0 + kBlockN > kv_len;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[n][i] * scale_log2;
        if (partial && key0 + n * 8 + quad_lane * 2 + (i & 1) >= kv_len) x = -INFINITY;
        s[n][i] = x;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], x);
      }
    }
    float rescale[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      base[r] = new_max == -INFINITY ? 0.f : new_max;  // a row with no valid key yet: exp2(-inf - 0) = 0
      rescale[r] = exp2f(row_max[r] - base[r]);
      row_max[r] = new_max;
      row_sum[r] *= rescale[r];
      row_r[r] *= rescale[r];
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = exp2f(s[n][i] - base[i / 2]);
        ts[n][i] *= a.scale;  // S' in natural units
        row_sum[i / 2] += p;
        row_r[i / 2] += p * ts[n][i];
        s[n][i] = p;
      }
    }
    if (j == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(row_sum[r]);
        centre[r] = l > 0.f ? quad_sum(row_r[r]) / l : 0.f;
      }
    }
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) ts[n][i] = s[n][i] * (ts[n][i] - centre[i / 2]);
#pragma unroll
    for (int d = 0; d < G::kOutTiles; ++d) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc_o[d][i] *= rescale[i / 2];
        acc_t[d][i] *= rescale[i / 2];
      }
    }

    // Value GEMMs over the tile's 64 keys, 16 per step: P~ and P~ S' as A fragments from the score accumulators.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t p_frag[4] = {M::pack(s[2 * kk][0], s[2 * kk][1]), M::pack(s[2 * kk][2], s[2 * kk][3]),
                                  M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint32_t w_frag[4] = {M::pack(ts[2 * kk][0], ts[2 * kk][1]), M::pack(ts[2 * kk][2], ts[2 * kk][3]),
                                  M::pack(ts[2 * kk + 1][0], ts[2 * kk + 1][1]),
                                  M::pack(ts[2 * kk + 1][2], ts[2 * kk + 1][3])};
      const int row_offset = (kk * 16 + key_off_values) * G::kRow + ch_off_values;
#pragma unroll
      for (int p = 0; p < G::kOutTiles / 2; ++p) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_addr(v_tile + row_offset + p * 16));
        M::run(acc_o[2 * p], p_frag, vb[0], vb[1]);
        M::run(acc_o[2 * p + 1], p_frag, vb[2], vb[3]);
        M::run(acc_t[2 * p], w_frag, vb[0], vb[1]);
        M::run(acc_t[2 * p + 1], w_frag, vb[2], vb[3]);
        if constexpr (kValueTangent) {
          uint32_t tvb[4];
          ldmatrix_x4_trans(tvb, smem_addr(tv_tile + row_offset + p * 16));
          M::run(acc_t[2 * p], p_frag, tvb[0], tvb[1]);
          M::run(acc_t[2 * p + 1], p_frag, tvb[2], tvb[3]);
        }
      }
      if constexpr (G::kOutTiles % 2 == 1) {
        constexpr int last = G::kOutTiles - 1;
        uint32_t vb[2];
        ldmatrix_x2_trans(vb, smem_addr(v_tile + row_offset + (last / 2) * 16));
        M::run(acc_o[last], p_frag, vb[0], vb[1]);
        M::run(acc_t[last], w_frag, vb[0], vb[1]);
        if constexpr (kValueTangent) {
          uint32_t tvb[2];
          ldmatrix_x2_trans(tvb, smem_addr(tv_tile + row_offset + (last / 2) * 16));
          M::run(acc_t[last], p_frag, tvb[0], tvb[1]);
        }
      }
    }
    __syncthreads();  // this stage is overwritten by the load issued in iteration j + 1
  }

  // Epilogue: O = Acc_O / l, O' = Acc_T / l - (mu - c) O with mu = r / l. The rows go
  // through shared memory (stage 0's K and V tiles, free after the loop's last barrier) so the global stores are
  // 16-byte row chunks.
  const int64_t row_base = (b * a.heads + h) * a.len_q;
  T* o_stage = tile(0, 0);
  T* to_stage = tile(0, 1);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    const float residual = quad_sum(row_r[r]) * inv_l - centre[r];
    const int local_row = warp * 16 + group + r * 8;
#pragma unroll
    for (int d = 0; d < G::kOutTiles; ++d) {
      const float o0 = acc_o[d][2 * r] * inv_l, o1 = acc_o[d][2 * r + 1] * inv_l;
      const float t0 = acc_t[d][2 * r] * inv_l - residual * o0, t1 = acc_t[d][2 * r + 1] * inv_l - residual * o1;
      const int offset = local_row * G::kRow + d * 8 + quad_lane * 2;
      *reinterpret_cast<uint32_t*>(o_stage + offset) = M::pack(o0, o1);
      *reinterpret_cast<uint32_t*>(to_stage + offset) = M::pack(t0, t1);
    }
    const int row = q0 + local_row;
    if (quad_lane == 0 && row < len_q) {
      a.lse[row_base + row] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < kBlockM * G::kChunks; c += kThreads) {
    const int r = c / G::kChunks, chunk = c - r * G::kChunks;
    const int row = q0 + r;
    if (row < len_q) {
      const int64_t dst = (row_base + row) * D + chunk * 8;
      *reinterpret_cast<uint4*>(static_cast<T*>(a.o) + dst) =
          *reinterpret_cast<const uint4*>(o_stage + r * G::kRow + chunk * 8);
      *reinterpret_cast<uint4*>(static_cast<T*>(a.to) + dst) =
          *reinterpret_cast<const uint4*>(to_stage + r * G::kRow + chunk * 8);
    }
  }
}

template <typename T, int D, bool kTangentV>
cudaError_t launch_kernel(const AttentionJvpArgs& a, dim3 grid, cudaStream_t stream) {
  using G = HeadGeometry<D>;
  // The dynamic shared-memory limit is raised once per device and kernel (it holds for the process): a driver
  // call on every launch sat on the host path of each attention layer. Bit i: raised on device i (devices >= 64
  // raise it at every launch).
  static std::atomic<uint64_t> raised_on_devices{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit == 0 || (raised_on_devices.load(std::memory_order_acquire) & bit) == 0) {
    err = cudaFuncSetAttribute(attention_jvp_kernel<T, D, kTangentV>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               G::kSmemBytes);
    if (err != cudaSuccess) return err;
    raised_on_devices.fetch_or(bit, std::memory_order_release);
  }
  attention_jvp_kernel<T, D, kTangentV><<<grid, kThreads, G::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_typed(const AttentionJvpArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.len_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>(a.batches));
  if (a.tv.ptr != nullptr) return launch_kernel<T, D, true>(a, grid, stream);
  return launch_kernel<T, D, false>(a, grid, stream);
}

template <typename T>
cudaError_t launch_dtype(const AttentionJvpArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch_typed<T, 64>(a, stream);
    case 72: return launch_typed<T, 72>(a, stream);
    case 80: return launch_typed<T, 80>(a, stream);
    case 96: return launch_typed<T, 96>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool attention_jvp_head_dim_supported(int64_t head_dim) {
  return head_dim == 64 || head_dim == 72 || head_dim == 80 || head_dim == 96;
}

cudaError_t launch_attention_jvp(const AttentionJvpArgs& args, cudaStream_t stream) {
  if (!attention_jvp_head_dim_supported(args.head_dim) || (args.tq.ptr == nullptr && args.tk.ptr == nullptr) ||
      args.heads > 65535 || args.batches > 65535 || args.len_q > (int64_t{1} << 30) ||
      args.len_k > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  if (args.batches == 0 || args.heads == 0 || args.len_q == 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(args, stream);
    case DType::kFloat16: return launch_dtype<__half>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace facm_ext::attention
