// torch op facm_ext::adaln_block_jvp_cuda: the JVP (primal and tangent) of one adaLN-Zero transformer block (DiT,
// LightningDiT) without autograd, as one op issued from C++.
//
// Why: facm_ext.jvp's fused rule for such a block (facm_ext/jvp/_blocks.py) runs about 37 kernels per block, each
// launched from Python through the transform, an op wrapper and its checks: at LightningDiT-XL/1, B=16, the host
// needs longer to issue them (53-86 ms per JVP, depending on the CPU) than the GPU to run them (23 ms). This op runs
// the same sequence of kernels -- the same kernel ops, cuBLAS GEMMs and casts, in the same order and dtypes -- from
// C++, so one block costs one Python call. The transform takes this path only where the per-op path would run
// exactly these kernels (facm_ext/jvp/_blocks.py, _native_block_call): CUDA, 16-bit compute, the CUDA attention
// kernel for the head dim, verified attention and MLP modules. The op records no autograd graph; with grad, the
// transform takes the primal from the block's own forward and the tangent from this op. One difference: the MLP runs as cuBLAS up
// + activation kernel + cuBLAS down, where the per-op path's mlp_jvp fuses the activation into a Triton GEMM (the
// up-projection is rounded to the compute dtype before the activation here, as in a plain autocast forward).
//
//   mod  = Linear_ada(SiLU(c)) -> [B, 6C], widened to fp32 when x is fp32 and mod 16-bit; chunks shift/scale/gate
//   h    = norm1(x) * (1 + scale_msa) + shift_msa                              (norm_modulate_jvp_cuda)
//   qkv  = Linear_qkv(h) -> q, k, v [B, L, H, D] slices
//   q, k = rope(rms_norm(q)), rope(rms_norm(k))                                 (rms_norm_rope_jvp_cuda; optional)
//   o    = attention(q, k, v) [B, H, L, D] -> [B, L, C]                          (attention_jvp_cuda)
//   x    = x + gate_msa * Linear_proj(o)                                         (gated_residual_jvp_cuda)
//   h    = norm2(x) * (1 + scale_mlp) + shift_mlp
//   x    = x + gate_mlp * fc2(act(fc1(h)))                 act: gelu (tanh) or swiglu (silu(first half) * second)
//
// Every Linear casts like F.linear under autocast (fp16/bf16/fp32 operands to autocast_dtype when given); the
// norms take x in norm_dtype, compute in fp32 and write attn_input_dtype / mlp_input_dtype (the 16-bit dtype the
// Linear after them casts to) when given, else norm_dtype.
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/silu.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/format.h"
#include "common/kernel_ops.h"

namespace facm_ext::blocks {
namespace {

constexpr const char* kOp = "adaln_block_jvp_cuda";

using OptTensor = std::optional<at::Tensor>;
using OptDtype = std::optional<at::ScalarType>;

// A value and its tangent (nullopt: zero).
struct Dual {
  at::Tensor primal;
  OptTensor tangent;
};

bool castable_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// autocast's cast of an F.linear / SDPA operand: fp16/bf16/fp32 to the autocast dtype.
at::Tensor lower(const at::Tensor& t, OptDtype autocast_dtype) {
  if (!autocast_dtype || t.scalar_type() == *autocast_dtype || !castable_float(t.scalar_type())) return t;
  return t.to(*autocast_dtype);
}

OptTensor lower(const OptTensor& t, OptDtype autocast_dtype) {
  if (!t) return t;
  return lower(*t, autocast_dtype);
}

at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// The norm kernel reads rows with a unit channel stride; other views are copied first (as the Python op does).
at::Tensor channels_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

OptTensor cast(const OptTensor& t, at::ScalarType dtype) {
  if (!t) return t;
  return cast(*t, dtype);
}

template <class F>
OptTensor map(const OptTensor& t, F&& fn) {
  if (!t) return t;
  return fn(*t);
}

// facm_ext.ops.linear_jvp: two GEMMs (the bias on the primal only) after the autocast casts.
Dual linear(const Dual& x, const at::Tensor& weight, const OptTensor& bias, OptDtype autocast_dtype) {
  const at::Tensor w = lower(weight, autocast_dtype);
  const OptTensor b = lower(bias, autocast_dtype);
  Dual out{at::linear(lower(x.primal, autocast_dtype), w, b), std::nullopt};
  if (x.tangent) out.tangent = at::linear(lower(*x.tangent, autocast_dtype), w);
  return out;
}

// The adaLN modulation chunks [B, C] as the norm kernel reads them: [B, L, C] views with a zero token stride.
OptTensor tokenwise(const OptTensor& m, at::ScalarType dtype, at::IntArrayRef shape) {
  return map(m, [&](const at::Tensor& t) { return cast(t.unsqueeze(1), dtype).expand(shape); });
}

// The block rule's _adaln + facm_ext.ops.adaln_jvp's kernel path: norm(x) * weight * (1 + scale) + shift.
Dual adaln(const Dual& x_in, const Dual& shift, const Dual& scale, int64_t norm, const OptTensor& weight, double eps,
           at::ScalarType norm_dtype, OptDtype out_dtype) {
  const at::Tensor x = channels_contiguous(cast(x_in.primal, norm_dtype));
  const OptTensor tx = map(cast(x_in.tangent, norm_dtype), channels_contiguous);
  // The weight in x's dtype (the rule's cast), then as the kernel reads it: fp32, contiguous.
  const OptTensor w = map(weight, [&](const at::Tensor& t) {
    return cast(t, x.scalar_type()).to(at::kFloat).contiguous();
  });
  // The modulation goes in x's dtype, or in fp32 when any of it has another dtype (the kernel takes those two).
  at::ScalarType mod_dtype = x.scalar_type();
  for (const OptTensor& m : {OptTensor(shift.primal), shift.tangent, OptTensor(scale.primal), scale.tangent}) {
    if (m && m->scalar_type() != x.scalar_type()) mod_dtype = at::kFloat;
  }
  const at::IntArrayRef shape = x.sizes();
  auto [y, ty, mean, rstd] = norms::norm_modulate_jvp_cuda(
      x, tx, w, std::nullopt, tokenwise(shift.primal, mod_dtype, shape), tokenwise(shift.tangent, mod_dtype, shape),
      tokenwise(scale.primal, mod_dtype, shape), tokenwise(scale.tangent, mod_dtype, shape), norm, eps, out_dtype);
  return {y, ty};
}

// The block rule's _gated + facm_ext.ops.gated_residual_jvp: x + gate * y (gate [B, C] over the tokens).
Dual gated(const Dual& x, const Dual& gate, const Dual& y) {
  auto [out, tout] = pointwise::gated_residual_jvp_cuda(
      x.primal, x.tangent, gate.primal.unsqueeze(1),
      map(gate.tangent, [](const at::Tensor& t) { return t.unsqueeze(1); }), y.primal, y.tangent);
  const at::ScalarType dtype = c10::promoteTypes(c10::promoteTypes(x.primal.scalar_type(), gate.primal.scalar_type()),
                                                 y.primal.scalar_type());
  if (out.scalar_type() != dtype) return {out.to(dtype), tout.to(dtype)};
  return {out, tout};
}

// The chunks of a dual along dim, each a dual of views (the tangent's chunks nullopt without a tangent).
std::vector<Dual> chunks(const Dual& d, int64_t count, int64_t dim) {
  const std::vector<at::Tensor> primal = d.primal.chunk(count, dim);
  const std::vector<at::Tensor> tangent = d.tangent ? d.tangent->chunk(count, dim) : std::vector<at::Tensor>();
  std::vector<Dual> out;
  out.reserve(primal.size());
  for (size_t i = 0; i < primal.size(); ++i) {
    out.push_back({primal[i], d.tangent ? OptTensor(tangent[i]) : std::nullopt});
  }
  return out;
}

// The attention module rule (_attention_forward): qkv, optional qk RMSNorm + RoPE, attention, proj.
Dual attention(const Dual& h, const at::Tensor& qkv_weight, const OptTensor& qkv_bias, int64_t heads,
               const OptTensor& q_norm_weight, const OptTensor& k_norm_weight, double q_norm_eps, double k_norm_eps,
               const OptTensor& rope_cos, const OptTensor& rope_sin, bool rope_interleaved,
               const at::Tensor& proj_weight, const OptTensor& proj_bias, OptDtype autocast_dtype) {
  const int64_t batch = h.primal.size(0), tokens = h.primal.size(1), channels = h.primal.size(2);
  const int64_t head_dim = channels / heads;
  const Dual qkv = linear(h, qkv_weight, qkv_bias, autocast_dtype);
  const auto heads_view = [&](const at::Tensor& t) { return t.reshape({batch, tokens, 3, heads, head_dim}); };
  const std::vector<at::Tensor> qkv_p = heads_view(qkv.primal).unbind(2);
  const std::vector<at::Tensor> qkv_t = qkv.tangent ? heads_view(*qkv.tangent).unbind(2) : std::vector<at::Tensor>();
  const auto slice = [&](size_t i) { return Dual{qkv_p[i], qkv.tangent ? OptTensor(qkv_t[i]) : std::nullopt}; };
  Dual q = slice(0), k = slice(1);
  const Dual v = slice(2);
  if (rope_cos) {
    // q_norm / k_norm and RoPE on the [B, L, H, D] slices, read in place; outputs in that order.
    const at::Tensor cos = rope_cos->to(at::kFloat), sin = rope_sin->to(at::kFloat);
    const auto norm_rope = [&](const Dual& x, const OptTensor& weight, double eps) {
      const OptTensor w = map(weight, [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); });
      auto [out, tout, rstd] = rope::rms_norm_rope_jvp_cuda(x.primal, x.tangent, w, eps, cos, sin, rope_interleaved,
                                                            "BLHD");
      return Dual{out, tout};
    };
    q = norm_rope(q, q_norm_weight, q_norm_eps);
    k = norm_rope(k, k_norm_weight, k_norm_eps);
  }
  const auto heads_first = [](const at::Tensor& t) { return t.transpose(1, 2); };
  const auto sdpa_operand = [&](const Dual& d) {
    return Dual{lower(heads_first(d.primal), autocast_dtype),
                lower(map(d.tangent, heads_first), autocast_dtype)};
  };
  const Dual qh = sdpa_operand(q), kh = sdpa_operand(k), vh = sdpa_operand(v);
  auto [o, to, lse] = attention::attention_jvp_cuda(qh.primal, kh.primal, vh.primal, qh.tangent, kh.tangent,
                                                    vh.tangent, std::nullopt,
                                                    1.0 / std::sqrt(static_cast<double>(qh.primal.size(3))));
  const auto tokens_first = [&](const at::Tensor& t) { return t.transpose(1, 2).reshape({batch, tokens, channels}); };
  return linear(Dual{tokens_first(o), tokens_first(to)}, proj_weight, proj_bias, autocast_dtype);
}

// The MLP rule: fc1 -> activation -> fc2, each Linear as linear_jvp, the activation as its CUDA kernel op.
Dual mlp(const Dual& h, const at::Tensor& fc1_weight, const OptTensor& fc1_bias, const at::Tensor& fc2_weight,
         const OptTensor& fc2_bias, c10::string_view activation, OptDtype autocast_dtype) {
  const Dual up = linear(h, fc1_weight, fc1_bias, autocast_dtype);
  Dual hidden;
  if (activation == "gelu_tanh") {
    auto [out, tout] = pointwise::gelu_jvp_cuda(up.primal, up.tangent, "tanh");
    hidden = {out, tout};
  } else {
    const std::vector<Dual> halves = chunks(up, 2, -1);
    const Dual& gate = halves[0];
    const Dual& value = halves[1];
    auto [out, tout] = pointwise::swiglu_jvp_cuda(gate.primal, gate.tangent, value.primal, value.tangent);
    hidden = {out, tout};
  }
  return linear(hidden, fc2_weight, fc2_bias, autocast_dtype);
}

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), kOp, ": ", name, " must be on x's device (", x.device().str(),
              "), got ", t.device().str());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), kOp, ": ", name, " must be a floating tensor, got ",
              std::string(c10::toString(t.scalar_type())));
}

void check_tensor(const char* name, const OptTensor& t, const at::Tensor& x) {
  if (t) check_tensor(name, *t, x);
}

void check_linear(const char* name, const at::Tensor& weight, const OptTensor& bias, int64_t in, int64_t out,
                  const at::Tensor& x) {
  check_tensor(name, weight, x);
  check_tensor(name, bias, x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == out && weight.size(1) == in, kOp, ": ", name,
              " weight must be [", std::to_string(out), ", ", std::to_string(in), "], got ",
              facm_ext::dims_str(weight.sizes()));
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == out), kOp, ": ", name, " bias must be [",
              std::to_string(out), "], got ", bias ? facm_ext::dims_str(bias->sizes()) : std::string("none"));
}

std::tuple<at::Tensor, at::Tensor> adaln_block_jvp_cuda(
    const at::Tensor& x, const at::Tensor& tx, const at::Tensor& c, const OptTensor& tc,
    const at::Tensor& modulation_weight, const OptTensor& modulation_bias, int64_t norm, const OptTensor& norm1_weight,
    const OptTensor& norm2_weight, double norm1_eps, double norm2_eps, at::ScalarType norm_dtype,
    const at::Tensor& qkv_weight, const OptTensor& qkv_bias, int64_t heads, const OptTensor& q_norm_weight,
    const OptTensor& k_norm_weight, double q_norm_eps, double k_norm_eps, const OptTensor& rope_cos,
    const OptTensor& rope_sin, bool rope_interleaved, const at::Tensor& proj_weight, const OptTensor& proj_bias,
    const at::Tensor& fc1_weight, const OptTensor& fc1_bias, const at::Tensor& fc2_weight, const OptTensor& fc2_bias,
    c10::string_view activation, OptDtype autocast_dtype, OptDtype attn_input_dtype, OptDtype mlp_input_dtype) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3, kOp, ": x must be a [B, L, C] CUDA tensor, got ",
              facm_ext::dims_str(x.sizes()), " on ", x.device().str());
  const int64_t batch = x.size(0), channels = x.size(2);
  TORCH_CHECK(tx.sizes() == x.sizes() && tx.scalar_type() == x.scalar_type(), kOp,
              ": tx must have x's shape and dtype, got ", facm_ext::dims_str(tx.sizes()));
  TORCH_CHECK(c.dim() == 2 && c.size(0) == batch && c.size(1) == channels, kOp, ": c must be [B, C] = [",
              std::to_string(batch), ", ", std::to_string(channels), "], got ", facm_ext::dims_str(c.sizes()));
  TORCH_CHECK(!tc || (tc->sizes() == c.sizes() && tc->scalar_type() == c.scalar_type()), kOp,
              ": tc must have c's shape and dtype");
  check_tensor("tx", tx, x);
  check_tensor("c", c, x);
  check_tensor("tc", tc, x);
  TORCH_CHECK(norm == 1 || norm == 2, kOp, ": norm must be 1 (layer) or 2 (rms), got ", std::to_string(norm));
  check_tensor("norm1", norm1_weight, x);
  check_tensor("norm2", norm2_weight, x);
  TORCH_CHECK(heads >= 1 && channels % heads == 0, kOp, ": heads must divide C = ", std::to_string(channels),
              ", got ", std::to_string(heads));
  check_linear("modulation", modulation_weight, modulation_bias, channels, 6 * channels, x);
  check_linear("qkv", qkv_weight, qkv_bias, channels, 3 * channels, x);
  check_linear("proj", proj_weight, proj_bias, channels, channels, x);
  TORCH_CHECK(activation == "gelu_tanh" || activation == "swiglu", kOp,
              ": activation must be 'gelu_tanh' or 'swiglu', got '", std::string(activation), "'");
  TORCH_CHECK(fc1_weight.dim() == 2 && fc2_weight.dim() == 2, kOp, ": fc1 and fc2 weights must be 2-d");
  const int64_t hidden = fc2_weight.size(1);
  check_linear("fc1", fc1_weight, fc1_bias, channels, activation == "swiglu" ? 2 * hidden : hidden, x);
  check_linear("fc2", fc2_weight, fc2_bias, hidden, channels, x);
  TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(), kOp, ": rope_cos and rope_sin go together");
  TORCH_CHECK(rope_cos.has_value() || (!q_norm_weight && !k_norm_weight), kOp,
              ": q/k norm weights are taken only with RoPE tables (the fused qk RMSNorm + RoPE form)");
  check_tensor("rope_cos", rope_cos, x);
  check_tensor("rope_sin", rope_sin, x);
  check_tensor("q_norm", q_norm_weight, x);
  check_tensor("k_norm", k_norm_weight, x);

  const c10::cuda::CUDAGuard guard(x.device());
  // Every cast above is explicit, as the per-op path's op bodies run with autocast off; autograd does not record
  // (the outputs carry no graph: with grad, the transform keeps only the tangent and takes the primal from the
  // block's own forward).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::AutoDispatchBelowADInplaceOrView no_autograd;

  Dual modulation;
  {
    OptTensor silu_tangent;
    at::Tensor silu;
    if (tc) {
      auto [s, ts] = pointwise::silu_jvp_cuda(c, tc);
      silu = s;
      silu_tangent = ts;
    } else {
      silu = at::silu(c);
    }
    modulation = linear(Dual{silu, silu_tangent}, modulation_weight, modulation_bias, autocast_dtype);
  }
  if (x.scalar_type() == at::kFloat &&
      (modulation.primal.scalar_type() == at::kBFloat16 || modulation.primal.scalar_type() == at::kHalf)) {
    modulation = {modulation.primal.to(at::kFloat), cast(modulation.tangent, at::kFloat)};
  }
  const std::vector<Dual> mods = chunks(modulation, 6, 1);
  const Dual &shift_msa = mods[0], &scale_msa = mods[1], &gate_msa = mods[2];
  const Dual &shift_mlp = mods[3], &scale_mlp = mods[4], &gate_mlp = mods[5];

  Dual stream{x, tx};
  const Dual attn_in = adaln(stream, shift_msa, scale_msa, norm, norm1_weight, norm1_eps, norm_dtype, attn_input_dtype);
  const Dual attn_out = attention(attn_in, qkv_weight, qkv_bias, heads, q_norm_weight, k_norm_weight, q_norm_eps,
                                  k_norm_eps, rope_cos, rope_sin, rope_interleaved, proj_weight, proj_bias,
                                  autocast_dtype);
  stream = gated(stream, gate_msa, attn_out);
  const Dual mlp_in = adaln(stream, shift_mlp, scale_mlp, norm, norm2_weight, norm2_eps, norm_dtype, mlp_input_dtype);
  const Dual mlp_out = mlp(mlp_in, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, autocast_dtype);
  stream = gated(stream, gate_mlp, mlp_out);
  return {stream.primal, *stream.tangent};
}

}  // namespace
}  // namespace facm_ext::blocks

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def(
      "adaln_block_jvp_cuda(Tensor x, Tensor tx, Tensor c, Tensor? tc, Tensor modulation_weight, "
      "Tensor? modulation_bias, int norm, Tensor? norm1_weight, Tensor? norm2_weight, float norm1_eps, "
      "float norm2_eps, ScalarType norm_dtype, Tensor qkv_weight, Tensor? qkv_bias, int heads, "
      "Tensor? q_norm_weight, Tensor? k_norm_weight, float q_norm_eps, float k_norm_eps, Tensor? rope_cos, "
      "Tensor? rope_sin, bool rope_interleaved, Tensor proj_weight, Tensor? proj_bias, Tensor fc1_weight, "
      "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, str activation, ScalarType? autocast_dtype, "
      "ScalarType? attn_input_dtype, ScalarType? mlp_input_dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) { m.impl("adaln_block_jvp_cuda", &facm_ext::blocks::adaln_block_jvp_cuda); }
