// Formatting of shapes and strides for error messages, by hand: on torch 2.11 (the GPU machines) a failed TORCH_CHECK
// whose message streamed an integer or a c10::IntArrayRef crashed the process (SIGSEGV) instead of raising, while
// strings and ScalarTypes were fine. Every number in a kernel-op message goes through std::to_string or dims_str.
#pragma once

#include <cstdint>
#include <string>

#include <c10/util/ArrayRef.h>

namespace facm_ext {

inline std::string dims_str(c10::IntArrayRef dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(dims[i]);
  }
  return out + "]";
}

}  // namespace facm_ext
