// The activation names of the decode GEMMs' schemas as the kernels' codes (small_gemm::Act).
#pragma once

#include <string>

#include <c10/util/Exception.h>

#include "moe_kernels/small_gemm.cuh"

namespace moe_kernels {

inline int activation_code(const std::string& a, const char* fn) {
  if (a == "none") return small_gemm::kNone;
  if (a == "silu") return small_gemm::kSilu;
  if (a == "gelu") return small_gemm::kGelu;
  if (a == "relu") return small_gemm::kRelu;
  if (a == "swiglu_oai") return small_gemm::kSwigluOai;
  TORCH_CHECK(false, fn, ": unknown activation ", a);
}

}  // namespace moe_kernels
