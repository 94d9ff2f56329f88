// Torch-facing launchers of the CUDA kernels; schemas live in torch_bindings.cpp.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <torch/library.h>

namespace moe_kernels {

// topk_ids [T, k] int8/int16/int32/int64/uint8 on CUDA -> counts [E] int32 (ids outside [0, E) not counted).
at::Tensor expert_counts_cuda(const at::Tensor& topk_ids, int64_t num_experts);

// logits [T, E] fp32/fp16/bf16 -> (topk_weights [T, k] fp32, topk_ids [T, k] int32); E <= 1024, num_groups <= 32.
std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                    int64_t top_k, const std::string& scoring, bool renormalize,
                                                    int64_t num_groups, int64_t topk_groups, double scaling_factor,
                                                    int64_t group_n);

// topk_ids [T, k] int8/int16/int32/int64/uint8 -> (sorted_slots [P], expert_offsets [E+1], tokens_per_expert [E], slot_to_row [T*k]),
// all int32, P = T*k + E*(block_size-1); E <= 1024. As moe_kernels.reference.plan_routing, with no host sync.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_routing_cuda(const at::Tensor& topk_ids,
                                                                             int64_t num_experts, int64_t block_size,
                                                                             std::optional<int64_t> capacity,
                                                                             const std::optional<at::Tensor>& expert_map);

// x [T, H] fp32/fp16/bf16 -> [P, H]: row r = w[slot] * x[slot / k] for slot = sorted_slots[r], zero for -1.
// slot_to_row is unused (the signature matches unpermute's); row_weights [T, k] (any float dtype) or none.
at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& slot_to_row,
                        int64_t top_k, const std::optional<at::Tensor>& row_weights);

// y_sorted [P, N] -> [T, N]: y[t] = sum_j w[t, j] * y_sorted[slot_to_row[t*k + j]] over kept slots, fp32, j ascending.
at::Tensor unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& sorted_slots, const at::Tensor& slot_to_row,
                          int64_t top_k, const std::optional<at::Tensor>& topk_weights);

// rows [P, N], per_token [T, N] -> [T, k] fp32: <rows[slot_to_row[t*k + j]], per_token[t]>, 0 for dropped slots.
at::Tensor slot_dots_cuda(const at::Tensor& rows, const at::Tensor& slot_to_row, const at::Tensor& per_token,
                          int64_t top_k);

// Small-batch (decode) grouped GEMM, every weight element read once: x [rows, K], w [E, N(*2 if gated), K]
// (K contiguous) -> [P, N] in expert order, or [scatter_slots, N] in slot order. Flags as the Triton kernel.
at::Tensor grouped_gemm_small_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& sorted_slots,
                                   int64_t gather_top_k, const std::string& activation, bool gated,
                                   const std::optional<at::Tensor>& row_weights, bool scale_input,
                                   int64_t scatter_slots);

// The decode GEMM with quantized weights w (fmt fp8 | fp8_e5m2 | int8 | int4 | mxfp4; packed bytes, K contiguous),
// scales w_scale (fp32 [E, NB, KB] blocks of block_n x block_k, or uint8 e8m0 for mxfp4) and int4 zero points;
// flags as grouped_gemm_small_cuda. fp8 act_mode group | token | tensor | static quantizes the input rows with the
// scales act_scale (amax values from act_amax_cuda, or the static scale); none reads them unquantized.
at::Tensor grouped_gemm_small_quant_cuda(const at::Tensor& x, const at::Tensor& w, const std::string& fmt,
                                         const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero,
                                         int64_t block_n, int64_t block_k, const at::Tensor& expert_offsets,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& sorted_slots, int64_t gather_top_k,
                                         const std::string& activation, bool gated,
                                         const std::optional<at::Tensor>& row_weights, bool scale_input,
                                         int64_t scatter_slots, const std::string& act_mode,
                                         const std::optional<at::Tensor>& act_scale, int64_t act_group,
                                         bool act_by_routed_row);

// Amax of each row's groups of `group` columns -> [rows, ceil(K/group)] fp32, or of everything (per_tensor) -> [1];
// rows gathered as the decode GEMM reads them (sorted_slots / top_k, scaled by row_weights and rounded).
at::Tensor act_amax_cuda(const at::Tensor& x, const std::optional<at::Tensor>& sorted_slots, int64_t top_k,
                         const std::optional<at::Tensor>& row_weights, int64_t group, bool per_tensor);

}  // namespace moe_kernels
