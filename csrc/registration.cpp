// Owns the facm_ext operator namespace. Kernel families add their schemas with TORCH_LIBRARY_FRAGMENT in their own
// *_bindings.cpp (compiled only in CUDA builds), so a CPU-only build still defines this namespace and build_info.
#include <string>

#include <torch/library.h>

#ifndef FACM_EXT_CUDA_ARCHS
#define FACM_EXT_CUDA_ARCHS ""
#endif

namespace facm_ext {

// "cuda=1;archs=8.0;9.0+PTX" or "cuda=0;archs=" -- parsed by facm_ext/_extension.py.
std::string build_info() {
#ifdef FACM_EXT_WITH_CUDA
  return std::string("cuda=1;archs=") + FACM_EXT_CUDA_ARCHS;
#else
  return std::string("cuda=0;archs=");
#endif
}

}  // namespace facm_ext

TORCH_LIBRARY(facm_ext, m) { m.def("build_info() -> str", &facm_ext::build_info); }
