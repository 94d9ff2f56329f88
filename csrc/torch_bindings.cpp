// Every schema of moe_kernels._C in one place. The ops join the `moe_kernels` namespace that the
// Python package defines (hence a FRAGMENT); their fake implementations are registered in Python
// (moe_kernels/_cuda.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(moe_kernels, m) {
  // Slots per expert: topk_ids [T, k] (int8/int16/int32/int64/uint8) -> [E] int32; ids outside [0, E) are not counted.
  m.def("expert_counts_cuda(Tensor topk_ids, int num_experts) -> Tensor");
  // Top-k gating, one warp per token: logits [T, E] (E <= 1024) -> (weights [T, k] fp32, ids [T, k] int32);
  // scoring softmax | sigmoid | sqrtsoftplus; a group's score sums its group_n best selection scores.
  m.def(
      "topk_gating_cuda(Tensor logits, Tensor? correction_bias, int top_k, str scoring, bool renormalize, "
      "int num_groups, int topk_groups, float scaling_factor, int group_n) -> (Tensor, Tensor)");
  // Routing plan, a stable counting sort by expert (E <= 1024, no host sync): topk_ids [T, k] (any int dtype) ->
  // (sorted_slots [P], expert_offsets [E+1], tokens_per_expert [E], slot_to_row [T*k]), all int32.
  m.def(
      "plan_routing_cuda(Tensor topk_ids, int num_experts, int block_size, int? capacity, Tensor? expert_map) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // Gather into expert order: x [T, H] -> [P, H], row r = w[slot] * x[slot // k] (zero for padding).
  m.def("permute_cuda(Tensor x, Tensor sorted_slots, Tensor slot_to_row, int top_k, Tensor? row_weights) -> Tensor");
  // Weighted combine back to token order: y_sorted [P, N] -> [T, N], fp32 accumulation, j ascending.
  m.def(
      "unpermute_cuda(Tensor y_sorted, Tensor sorted_slots, Tensor slot_to_row, int top_k, Tensor? topk_weights) -> "
      "Tensor");
  // Routing-weight gradient: [T, k] fp32 dot products of each kept slot's row with its token's row.
  m.def("slot_dots_cuda(Tensor rows, Tensor slot_to_row, Tensor per_token, int top_k) -> Tensor");
  // Decode grouped GEMM: each expert's weight streamed once against its (few) rows. gather_top_k > 0 reads
  // row r from x[sorted_slots[r] / k]; gated writes act(gate) * up; row_weights scale the input rows
  // (scale_input) or the outputs; scatter_slots > 0 writes row r at its slot.
  m.def(
      "grouped_gemm_small_cuda(Tensor x, Tensor w, Tensor expert_offsets, Tensor? bias, Tensor? sorted_slots, "
      "int gather_top_k, str activation, bool gated, Tensor? row_weights, bool scale_input, int scatter_slots) -> Tensor");
  // Decode grouped GEMM with quantized weights (fp8, int8, int4, mxfp4), dequantized in registers; flags as above.
  // act_mode group | token | tensor | static quantizes fp8 inputs with act_scale (amax values, or the static scale)
  // per row (the routed row when act_by_routed_row) and group of act_group columns; none leaves them as they are.
  m.def(
      "grouped_gemm_small_quant_cuda(Tensor x, Tensor w, str fmt, Tensor w_scale, Tensor? w_zero, int block_n, "
      "int block_k, Tensor expert_offsets, Tensor? bias, Tensor? sorted_slots, int gather_top_k, str activation, "
      "bool gated, Tensor? row_weights, bool scale_input, int scatter_slots, str act_mode, Tensor? act_scale, "
      "int act_group, bool act_by_routed_row) -> Tensor");
  // Amax of the rows a decode GEMM reads: [rows, ceil(K/group)] fp32 per group, or [1] over everything (per_tensor).
  m.def("act_amax_cuda(Tensor x, Tensor? sorted_slots, int top_k, Tensor? row_weights, int group, bool per_tensor) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("expert_counts_cuda", &moe_kernels::expert_counts_cuda);
  m.impl("topk_gating_cuda", &moe_kernels::topk_gating_cuda);
  m.impl("plan_routing_cuda", &moe_kernels::plan_routing_cuda);
  m.impl("permute_cuda", &moe_kernels::permute_cuda);
  m.impl("unpermute_cuda", &moe_kernels::unpermute_cuda);
  m.impl("slot_dots_cuda", &moe_kernels::slot_dots_cuda);
  m.impl("grouped_gemm_small_cuda", &moe_kernels::grouped_gemm_small_cuda);
  m.impl("grouped_gemm_small_quant_cuda", &moe_kernels::grouped_gemm_small_quant_cuda);
  m.impl("act_amax_cuda", &moe_kernels::act_amax_cuda);
}

// Importing moe_kernels._C registers the ops above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
