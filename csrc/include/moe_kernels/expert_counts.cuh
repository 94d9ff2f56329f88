// Per-expert slot histogram on raw pointers (no torch headers).
//
// counts[e] = #{ s : ids[s] == e } for e in [0, num_experts); ids outside that range (-1 = dropped)
// are skipped. Integer atomics only, so the result is exact and the same on every run.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moe_kernels {

template <typename IdT>
__global__ void expert_counts_kernel(const IdT* __restrict__ ids, int64_t num_slots, int32_t num_experts,
                                     int32_t* __restrict__ counts) {
  extern __shared__ int32_t local[];  // [num_experts] block-private histogram
  for (int32_t e = threadIdx.x; e < num_experts; e += blockDim.x) local[e] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_slots; s += stride) {
    const int64_t e = static_cast<int64_t>(ids[s]);
    if (e >= 0 && e < num_experts) atomicAdd(&local[e], 1);
  }
  __syncthreads();
  for (int32_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    if (local[e]) atomicAdd(&counts[e], local[e]);
  }
}

// counts must hold num_experts int32 and is zeroed here; everything is queued on `stream`.
template <typename IdT>
cudaError_t expert_counts(const IdT* ids, int64_t num_slots, int32_t num_experts, int32_t* counts, int num_sms,
                          cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * num_experts, stream);
  if (err != cudaSuccess || num_slots == 0) return err;
  constexpr int kThreads = 256;
  const int64_t want = (num_slots + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 4LL * num_sms ? want : 4LL * num_sms);
  expert_counts_kernel<IdT><<<blocks, kThreads, sizeof(int32_t) * num_experts, stream>>>(ids, num_slots, num_experts,
                                                                                         counts);
  return cudaGetLastError();
}

}  // namespace moe_kernels
