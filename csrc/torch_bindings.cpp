// Every schema of moe_kernels._C in one place. The ops join the `moe_kernels` namespace that the
// Python package defines (hence a FRAGMENT); their fake implementations are registered in Python
// (moe_kernels/_cuda.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(moe_kernels, m) {
  // Slots per expert: topk_ids [T, k] int32/int64 -> [E] int32; ids outside [0, E) are not counted.
  m.def("expert_counts_cuda(Tensor topk_ids, int num_experts) -> Tensor");
  // Top-k gating, one warp per token: logits [T, E] (E <= 1024) -> (weights [T, k] fp32, ids [T, k] int32).
  m.def(
      "topk_gating_cuda(Tensor logits, Tensor? correction_bias, int top_k, str scoring, bool renormalize, "
      "int num_groups, int topk_groups, float scaling_factor) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("expert_counts_cuda", &moe_kernels::expert_counts_cuda);
  m.impl("topk_gating_cuda", &moe_kernels::topk_gating_cuda);
}

// Importing moe_kernels._C registers the ops above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
