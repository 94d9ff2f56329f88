// Torch-facing launchers of the CUDA kernels; schemas live in torch_bindings.cpp.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <torch/library.h>

namespace moe_kernels {

// topk_ids [T, k] int32/int64 on CUDA -> counts [E] int32 (ids outside [0, E) not counted).
at::Tensor expert_counts_cuda(const at::Tensor& topk_ids, int64_t num_experts);

// logits [T, E] fp32/fp16/bf16 -> (topk_weights [T, k] fp32, topk_ids [T, k] int32); E <= 1024, num_groups <= 32.
std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                    int64_t top_k, const std::string& scoring, bool renormalize,
                                                    int64_t num_groups, int64_t topk_groups, double scaling_factor);

}  // namespace moe_kernels
