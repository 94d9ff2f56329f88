// Torch-facing launchers of the CUDA kernels; schemas live in torch_bindings.cpp.
#pragma once

#include <torch/library.h>

namespace moe_kernels {

// topk_ids [T, k] int32/int64 on CUDA -> counts [E] int32 (ids outside [0, E) not counted).
at::Tensor expert_counts_cuda(const at::Tensor& topk_ids, int64_t num_experts);

}  // namespace moe_kernels
