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
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "expert_counts: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= 12288, "expert_counts: num_experts must be in [1, 12288], got ",
              num_experts);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  at::Tensor counts = at::empty({num_experts}, ids.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ids.get_device());
  cudaError_t err;
  if (ids.scalar_type() == at::kInt) {
    err = expert_counts(ids.data_ptr<int32_t>(), ids.numel(), static_cast<int32_t>(num_experts),
                        counts.data_ptr<int32_t>(), sms, stream);
  } else {
    err = expert_counts(ids.data_ptr<int64_t>(), ids.numel(), static_cast<int32_t>(num_experts),
                        counts.data_ptr<int32_t>(), sms, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "expert_counts: CUDA error ", cudaGetErrorString(err));
  return counts;
}

}  // namespace moe_kernels
