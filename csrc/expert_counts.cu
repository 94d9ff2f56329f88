// Launcher of the per-expert histogram: checks, stream, dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels/expert_counts.cuh"
#include "ops.h"

namespace moe_kernels {

at::Tensor expert_counts_cuda(const at::Tensor& topk_ids, int64_t num_experts) {
  TORCH_CHECK(topk_ids.is_cuda(), "expert_counts: topk_ids must be a CUDA tensor, got ", topk_ids.device());
  TORCH_CHECK(topk_ids.dim() == 2, "expert_counts: topk_ids must be 2-D [T, k], got ", topk_ids.sizes());
  const auto id_type = topk_ids.scalar_type();
  TORCH_CHECK(id_type == at::kChar || id_type == at::kShort || id_type == at::kInt || id_type == at::kLong ||
                  id_type == at::kByte,
              "expert_counts: topk_ids must be int8, int16, int32, int64 or uint8, got ", id_type);
  TORCH_CHECK(num_experts >= 1 && num_experts <= 12288, "expert_counts: num_experts must be in [1, 12288], got ",
              num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, ids.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ids.get_device());
  const auto run = [&](const auto* id_ptr) {
    return expert_counts(id_ptr, ids.numel(), static_cast<int32_t>(num_experts), counts.data_ptr<int32_t>(), sms,
                         stream);
  };
  cudaError_t err;
  switch (id_type) {
    case at::kChar: err = run(ids.data_ptr<int8_t>()); break;
    case at::kShort: err = run(ids.data_ptr<int16_t>()); break;
    case at::kInt: err = run(ids.data_ptr<int32_t>()); break;
    case at::kByte: err = run(ids.data_ptr<uint8_t>()); break;
    default: err = run(ids.data_ptr<int64_t>()); break;
  }
  TORCH_CHECK(err == cudaSuccess, "expert_counts: CUDA error ", cudaGetErrorString(err));
  return counts;
}

}  // namespace moe_kernels
