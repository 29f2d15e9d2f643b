// Fused primal + tangent rotary embedding: out = R(l) x, tout = R(l) tx with the same position-only rotation.
//
// A work item is (batch, position, channel chunk); it loads that chunk's cos/sin once and applies them to every
// head, so the tables are read once per position rather than once per head (Wan: 40 heads share an 8 MB table
// pair). Chunks: E consecutive channels (interleaved pairs (2i, 2i+1)), or E channels of each half (half-split
// pairs (j, j + D/2)). E = 16 bytes of x's dtype when pointers and strides allow; else a single pair (2 channels
// interleaved, 1 of each half split) with element loads.
#include "rope_jvp.h"

#include <algorithm>
#include <type_traits>

#include "../pointwise/vec_io.cuh"

namespace facm_ext::rope {
namespace {

using vec_io::load;
using vec_io::store;

constexpr int kThreads = 256;

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

template <typename T>
cudaError_t launch_typed(const RopeArgs& a, cudaStream_t stream) {
  constexpr int kWidth = vec_io::kPer16<T>;
  const int64_t span = a.interleaved ? a.head_dim : a.head_dim / 2;
  const bool aligned = span % kWidth == 0 && strides_ok(a.x, kWidth) && strides_ok(a.tx, kWidth) &&
                       vec_io::aligned16(a.out) && vec_io::aligned16(a.tout) && a.out_stride_b % kWidth == 0 &&
                       a.out_stride_h % kWidth == 0 && a.out_stride_l % kWidth == 0;
  const bool wide_index = a.batches * a.tokens * span > static_cast<int64_t>(INT32_MAX);
  cudaError_t err = cudaSuccess;

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
