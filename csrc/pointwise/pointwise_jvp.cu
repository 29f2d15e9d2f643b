// Fused primal + tangent kernels of the pointwise ops (GELU, SiLU, SwiGLU, gated residual); see
// docs jvp_math.md for the rules. Memory-bound: one pass reads each primal/tangent once and writes primal and
// tangent once. fp32 math, outputs in the output dtype.
//
// Indexing: every operand is a [B, T, C] view (pointwise_jvp.h). A thread handles E consecutive channels of one
// row per grid-stride step: E = 16 bytes of the narrowest dtype (4 for fp32-only kernels, 8 when a 16-bit dtype
// is involved), loaded as 16-byte transactions when every pointer and stride allows (the "aligned" instantiation),
// else E = 1 element loads (any C, any offset). Indices are 32-bit unless the tensor has >= 2^31 elements.
#include "pointwise_jvp.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "vec_io.cuh"

namespace facm_ext::pointwise {
namespace {

using vec_io::from_f32;
using vec_io::load;
using vec_io::store;

constexpr int kThreads = 256;

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(Tag<float>{}); break;
    case DType::kFloat16: f(Tag<__half>{}); break;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// 16 bytes of the narrowest of the given types, in elements.
template <typename... Ts>
inline constexpr int kVecWidth = std::max({vec_io::kPer16<Ts>...});

// Row/channel coordinates of grid-stride step v over a [B, T, C / E] grid of E-wide vectors.
template <typename Idx>
struct Coord {
  Idx b, t, row, c;
};

template <int E, typename Idx>
__device__ __forceinline__ Coord<Idx> coord_of(Idx v, Idx vecs_per_row, Idx tokens) {
  Coord<Idx> k;
  k.row = v / vecs_per_row;
  k.c = (v - k.row * vecs_per_row) * E;
  k.b = k.row / tokens;
  k.t = k.row - k.b * tokens;
  return k;
}

template <typename T, typename Idx>
__device__ __forceinline__ const T* at(const Operand& op, const Coord<Idx>& k) {
  return static_cast<const T*>(op.ptr) + (k.b * op.stride_b + k.t * op.stride_t + static_cast<int64_t>(k.c));
}

template <typename Idx>
__device__ __forceinline__ int64_t out_offset(const Coord<Idx>& k, int64_t channels) {
  return static_cast<int64_t>(k.row) * channels + static_cast<int64_t>(k.c);
}

// Offsets of grid-stride step v into the input operands and the contiguous outputs. kDense: every operand is laid
// out like the outputs (stride_t = C, stride_b = T C), so the offset is v E and no row/batch division runs; the
// divisions and 64-bit strided products of the general form cost issue slots a memory-bound kernel at 16-bit
// widths cannot spare.
template <bool kDense, int E, typename Idx>
struct Site {
  Coord<Idx> k;
  int64_t out;
};

template <bool kDense, int E, typename Idx>
__device__ __forceinline__ Site<kDense, E, Idx> site_of(Idx v, Idx vecs_per_row, Idx tokens, int64_t channels) {
  Site<kDense, E, Idx> s;
  if constexpr (kDense) {
    s.out = static_cast<int64_t>(v) * E;
  } else {
    s.k = coord_of<E>(v, vecs_per_row, tokens);
    s.out = out_offset(s.k, channels);
  }
  return s;
}

template <typename T, bool kDense, int E, typename Idx>
__device__ __forceinline__ const T* at(const Operand& op, const Site<kDense, E, Idx>& s) {
  if constexpr (kDense) {
    return static_cast<const T*>(op.ptr) + s.out;
  } else {
    return at<T>(op, s.k);
  }
}

// gelu(x) and gelu'(x). Tanh form: one exponential serves primal and tangent. With e = exp(-2|u|) in (0, 1]:
// 0.5 (1 + tanh u) = 1/(1+e) (u >= 0) or e/(1+e) (u < 0), and 1 - tanh^2 u = 4e/(1+e)^2, both free of the
// cancellation that 1 - tanh^2 suffers where |tanh u| -> 1 (there an SFU tanh.approx, ~2^-11 relative error,
// gave ~1% error in the tangent), and the primal keeps its relative accuracy for negative x.
template <bool kTanh>
__device__ __forceinline__ void gelu_and_derivative(float x, float& y, float& dy) {
  if constexpr (kTanh) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    constexpr float kCubic = 0.044715f;
    const float x2 = x * x;
    const float u = kSqrt2OverPi * x * (1.0f + kCubic * x2);
    const float e = __expf(-2.0f * fabsf(u));
    const float r = 1.0f / (1.0f + e);
    const float half_one_plus = (u >= 0.0f ? 1.0f : e) * r;
    const float sech2 = 4.0f * e * r * r;
    y = x * half_one_plus;
    dy = half_one_plus + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x2);
  } else {
    constexpr float kInvSqrt2 = 0.7071067811865476f;
    constexpr float kInvSqrt2Pi = 0.3989422804014327f;
    const float cdf = 0.5f * erfcf(-x * kInvSqrt2);  // = 0.5 (1 + erf(x / sqrt 2)), accurate for x < 0 too
    y = x * cdf;
    dy = cdf + x * kInvSqrt2Pi * __expf(-0.5f * x * x);
  }
}

// silu(x) = x s and silu'(x) = s (1 + x (1 - s)), s = sigmoid(x). The IEEE reciprocal keeps s = 0 (not NaN) when
// exp(-x) overflows.
__device__ __forceinline__ void silu_and_derivative(float x, float& y, float& dy, float& s) {
  s = __frcp_rn(1.0f + __expf(-x));
  y = x * s;
  dy = s * (1.0f + x * (1.0f - s));
}

template <typename T, int E, bool kAligned, typename Idx, bool kDense, bool kTangent, bool kTanh>
__global__ void __launch_bounds__(kThreads)
    gelu_jvp_kernel(Shape3 shape, Operand x, Operand tx, T* __restrict__ out, T* __restrict__ tout) {
  const Idx vecs_per_row = static_cast<Idx>(shape.channels / E);
  const Idx tokens = static_cast<Idx>(shape.tokens);
  const Idx total = static_cast<Idx>(shape.batches) * tokens * vecs_per_row;
  for (Idx v = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * kThreads) {
    const auto site = site_of<kDense, E>(v, vecs_per_row, tokens, shape.channels);
    float xv[E], yv[E], tv[E];
    load<E, kAligned>(at<T>(x, site), xv);
    if constexpr (kTangent) load<E, kAligned>(at<T>(tx, site), tv);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float dy;
      gelu_and_derivative<kTanh>(xv[i], yv[i], dy);
      tv[i] = kTangent ? dy * tv[i] : 0.0f;
    }
    store<E, kAligned>(out + site.out, yv);
    store<E, kAligned>(tout + site.out, tv);
  }
}

template <typename T, int E, bool kAligned, typename Idx, bool kDense, bool kTangent>
__global__ void __launch_bounds__(kThreads)
    silu_jvp_kernel(Shape3 shape, Operand x, Operand tx, T* __restrict__ out, T* __restrict__ tout) {
  const Idx vecs_per_row = static_cast<Idx>(shape.channels / E);
  const Idx tokens = static_cast<Idx>(shape.tokens);
  const Idx total = static_cast<Idx>(shape.batches) * tokens * vecs_per_row;
  for (Idx v = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * kThreads) {
    const auto site = site_of<kDense, E>(v, vecs_per_row, tokens, shape.channels);
    float xv[E], yv[E], tv[E];
    load<E, kAligned>(at<T>(x, site), xv);
    if constexpr (kTangent) load<E, kAligned>(at<T>(tx, site), tv);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float dy, s;
      silu_and_derivative(xv[i], yv[i], dy, s);
      tv[i] = kTangent ? dy * tv[i] : 0.0f;
    }
    store<E, kAligned>(out + site.out, yv);
    store<E, kAligned>(tout + site.out, tv);
  }
}

template <typename T, int E, bool kAligned, typename Idx, bool kTangentA, bool kTangentB>
__global__ void __launch_bounds__(kThreads)
    swiglu_jvp_kernel(Shape3 shape, Operand a, Operand ta, Operand b, Operand tb, T* __restrict__ out,
                      T* __restrict__ tout) {
  const Idx vecs_per_row = static_cast<Idx>(shape.channels / E);
  const Idx tokens = static_cast<Idx>(shape.tokens);
  const Idx total = static_cast<Idx>(shape.batches) * tokens * vecs_per_row;
  for (Idx v = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * kThreads) {
    const Coord<Idx> k = coord_of<E>(v, vecs_per_row, tokens);
    float av[E], bv[E], tav[E], tbv[E], hv[E], thv[E];
    load<E, kAligned>(at<T>(a, k), av);
    load<E, kAligned>(at<T>(b, k), bv);
    if constexpr (kTangentA) load<E, kAligned>(at<T>(ta, k), tav);
    if constexpr (kTangentB) load<E, kAligned>(at<T>(tb, k), tbv);
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float silu_a, dsilu_a, s;
      silu_and_derivative(av[i], silu_a, dsilu_a, s);
      hv[i] = silu_a * bv[i];
      float th = 0.0f;
      if constexpr (kTangentA) th += dsilu_a * tav[i] * bv[i];
      if constexpr (kTangentB) th += silu_a * tbv[i];
      thv[i] = th;
    }
    const int64_t o = out_offset(k, shape.channels);
    store<E, kAligned>(out + o, hv);
    store<E, kAligned>(tout + o, thv);
  }
}

// Which tangents are present is a runtime (grid-uniform, so divergence-free) flag here: 9 dtype combinations x 8
// tangent subsets as template flags would multiply the instantiations for no measurable gain.
// kDense: x, x', y and y' laid out like the outputs (Site); the gate keeps its own strides ([B, C] broadcast or a
// per-token slice).
template <typename TX, typename TG, typename TY, int E, bool kAligned, typename Idx, bool kDense>
__global__ void __launch_bounds__(kThreads)
    gated_residual_jvp_kernel(Shape3 shape, Operand x, Operand tx, Operand gate, Operand tgate, Operand y,
                              Operand ty, TX* __restrict__ out, TX* __restrict__ tout) {
  const bool has_tx = tx.ptr != nullptr, has_tg = tgate.ptr != nullptr, has_ty = ty.ptr != nullptr;
  const Idx vecs_per_row = static_cast<Idx>(shape.channels / E);
  const Idx tokens = static_cast<Idx>(shape.tokens);
  const Idx total = static_cast<Idx>(shape.batches) * tokens * vecs_per_row;
  for (Idx v = static_cast<Idx>(blockIdx.x) * kThreads + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * kThreads) {
    const Coord<Idx> k = coord_of<E>(v, vecs_per_row, tokens);
    const auto site = site_of<kDense, E>(v, vecs_per_row, tokens, shape.channels);
    float xv[E], gv[E], yv[E], tmp[E], th[E];
    load<E, kAligned>(at<TX>(x, site), xv);
    load<E, kAligned>(at<TG>(gate, k), gv);
    load<E, kAligned>(at<TY>(y, site), yv);
#pragma unroll
    for (int i = 0; i < E; ++i) th[i] = 0.0f;
    if (has_tx) {
      load<E, kAligned>(at<TX>(tx, site), tmp);
#pragma unroll
      for (int i = 0; i < E; ++i) th[i] += tmp[i];
    }
    if (has_tg) {
      load<E, kAligned>(at<TG>(tgate, k), tmp);
#pragma unroll
      for (int i = 0; i < E; ++i) th[i] += tmp[i] * yv[i];
    }
    if (has_ty) {
      load<E, kAligned>(at<TY>(ty, site), tmp);
#pragma unroll
      for (int i = 0; i < E; ++i) th[i] += gv[i] * tmp[i];
    }
#pragma unroll
    for (int i = 0; i < E; ++i) xv[i] += gv[i] * yv[i];
    store<E, kAligned>(out + site.out, xv);
    store<E, kAligned>(tout + site.out, th);
  }
}

// [B, C] gate (broadcast over tokens) with x, x', y, y' laid out like the outputs and 16-byte vectors: a thread owns
// one vector in kGateRows consecutive rows, issues all their loads before any math and reads the gate once per batch
// index its rows cover. At the LightningDiT shape (bf16 [64, 256, 1152]) the one-row kernel (256-thread blocks) took
// 62.4 us, this kernel 59.5 us (2 or 4 rows, 64 or 128 threads: 59.4-59.7 us), the 4-in/2-out copy 58.2 us and
// torch.compile's kernel 60.0 us (library kernel timed standalone, H200, 2026-11-26).
constexpr int kGateRows = 2;
constexpr int kGateRowsThreads = 64;

// kAllTangents: x', gate' and y' all present (FACM's case) as a compile-time fact; with run-time presence flags the
// kernel issued 568 instructions against 392 (selects instead of fused multiply-adds, per-flag branches) and ran
// 62.0 against 59.5 us.
template <typename TX, typename TG, typename TY, int E, typename Idx, bool kAllTangents>
__global__ void __launch_bounds__(kGateRowsThreads)
    gated_residual_rows_jvp_kernel(Shape3 shape, Operand x, Operand tx, Operand gate, Operand tgate, Operand y,
                                   Operand ty, TX* __restrict__ out, TX* __restrict__ tout) {
  const bool has_tx = kAllTangents || tx.ptr != nullptr;
  const bool has_tg = kAllTangents || tgate.ptr != nullptr;
  const bool has_ty = kAllTangents || ty.ptr != nullptr;
  const Idx channels = static_cast<Idx>(shape.channels);
  const Idx vecs_per_row = channels / E;
  const Idx tokens = static_cast<Idx>(shape.tokens);
  const Idx rows = static_cast<Idx>(shape.batches) * tokens;
  const Idx total = (rows + kGateRows - 1) / kGateRows * vecs_per_row;
  for (Idx v = static_cast<Idx>(blockIdx.x) * kGateRowsThreads + threadIdx.x; v < total;
       v += static_cast<Idx>(gridDim.x) * kGateRowsThreads) {
    const Idx group = v / vecs_per_row;
    const Idx c = (v - group * vecs_per_row) * E;
    vec_io::RawVec<TX, E> x_raw[kGateRows], tx_raw[kGateRows];
    vec_io::RawVec<TY, E> y_raw[kGateRows], ty_raw[kGateRows];
#pragma unroll
    for (int r = 0; r < kGateRows; ++r) {
      const Idx row = group * kGateRows + r;
      if (row < rows) {
        const Idx offset = row * channels + c;
        x_raw[r] = vec_io::load_raw<E>(static_cast<const TX*>(x.ptr) + offset);
        y_raw[r] = vec_io::load_raw<E>(static_cast<const TY*>(y.ptr) + offset);
        if (has_tx) tx_raw[r] = vec_io::load_raw<E>(static_cast<const TX*>(tx.ptr) + offset);
        if (has_ty) ty_raw[r] = vec_io::load_raw<E>(static_cast<const TY*>(ty.ptr) + offset);
      }
    }
    float gv[E], tgv[E];
    Idx loaded_b = ~Idx(0);
#pragma unroll
    for (int r = 0; r < kGateRows; ++r) {
      const Idx row = group * kGateRows + r;
      if (row < rows) {
        const Idx b = row / tokens;
        if (b != loaded_b) {
          load<E, true>(static_cast<const TG*>(gate.ptr) + (b * gate.stride_b + c), gv);
          if (has_tg) load<E, true>(static_cast<const TG*>(tgate.ptr) + (b * tgate.stride_b + c), tgv);
          loaded_b = b;
        }
        float xv[E], yv[E], txv[E], tyv[E], o[E], to[E];
        vec_io::unpack(x_raw[r], xv);
        vec_io::unpack(y_raw[r], yv);
        if (has_tx) vec_io::unpack(tx_raw[r], txv);
        if (has_ty) vec_io::unpack(ty_raw[r], tyv);
#pragma unroll
        for (int i = 0; i < E; ++i) {
          o[i] = xv[i] + gv[i] * yv[i];
          to[i] = has_tx ? txv[i] : 0.0f;
          if (has_tg) to[i] += tgv[i] * yv[i];
          if (has_ty) to[i] += gv[i] * tyv[i];
        }
        const Idx offset = row * channels + c;
        store<E, true>(out + offset, o);
        store<E, true>(tout + offset, to);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------- host side
bool vector_ok(const Shape3& shape, int width, std::initializer_list<Operand> operands,
               std::initializer_list<const void*> outputs) {
  if (shape.channels % width != 0) return false;
  for (const Operand& op : operands) {
    if (op.ptr == nullptr) continue;
    if (!vec_io::aligned16(op.ptr) || op.stride_b % width != 0 || op.stride_t % width != 0) return false;
  }
  for (const void* p : outputs) {
    if (!vec_io::aligned16(p)) return false;
  }
  return true;
}

bool needs_64bit_index(const Shape3& shape) {
  return shape.batches * shape.tokens * shape.channels > static_cast<int64_t>(INT32_MAX);
}

// Launches `kernel` over work_items grid-stride steps, one thread per step (vec_io::covering_blocks).
template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), int64_t work_items, cudaStream_t stream, Args&&... args) {
  if (work_items <= 0) return cudaSuccess;
  const int64_t blocks = vec_io::covering_blocks(work_items, kThreads);
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

// Calls f(width, aligned, idx) with the compile-time vector width (or 1 for the element path) and index type.
template <int kWidth, typename F>
void with_layout(bool aligned, bool wide_index, F&& f) {
  auto pick_index = [&](auto width, auto aligned_tag) {
    if (wide_index) {
      f(width, aligned_tag, Tag<uint64_t>{});
    } else {
      f(width, aligned_tag, Tag<uint32_t>{});
    }
  };
  if (aligned) {
    pick_index(std::integral_constant<int, kWidth>{}, std::true_type{});
  } else {
    pick_index(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

// Every present operand laid out like the contiguous outputs (see Site).
bool dense_like_output(const Shape3& shape, std::initializer_list<Operand> operands) {
  for (const Operand& op : operands) {
    if (op.ptr == nullptr) continue;
    if (shape.tokens > 1 && op.stride_t != shape.channels) return false;
    if (shape.batches > 1 && op.stride_b != shape.tokens * shape.channels) return false;
  }
  return true;
}

int64_t work_items(const Shape3& shape, int width) { return shape.batches * shape.tokens * (shape.channels / width); }

}  // namespace

cudaError_t launch_gelu_jvp(Shape3 shape, Operand x, Operand tx, void* out, void* tout, bool tanh_form,
                            cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_dtype(x.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kWidth = kVecWidth<T>;
    const bool aligned = vector_ok(shape, kWidth, {x, tx}, {out, tout});
    with_layout<kWidth>(aligned, needs_64bit_index(shape), [&](auto width, auto aligned_tag, auto idx_tag) {
      constexpr int E = decltype(width)::value;
      using Idx = typename decltype(idx_tag)::type;
      with_bool(dense_like_output(shape, {x, tx}), [&](auto dense) {
        with_bool(tx.ptr != nullptr, [&](auto tangent) {
          with_bool(tanh_form, [&](auto tanh_tag) {
            err = launch(gelu_jvp_kernel<T, E, decltype(aligned_tag)::value, Idx, decltype(dense)::value,
                                         decltype(tangent)::value, decltype(tanh_tag)::value>,
                         work_items(shape, E), stream, shape, x, tx, static_cast<T*>(out), static_cast<T*>(tout));
          });
        });
      });
    });
  });
  return err;
}

cudaError_t launch_silu_jvp(Shape3 shape, Operand x, Operand tx, void* out, void* tout, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_dtype(x.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kWidth = kVecWidth<T>;
    const bool aligned = vector_ok(shape, kWidth, {x, tx}, {out, tout});
    with_layout<kWidth>(aligned, needs_64bit_index(shape), [&](auto width, auto aligned_tag, auto idx_tag) {
      constexpr int E = decltype(width)::value;
      using Idx = typename decltype(idx_tag)::type;
      with_bool(dense_like_output(shape, {x, tx}), [&](auto dense) {
        with_bool(tx.ptr != nullptr, [&](auto tangent) {
          err = launch(silu_jvp_kernel<T, E, decltype(aligned_tag)::value, Idx, decltype(dense)::value,
                                       decltype(tangent)::value>,
                       work_items(shape, E), stream, shape, x, tx, static_cast<T*>(out), static_cast<T*>(tout));
        });
      });
    });
  });
  return err;
}

cudaError_t launch_swiglu_jvp(Shape3 shape, Operand a, Operand ta, Operand b, Operand tb, void* out, void* tout,
                              cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_dtype(a.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kWidth = kVecWidth<T>;
    const bool aligned = vector_ok(shape, kWidth, {a, ta, b, tb}, {out, tout});
    with_layout<kWidth>(aligned, needs_64bit_index(shape), [&](auto width, auto aligned_tag, auto idx_tag) {
      constexpr int E = decltype(width)::value;
      using Idx = typename decltype(idx_tag)::type;
      with_bool(ta.ptr != nullptr, [&](auto tangent_a) {
        with_bool(tb.ptr != nullptr, [&](auto tangent_b) {
          err = launch(swiglu_jvp_kernel<T, E, decltype(aligned_tag)::value, Idx, decltype(tangent_a)::value,
                                         decltype(tangent_b)::value>,
                       work_items(shape, E), stream, shape, a, ta, b, tb, static_cast<T*>(out),
                       static_cast<T*>(tout));
        });
      });
    });
  });
  return err;
}

bool gated_residual_supported(DType x, DType gate, DType y) {
  if (x == y) return gate == x || gate == DType::kFloat32;        // one dtype, or an fp32 gate
  if (x == DType::kFloat32) return gate == DType::kFloat32 || gate == y;  // fp32 residual stream (Wan)
  return false;
}

namespace {
template <typename TX, typename TG, typename TY>
cudaError_t launch_gated_typed(Shape3 shape, Operand x, Operand tx, Operand gate, Operand tgate, Operand y,
                               Operand ty, void* out, void* tout, cudaStream_t stream) {
  constexpr int kWidth = kVecWidth<TX, TG, TY>;
  const bool aligned = vector_ok(shape, kWidth, {x, tx, gate, tgate, y, ty}, {out, tout});
  cudaError_t err = cudaSuccess;
  const bool dense_operands = dense_like_output(shape, {x, tx, y, ty});
  const bool gate_broadcast = (shape.tokens == 1 || gate.stride_t == 0) &&
                              (tgate.ptr == nullptr || shape.tokens == 1 || tgate.stride_t == 0);
  if (aligned && dense_operands && gate_broadcast) {
    const int64_t rows = shape.batches * shape.tokens;
    const int64_t work = (rows + kGateRows - 1) / kGateRows * (shape.channels / kWidth);
    const int64_t blocks = vec_io::covering_blocks(work, kGateRowsThreads);
    auto go = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kGateRowsThreads, 0, stream>>>(shape, x, tx, gate, tgate, y, ty,
                                                                             static_cast<TX*>(out),
                                                                             static_cast<TX*>(tout));
    };
    const bool wide = needs_64bit_index(shape) || work + blocks * kGateRowsThreads > static_cast<int64_t>(INT32_MAX);
    with_bool(tx.ptr != nullptr && tgate.ptr != nullptr && ty.ptr != nullptr, [&](auto all_tangents) {
      if (wide) {
        go(gated_residual_rows_jvp_kernel<TX, TG, TY, kWidth, uint64_t, decltype(all_tangents)::value>);
      } else {
        go(gated_residual_rows_jvp_kernel<TX, TG, TY, kWidth, uint32_t, decltype(all_tangents)::value>);
      }
    });
    return cudaGetLastError();
  }
  with_layout<kWidth>(aligned, needs_64bit_index(shape), [&](auto width, auto aligned_tag, auto idx_tag) {
    constexpr int E = decltype(width)::value;
    using Idx = typename decltype(idx_tag)::type;
    with_bool(dense_operands, [&](auto dense) {
      err = launch(gated_residual_jvp_kernel<TX, TG, TY, E, decltype(aligned_tag)::value, Idx, decltype(dense)::value>,
                   work_items(shape, E), stream, shape, x, tx, gate, tgate, y, ty, static_cast<TX*>(out),
                   static_cast<TX*>(tout));
    });
  });
  return err;
}
}  // namespace

cudaError_t launch_gated_residual_jvp(Shape3 shape, Operand x, Operand tx, Operand gate, Operand tgate, Operand y,
                                      Operand ty, void* out, void* tout, cudaStream_t stream) {
  if (!gated_residual_supported(x.dtype, gate.dtype, y.dtype)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  with_dtype(x.dtype, [&](auto x_tag) {
    with_dtype(gate.dtype, [&](auto g_tag) {
      with_dtype(y.dtype, [&](auto y_tag) {
        using TX = typename decltype(x_tag)::type;
        using TG = typename decltype(g_tag)::type;
        using TY = typename decltype(y_tag)::type;
        // Only the supported combinations are instantiated (checked above at run time, mirrored here).
        constexpr bool kSameXY = std::is_same_v<TX, TY>;
        constexpr bool kSupported =
            kSameXY ? (std::is_same_v<TG, TX> || std::is_same_v<TG, float>)
                    : (std::is_same_v<TX, float> && (std::is_same_v<TG, float> || std::is_same_v<TG, TY>));
        if constexpr (kSupported) {
          err = launch_gated_typed<TX, TG, TY>(shape, x, tx, gate, tgate, y, ty, out, tout, stream);
        }
      });
    });
  });
  return err;
}

}  // namespace facm_ext::pointwise
