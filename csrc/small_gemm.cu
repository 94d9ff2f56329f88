// Launcher of the small-batch (decode) grouped GEMM: checks, allocation, stream, dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels/small_gemm.cuh"
#include "activation_code.h"
#include "ops.h"

namespace moe_kernels {

at::Tensor grouped_gemm_small_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& sorted_slots,
                                   int64_t gather_top_k, const std::string& activation, bool gated,
                                   const std::optional<at::Tensor>& row_weights, bool scale_input,
                                   int64_t scatter_slots) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && x.dim() == 2 && w.dim() == 3,
              "grouped_gemm_small: x [rows, K] and w [E, N, K] must be CUDA tensors");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "grouped_gemm_small: x and w must share a dtype");
  TORCH_CHECK(x.stride(1) == 1 && w.stride(2) == 1, "grouped_gemm_small: x and w need a contiguous last dimension");
  const int64_t E = w.size(0), n_w = w.size(1), K = w.size(2);
  TORCH_CHECK(x.size(1) == K, "grouped_gemm_small: x has ", x.size(1), " columns, w has K=", K);
  TORCH_CHECK(expert_offsets.numel() == E + 1 && expert_offsets.scalar_type() == at::kInt,
              "grouped_gemm_small: expert_offsets must be int32 [E+1]");
  const int64_t vec = 16 / x.element_size();
  TORCH_CHECK(K % vec == 0, "grouped_gemm_small: K must be a multiple of ", vec, ", got ", K);
  TORCH_CHECK(!gated || n_w % 2 == 0, "grouped_gemm_small: a gated weight needs an even number of rows");
  TORCH_CHECK(gather_top_k == 0 || sorted_slots.has_value(), "grouped_gemm_small: gather needs sorted_slots");
  TORCH_CHECK(scatter_slots == 0 || sorted_slots.has_value(), "grouped_gemm_small: scatter needs sorted_slots");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = gated ? n_w / 2 : n_w;
  const int64_t P = sorted_slots.has_value() ? sorted_slots->size(0) : x.size(0);
  // Expert-order output: rows outside every segment stay zero. Slot order: only kept slots are written.
  at::Tensor y = scatter_slots > 0 ? at::empty({scatter_slots, N}, x.options()) : at::zeros({P, N}, x.options());
  at::Tensor bias_c, rw_c;
  if (bias.has_value()) bias_c = bias->to(x.scalar_type()).contiguous();
  if (row_weights.has_value()) rw_c = row_weights->to(at::kFloat).contiguous();
  small_gemm::Params p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = bias.has_value() ? bias_c.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.offsets = expert_offsets.data_ptr<int32_t>();
  p.slots = sorted_slots.has_value() ? sorted_slots->data_ptr<int32_t>() : nullptr;
  p.row_weights = row_weights.has_value() ? rw_c.data_ptr<float>() : nullptr;
  p.stride_x = x.stride(0);
  p.stride_we = w.stride(0);
  p.stride_wn = w.stride(1);
  p.stride_be = bias.has_value() ? bias_c.stride(0) : 0;
  p.stride_y = y.stride(0);
  p.num_experts = static_cast<int>(E);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.inter = static_cast<int>(N);
  p.top_k = static_cast<int>(gather_top_k > 0 ? gather_top_k : 1);
  p.act = activation_code(activation, "grouped_gemm_small");
  p.gated = gated;
  p.gather = gather_top_k > 0;
  p.scatter = scatter_slots > 0;
  p.scale_input = scale_input;
  const bool vector = reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && (w.stride(1) * w.element_size()) % 16 == 0 &&
                      (w.stride(0) * w.element_size()) % 16 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (x.scalar_type()) {
    case at::kFloat:
      err = small_gemm::small_gemm<float>(p, vector, stream);
      break;
    case at::kHalf:
      err = small_gemm::small_gemm<__half>(p, vector, stream);
      break;
    case at::kBFloat16:
      err = small_gemm::small_gemm<__nv_bfloat16>(p, vector, stream);
      break;
    default:
      TORCH_CHECK(false, "grouped_gemm_small: dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "grouped_gemm_small: CUDA error ", cudaGetErrorString(err));
  return y;
}

}  // namespace moe_kernels
