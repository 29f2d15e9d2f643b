// Schema and CUDA implementation of facm_ext::rope_jvp_cuda (see rope_jvp.h). The Python op
// (facm_ext/ops/rope.py) validates arguments, converts the tables to fp32 and calls this; its fake implementation
// is registered from Python. x may be any strided view with a unit channel stride (else it is copied contiguous);
// outputs are contiguous in x's logical layout.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rope_bindings_common.h"
#include "rope_jvp.h"

namespace facm_ext::rope {
namespace {

constexpr const char* kOp = "rope_jvp_cuda";

std::tuple<at::Tensor, at::Tensor> rope_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& tx,
                                                 const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                                                 c10::string_view layout) {
  RopeArgs args;
  RopeOperands keep;
  const bool tokens_first = prepare_rope_args(kOp, x, tx, cos, sin, interleaved, layout, args, keep);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor tout = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return {out, tout};
  set_outputs(args, out, tout, tokens_first);
  const cudaError_t err = launch_rope_jvp(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, tout};
}

}  // namespace
}  // namespace facm_ext::rope

TORCH_LIBRARY_FRAGMENT(facm_ext, m) {
  m.def("rope_jvp_cuda(Tensor x, Tensor? tx, Tensor cos, Tensor sin, bool interleaved, str layout) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(facm_ext, CUDA, m) { m.impl("rope_jvp_cuda", &facm_ext::rope::rope_jvp_cuda); }
