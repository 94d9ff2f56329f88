// Launcher of the warp-per-token top-k gating kernel: checks, stream, dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels/topk_gating.cuh"
#include "ops.h"

namespace moe_kernels {

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                    int64_t top_k, const std::string& scoring, bool renormalize,
                                                    int64_t num_groups, int64_t topk_groups, double scaling_factor,
                                                    int64_t group_n) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "topk_gating: logits must be a 2-D CUDA tensor [T, E], got ",
              logits.sizes(), " on ", logits.device());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= 1024, "topk_gating: the cuda kernel serves 1 <= E <= 1024, got E=", E);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "topk_gating: top_k must be in [1, E=", E, "], got ", top_k);
  TORCH_CHECK(num_groups >= 1 && num_groups <= 32 && E % num_groups == 0,
              "topk_gating: num_groups must divide E and be at most 32 for the cuda kernel, got ", num_groups);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups && topk_groups * (E / num_groups) >= top_k,
              "topk_gating: topk_groups must be in [1, num_groups] and hold top_k experts, got ", topk_groups);
  TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid" || scoring == "sqrtsoftplus",
              "topk_gating: scoring must be softmax, sigmoid or sqrtsoftplus, got ", scoring);
  TORCH_CHECK(group_n >= 1 && (num_groups == 1 || group_n <= E / num_groups),
              "topk_gating: group_n must be in [1, E/num_groups], got ", group_n);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == E && bias->device() == logits.device(),
                "topk_gating: correction_bias must be [E] on the logits' device");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  gating::Params p{T,
                   logits.stride(0),
                   logits.stride(1),
                   static_cast<int>(E),
                   static_cast<int>(top_k),
                   static_cast<int>(num_groups),
                   static_cast<int>(topk_groups),
                   scoring == "softmax" ? gating::kSoftmax : scoring == "sigmoid" ? gating::kSigmoid : gating::kSqrtSoftplus,
                   renormalize,
                   static_cast<int>(group_n),
                   static_cast<float>(scaling_factor)};
  const float* bias_ptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (logits.scalar_type()) {
    case at::kFloat:
      err = gating::topk_gating(logits.data_ptr<float>(), bias_ptr, weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                p, stream);
      break;
    case at::kHalf:
      err = gating::topk_gating(reinterpret_cast<const __half*>(logits.data_ptr<at::Half>()), bias_ptr,
                                weights.data_ptr<float>(), ids.data_ptr<int32_t>(), p, stream);
      break;
    case at::kBFloat16:
      err = gating::topk_gating(reinterpret_cast<const __nv_bfloat16*>(logits.data_ptr<at::BFloat16>()), bias_ptr,
                                weights.data_ptr<float>(), ids.data_ptr<int32_t>(), p, stream);
      break;
    default:
      TORCH_CHECK(false, "topk_gating: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "topk_gating: CUDA error ", cudaGetErrorString(err));
  return {weights, ids};
}

}  // namespace moe_kernels
