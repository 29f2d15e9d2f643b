// Fused primal + tangent rotary embedding: out = R(l) x, tout = R(l) tx with the same position-only rotation.
//
// Two forms. Looping (rope_jvp_kernel): a work item is (batch, position, channel chunk); it loads that chunk's
// cos/sin once and applies them to every head, so the tables are read once per position rather than once per head
// (Wan: 40 heads share an 8 MB table pair). Flat (rope_jvp_flat_kernel): one thread per (row, chunk) of dense
// operands, each reading its chunk's cos/sin with vector loads; used where a position's table row stays cached
// between its heads (see use_flat_form). Chunks: E consecutive channels (interleaved pairs (2i, 2i+1)), or E channels
// of each half (half-split pairs (j, j + D/2)). E = 16 bytes of x's dtype when pointers and strides allow; else a
// single pair (2 channels interleaved, 1 of each half split) with element loads (looping form only).
#include "rope_jvp.h"

#include <algorithm>
#include <type_traits>

#include "../pointwise/vec_io.cuh"

namespace facm_ext::rope {
namespace {

using vec_io::load;
using vec_io::store;

constexpr int kThreads = 256;

// dst = R src for one chunk: E channels (interleaved pairs) or E channels of each half (half-split pairs, the second
// half at + half) with the chunk's cos/sin (c1, s1), and (c2, s2) for the second half.
template <int E, bool kAligned, bool kInterleaved, typename T>
__device__ __forceinline__ void rotate_chunk(const T* src, T* dst, int64_t half, const float (&c1)[E],
                                             const float (&s1)[E], const float (&c2)[E], const float (&s2)[E]) {
  float in1[E], o1[E];
  load<E, kAligned>(src, in1);
  if constexpr (kInterleaved) {
#pragma unroll
    for (int p = 0; p < E; p += 2) {
      o1[p] = in1[p] * c1[p] - in1[p + 1] * s1[p];
      o1[p + 1] = in1[p + 1] * c1[p + 1] + in1[p] * s1[p + 1];
    }
    store<E, kAligned>(dst, o1);
  } else {
    float in2[E], o2[E];
    load<E, kAligned>(src + half, in2);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      o1[i] = in1[i] * c1[i] - in2[i] * s1[i];
      o2[i] = in2[i] * c2[i] + in1[i] * s2[i];
    }
    store<E, kAligned>(dst, o1);
    store<E, kAligned>(dst + half, o2);
  }
}

template <typename T, int E, bool kAligned, typename Idx, bool kTangent, bool kInterleaved, bool kPerPair>
__global__ void __launch_bounds__(kThreads) rope_jvp_kernel(RopeArgs a) {
  const Idx span = static_cast<Idx>(kInterleaved ? a.head_dim : a.head_dim / 2);
  const Idx chunks = span / E;
  const Idx tokens = static_cast<Idx>(a.tokens);
  const Idx total = static_cast<Idx>(a.batches) * tokens * chunks;
  const int64_t half = a.head_dim / 2;
  const T* x = static_cast<const T*>(a.x.ptr);
  const T* tx = static_cast<const T*>(a.tx.ptr);
  T* out = static_cast<T*>(a.out);
  T* tout = static_cast<T*>(a.tout);

  for (Idx v = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * kThreads) {
    const Idx row = v / chunks;
    const int64_t c0 = static_cast<int64_t>(v - row * chunks) * E;
    const Idx b = row / tokens;
    const Idx l = row - b * tokens;

    // cos/sin of the chunk's channels: (c1, s1) for channels c0.., (c2, s2) for c0 + D/2.. (half-split only).
    float c1[E], s1[E], c2[E], s2[E];
    const float* cos_row = a.cos + static_cast<int64_t>(l) * a.table_row_stride;
    const float* sin_row = a.sin + static_cast<int64_t>(l) * a.table_row_stride;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int64_t col = kInterleaved && kPerPair ? (c0 + i) / 2 : c0 + i;
      c1[i] = __ldg(cos_row + col);
      s1[i] = __ldg(sin_row + col);
      if constexpr (!kInterleaved) {
        const int64_t col2 = kPerPair ? col : col + half;
        c2[i] = __ldg(cos_row + col2);
        s2[i] = __ldg(sin_row + col2);
      }
    }

    const int64_t x_base = b * a.x.stride_b + l * a.x.stride_l + c0;
    const int64_t tx_base = b * a.tx.stride_b + l * a.tx.stride_l + c0;
    const int64_t o_base = b * a.out_stride_b + l * a.out_stride_l + c0;
#pragma unroll 2
    for (int64_t h = 0; h < a.heads; ++h) {
      // One source: the primal (pass 0) and, when present, the tangent (pass 1) get the same rotation.
#pragma unroll
      for (int pass = 0; pass < (kTangent ? 2 : 1); ++pass) {
        const T* src = pass == 0 ? x + (x_base + h * a.x.stride_h) : tx + (tx_base + h * a.tx.stride_h);
        T* dst = (pass == 0 ? out : tout) + (o_base + h * a.out_stride_h);
        rotate_chunk<E, kAligned, kInterleaved>(src, dst, half, c1, s1, c2, s2);
      }
      if constexpr (!kTangent) {
        // A zero tangent rotates to zero.
        float zeros[E];
#pragma unroll
        for (int i = 0; i < E; ++i) zeros[i] = 0.0f;
        T* dst = tout + (o_base + h * a.out_stride_h);
        store<E, kAligned>(dst, zeros);
        if constexpr (!kInterleaved) store<E, kAligned>(dst + half, zeros);
      }
    }
  }
}

// N consecutive fp32 table entries; p is aligned to min(N, 4) floats (checked by the host: use_flat_form).
template <int N>
__device__ __forceinline__ void load_table(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = v.x, out[i + 1] = v.y, out[i + 2] = v.z, out[i + 3] = v.w;
    }
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const float2 v = __ldg(reinterpret_cast<const float2*>(p + i));
      out[i] = v.x, out[i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = __ldg(p + i);
  }
}

// cos or sin of the E channels at c0: entries c0.. of the row, or (kRepeat) entries c0 / 2.. each repeated over a
// pair's two channels.
template <int E, bool kRepeat>
__device__ __forceinline__ void chunk_table(const float* row, int64_t c0, float (&out)[E]) {
  if constexpr (kRepeat) {
    float pairs[E / 2];
    load_table<E / 2>(row + c0 / 2, pairs);
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = pairs[i / 2];
  } else {
    load_table<E>(row + c0, out);
  }
}

// Flat form: x, x' and the outputs dense with identical strides, 16-byte vectors; one thread per (row, chunk) with
// rows in memory order, position l = (row / heads_inner) % L (heads_inner = 1 for [B, H, L, D] memory, H for
// [B, L, H, D]). At LightningDiT's shape (bf16 [64, 16, 256, 72], [256, 72] tables) the looping form took 44 us and
// this form 40.5 us (the 2-in/2-out copy 40.2 us; torch.compile's kernel 46 us); at Wan's [1, 32760, 40, 128] memory
// order 324 against 359 us (copy 321 us); at Wan's [1, 40, 32760, 128] order 449 against 349 us, because each
// head re-reads the 16.8 MB table pair from DRAM (scratch microbenchmark, H200, 2026-11-26).
constexpr int kFlatThreads = 128;

template <typename T, int E, typename Idx, bool kTangent, bool kInterleaved, bool kPerPair>
__global__ void __launch_bounds__(kFlatThreads) rope_jvp_flat_kernel(RopeArgs a, int64_t heads_inner) {
  const Idx span = static_cast<Idx>(kInterleaved ? a.head_dim : a.head_dim / 2);
  const Idx chunks = span / E;
  const Idx tokens = static_cast<Idx>(a.tokens);
  const Idx inner = static_cast<Idx>(heads_inner);
  const Idx total = static_cast<Idx>(a.batches * a.heads * a.tokens) * chunks;
  const int64_t half = a.head_dim / 2;
  for (Idx v = static_cast<Idx>(blockIdx.x) * kFlatThreads + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * kFlatThreads) {
    const Idx row = v / chunks;
    const int64_t c0 = static_cast<int64_t>(v - row * chunks) * E;
    const Idx l = (row / inner) % tokens;
    const float* cos_row = a.cos + static_cast<int64_t>(l) * a.table_row_stride;
    const float* sin_row = a.sin + static_cast<int64_t>(l) * a.table_row_stride;
    float c1[E], s1[E], c2[E], s2[E];
    // Interleaved per-pair tables hold one entry per pair; half-split per-pair tables are indexed by j in [0, D/2)
    // for both halves, per-channel half-split tables by channel.
    constexpr bool kRepeat = kInterleaved && kPerPair;
    chunk_table<E, kRepeat>(cos_row, c0, c1);
    chunk_table<E, kRepeat>(sin_row, c0, s1);
    if constexpr (!kInterleaved) {
      chunk_table<E, false>(cos_row, kPerPair ? c0 : c0 + half, c2);
      chunk_table<E, false>(sin_row, kPerPair ? c0 : c0 + half, s2);
    }
    const int64_t offset = static_cast<int64_t>(row) * a.head_dim + c0;
    rotate_chunk<E, true, kInterleaved>(static_cast<const T*>(a.x.ptr) + offset, static_cast<T*>(a.out) + offset,
                                        half, c1, s1, c2, s2);
    T* tout = static_cast<T*>(a.tout) + offset;
    if constexpr (kTangent) {
      rotate_chunk<E, true, kInterleaved>(static_cast<const T*>(a.tx.ptr) + offset, tout, half, c1, s1, c2, s2);
    } else {
      float zeros[E];
#pragma unroll
      for (int i = 0; i < E; ++i) zeros[i] = 0.0f;
      store<E, true>(tout, zeros);
      if constexpr (!kInterleaved) store<E, true>(tout + half, zeros);
    }
  }
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

bool strides_ok(const Operand4& op, int width) {
  return op.ptr == nullptr || (vec_io::aligned16(op.ptr) && op.stride_b % width == 0 && op.stride_h % width == 0 &&
                               op.stride_l % width == 0);
}

// heads_inner of the flat form when op is dense in one of the two memory orders: 1 for [B, H, L, D], H for
// [B, L, H, D]; 0 otherwise. Strides of size-1 dimensions do not matter.
int64_t dense_heads_inner(const RopeArgs& a, int64_t stride_b, int64_t stride_h, int64_t stride_l) {
  const int64_t B = a.batches, H = a.heads, L = a.tokens, D = a.head_dim;
  auto matches = [&](int64_t sb, int64_t sh, int64_t sl) {
    return (B == 1 || stride_b == sb) && (H == 1 || stride_h == sh) && (L == 1 || stride_l == sl);
  };
  if (matches(H * L * D, L * D, D)) return 1;
  if (matches(L * H * D, D, H * D)) return H;
  return 0;
}

// The flat form applies to dense operands with one memory order and 16-byte-aligned vector paths and table rows.
// In [B, H, L, D] order a position's table row is re-read once per head; that stays in cache only for small
// tables, so larger ones keep the looping form (Wan's 16.8 MB pair measured 1.29x slower flat).
constexpr int64_t kFlatTableBytesInHeadMajor = 4 << 20;

int64_t use_flat_form(const RopeArgs& a, bool aligned, int width) {
  if (!aligned) return 0;
  const int64_t inner = dense_heads_inner(a, a.x.stride_b, a.x.stride_h, a.x.stride_l);
  if (inner == 0 || dense_heads_inner(a, a.out_stride_b, a.out_stride_h, a.out_stride_l) != inner) return 0;
  if (a.tx.ptr != nullptr && dense_heads_inner(a, a.tx.stride_b, a.tx.stride_h, a.tx.stride_l) != inner) return 0;
  // Table loads of min(width / 2, 4) floats (per pair) or min(width, 4) (per channel) need that alignment.
  const int64_t table_align = std::min<int64_t>(a.per_pair && a.interleaved ? width / 2 : width, 4);
  const auto table_ok = [&](const float* t) { return reinterpret_cast<uintptr_t>(t) % (4 * table_align) == 0; };
  if (!table_ok(a.cos) || !table_ok(a.sin) || a.table_row_stride % table_align != 0) return 0;
  const int64_t table_bytes = 2 * a.tokens * (a.per_pair ? a.head_dim / 2 : a.head_dim) * 4;
  if (inner == 1 && a.heads > 1 && table_bytes > kFlatTableBytesInHeadMajor) return 0;
  return inner;
}

template <typename T>
cudaError_t launch_typed(const RopeArgs& a, cudaStream_t stream) {
  constexpr int kWidth = vec_io::kPer16<T>;
  const int64_t span = a.interleaved ? a.head_dim : a.head_dim / 2;
  const bool aligned = span % kWidth == 0 && strides_ok(a.x, kWidth) && strides_ok(a.tx, kWidth) &&
                       vec_io::aligned16(a.out) && vec_io::aligned16(a.tout) && a.out_stride_b % kWidth == 0 &&
                       a.out_stride_h % kWidth == 0 && a.out_stride_l % kWidth == 0;
  const bool wide_index = a.batches * a.tokens * span > static_cast<int64_t>(INT32_MAX);
  cudaError_t err = cudaSuccess;

  if (const int64_t heads_inner = use_flat_form(a, aligned, kWidth); heads_inner > 0) {
    const int64_t items = a.batches * a.heads * a.tokens * (span / kWidth);
    if (items <= 0) return cudaSuccess;
    const int64_t blocks = vec_io::covering_blocks(items, kFlatThreads);
    const bool flat_wide = a.batches * a.heads * a.tokens * a.head_dim + blocks * kFlatThreads >
                           static_cast<int64_t>(INT32_MAX);
    auto flat = [&](auto idx_tag) {
      using Idx = typename decltype(idx_tag)::type;
      with_bool(a.tx.ptr != nullptr, [&](auto tangent) {
        with_bool(a.interleaved, [&](auto interleaved) {
          with_bool(a.per_pair, [&](auto per_pair) {
            rope_jvp_flat_kernel<T, kWidth, Idx, decltype(tangent)::value, decltype(interleaved)::value,
                                 decltype(per_pair)::value>
                <<<static_cast<unsigned>(blocks), kFlatThreads, 0, stream>>>(a, heads_inner);
          });
        });
      });
    };
    if (flat_wide) {
      flat(Tag<uint64_t>{});
    } else {
      flat(Tag<uint32_t>{});
    }
    return cudaGetLastError();
  }

  auto go = [&](auto width, auto aligned_tag, auto idx_tag) {
    constexpr int E = decltype(width)::value;
    using Idx = typename decltype(idx_tag)::type;
    const int64_t items = a.batches * a.tokens * (span / E);
    if (items <= 0) return;
    const int64_t blocks = vec_io::covering_blocks(items, kThreads);
    with_bool(a.tx.ptr != nullptr, [&](auto tangent) {
      with_bool(a.interleaved, [&](auto interleaved) {
        with_bool(a.per_pair, [&](auto per_pair) {
          rope_jvp_kernel<T, E, decltype(aligned_tag)::value, Idx, decltype(tangent)::value,
                          decltype(interleaved)::value, decltype(per_pair)::value>
              <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
        });
      });
    });
    err = cudaGetLastError();
  };
  auto pick_index = [&](auto width, auto aligned_tag) {
    if (wide_index) {
      go(width, aligned_tag, Tag<uint64_t>{});
    } else {
      go(width, aligned_tag, Tag<uint32_t>{});
    }
  };
  if (aligned) {
    pick_index(std::integral_constant<int, kWidth>{}, std::true_type{});
  } else if (a.interleaved) {
    pick_index(std::integral_constant<int, 2>{}, std::false_type{});
  } else {
    pick_index(std::integral_constant<int, 1>{}, std::false_type{});
  }
  return err;
}

}  // namespace

cudaError_t launch_rope_jvp(const RopeArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return launch_typed<float>(args, stream);
    case DType::kFloat16: return launch_typed<__half>(args, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace facm_ext::rope
