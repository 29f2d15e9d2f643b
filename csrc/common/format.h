// Formatting of shapes and strides for error messages, by hand: streaming a c10::IntArrayRef into TORCH_CHECK
// crashed (SIGSEGV) inside an extension on torch 2.11 while building the message of a failed check.
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
