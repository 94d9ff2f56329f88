// Launcher of the routing plan (stable counting sort by expert): checks, scratch, stream, id dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels/plan.cuh"
#include "ops.h"

namespace moe_kernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_routing_cuda(const at::Tensor& topk_ids,
                                                                             int64_t num_experts, int64_t block_size,
                                                                             std::optional<int64_t> capacity,
                                                                             const std::optional<at::Tensor>& expert_map) {
  constexpr const char* fn = "plan_routing";
  TORCH_CHECK(topk_ids.is_cuda() && topk_ids.dim() == 2, fn, ": topk_ids must be a 2-D CUDA tensor [T, k], got ",
              topk_ids.sizes(), " on ", topk_ids.device());
  const auto id_type = topk_ids.scalar_type();
  TORCH_CHECK(id_type == at::kChar || id_type == at::kShort || id_type == at::kInt || id_type == at::kLong ||
                  id_type == at::kByte,
              fn, ": topk_ids must be int8, int16, int32, int64 or uint8, got ", id_type);
  TORCH_CHECK(num_experts >= 1 && num_experts <= plan::kMaxExperts, fn, ": the cuda kernel serves 1 <= E <= ",
              plan::kMaxExperts, ", got E=", num_experts);
  TORCH_CHECK(block_size >= 1, fn, ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK(!capacity.has_value() || *capacity >= 0, fn, ": capacity must be >= 0, got ", capacity.value_or(0));
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), S = T * k;
  TORCH_CHECK(block_size - 1 <= (INT32_MAX - S) / num_experts, fn, ": T*k + E*(block_size-1) overflows int32 rows (T*k=",
              S, ", E=", num_experts, ", block_size=", block_size, ")");
  const int64_t P = S + num_experts * (block_size - 1);  // < 2^31 by the check above
  const c10::cuda::CUDAGuard guard(topk_ids.device());

  at::Tensor map;
  if (expert_map.has_value()) {
    TORCH_CHECK(expert_map->device() == topk_ids.device(), fn, ": expert_map must be on ", topk_ids.device(), ", got ",
                expert_map->device());
    TORCH_CHECK(expert_map->dim() == 1 && at::isIntegralType(expert_map->scalar_type(), /*includeBool=*/false), fn,
                ": expert_map must be a 1-D integer tensor, got ", expert_map->scalar_type(), " of shape ",
                expert_map->sizes());
    map = expert_map->to(at::kLong).contiguous();
  }
  const at::Tensor ids = topk_ids.contiguous();
  const auto i32 = ids.options().dtype(at::kInt);
  at::Tensor sorted_slots = at::empty({P}, i32);
  at::Tensor offsets = at::empty({num_experts + 1}, i32);
  at::Tensor tokens = at::empty({num_experts}, i32);
  at::Tensor slot_to_row = at::empty({S}, i32);
  at::Tensor hist = at::empty({std::max<int64_t>(plan::workspace_hist(S, static_cast<int32_t>(num_experts)), 1)}, i32);
  at::Tensor rank = at::empty({capacity.has_value() ? S : 0}, i32);

  const int64_t cap = capacity.has_value() ? *capacity : -1;
  const int64_t* map_ptr = map.defined() ? map.data_ptr<int64_t>() : nullptr;
  const int64_t num_global = map.defined() ? map.numel() : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto run = [&](const auto* id_ptr) {
    return plan::plan_routing(id_ptr, T, k, static_cast<int32_t>(num_experts), block_size, cap, map_ptr,
                              map.defined(), num_global, hist.data_ptr<int32_t>(), rank.data_ptr<int32_t>(),
                              sorted_slots.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), tokens.data_ptr<int32_t>(),
                              slot_to_row.data_ptr<int32_t>(), stream);
  };
  cudaError_t err;
  switch (id_type) {
    case at::kChar: err = run(ids.data_ptr<int8_t>()); break;
    case at::kShort: err = run(ids.data_ptr<int16_t>()); break;
    case at::kInt: err = run(ids.data_ptr<int32_t>()); break;
    case at::kByte: err = run(ids.data_ptr<uint8_t>()); break;
    default: err = run(ids.data_ptr<int64_t>()); break;
  }
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA error ", cudaGetErrorString(err));
  return {sorted_slots, offsets, tokens, slot_to_row};
}

}  // namespace moe_kernels
