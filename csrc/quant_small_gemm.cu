// Launchers of the quantized small-batch (decode) grouped GEMM and of its activation amax pass:
// checks, allocation, stream, dispatch on activation dtype, weight format and activation mode.
#include <climits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels/quant_small_gemm.cuh"
#include "activation_code.h"
#include "ops.h"

namespace moe_kernels {

namespace {

int format_code(const std::string& fmt, const at::Tensor& w) {
  const auto dt = w.scalar_type();
  if (fmt == "fp8" && dt == at::kFloat8_e4m3fn) return quant::kFp8E4M3;
  if (fmt == "fp8_e5m2" && dt == at::kFloat8_e5m2) return quant::kFp8E5M2;
  if (fmt == "int8" && dt == at::kChar) return quant::kInt8;
  if (fmt == "int4" && dt == at::kByte) return quant::kInt4;
  if (fmt == "mxfp4" && dt == at::kByte) return quant::kMxfp4;
  TORCH_CHECK(false, "grouped_gemm_small_quant: fmt ", fmt, " does not match weight data of dtype ", dt);
}

template <typename T, int WF>
cudaError_t dispatch_quant_x(const quant_gemm::Params& p, bool quant_x, cudaStream_t stream) {
  if constexpr (WF == quant::kFp8E4M3 || WF == quant::kFp8E5M2) {
    if (quant_x) return quant_gemm::launch<T, WF, true>(p, stream);
  }
  return quant_gemm::launch<T, WF, false>(p, stream);
}

template <typename T>
cudaError_t dispatch_format(const quant_gemm::Params& p, int wf, bool quant_x, cudaStream_t stream) {
  switch (wf) {
    case quant::kFp8E4M3:
      return dispatch_quant_x<T, quant::kFp8E4M3>(p, quant_x, stream);
    case quant::kFp8E5M2:
      return dispatch_quant_x<T, quant::kFp8E5M2>(p, quant_x, stream);
    case quant::kInt8:
      return dispatch_quant_x<T, quant::kInt8>(p, false, stream);
    case quant::kInt4:
      return dispatch_quant_x<T, quant::kInt4>(p, false, stream);
    default:
      return dispatch_quant_x<T, quant::kMxfp4>(p, false, stream);
  }
}

}  // namespace

at::Tensor grouped_gemm_small_quant_cuda(const at::Tensor& x, const at::Tensor& w, const std::string& fmt,
                                         const at::Tensor& w_scale, const std::optional<at::Tensor>& w_zero,
                                         int64_t block_n, int64_t block_k, const at::Tensor& expert_offsets,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& sorted_slots, int64_t gather_top_k,
                                         const std::string& activation, bool gated,
                                         const std::optional<at::Tensor>& row_weights, bool scale_input,
                                         int64_t scatter_slots, const std::string& act_mode,
                                         const std::optional<at::Tensor>& act_scale, int64_t act_group,
                                         bool act_by_routed_row) {
  const char* fn = "grouped_gemm_small_quant";
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && w_scale.is_cuda() && x.dim() == 2 && w.dim() == 3, fn,
              ": x [rows, K] and w [E, N, K or K/2] must be CUDA tensors");
  TORCH_CHECK(x.stride(1) == 1 && w.stride(2) == 1, fn, ": x and w need a contiguous last dimension");
  const int wf = format_code(fmt, w);
  const bool packed = wf == quant::kInt4 || wf == quant::kMxfp4;
  const int64_t E = w.size(0), n_w = w.size(1), K = packed ? 2 * w.size(2) : w.size(2);
  TORCH_CHECK(x.size(1) == K, fn, ": x has ", x.size(1), " columns, w has K=", K);
  TORCH_CHECK(K < INT_MAX && n_w < INT_MAX, fn, ": N and K must fit in 32 bits");
  const int64_t chunk = packed ? 32 : 16;  // elements of one 16-byte load
  TORCH_CHECK(K % chunk == 0, fn, ": K must be a multiple of ", chunk, " for fmt ", fmt, ", got ", K);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 && (w.stride(1) * w.element_size()) % 16 == 0 &&
                  (w.stride(0) * w.element_size()) % 16 == 0,
              fn, ": w needs 16-byte aligned rows");
  TORCH_CHECK(expert_offsets.numel() == E + 1 && expert_offsets.scalar_type() == at::kInt, fn,
              ": expert_offsets must be int32 [E+1]");
  TORCH_CHECK(block_n >= 1 && block_k >= 1, fn, ": block_n and block_k must be positive");
  TORCH_CHECK(block_k % 16 == 0 || block_k >= K, fn, ": scale groups along K must be multiples of 16, got ", block_k);
  TORCH_CHECK(w_scale.dim() == 2 || w_scale.dim() == 3, fn, ": w_scale must be [E, N] or [E, NB, KB]");
  TORCH_CHECK(w_scale.scalar_type() == (wf == quant::kMxfp4 ? at::kByte : at::kFloat), fn,
              ": w_scale must be float32 (uint8 e8m0 for mxfp4)");
  TORCH_CHECK(!gated || n_w % 2 == 0, fn, ": a gated weight needs an even number of rows");
  TORCH_CHECK(gather_top_k == 0 || sorted_slots.has_value(), fn, ": gather needs sorted_slots");
  TORCH_CHECK(scatter_slots == 0 || sorted_slots.has_value(), fn, ": scatter needs sorted_slots");
  const bool quant_x = act_mode != "none";
  TORCH_CHECK(!quant_x || wf == quant::kFp8E4M3 || wf == quant::kFp8E5M2, fn,
              ": activation quantization is for fp8 weights");
  TORCH_CHECK(!quant_x || act_scale.has_value(), fn, ": act_mode ", act_mode, " needs act_scale");
  TORCH_CHECK(!quant_x || act_mode != "group" || act_group % 16 == 0 || act_group >= K, fn,
              ": activation groups must be multiples of 16, got ", act_group);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = gated ? n_w / 2 : n_w;
  const int64_t P = sorted_slots.has_value() ? sorted_slots->size(0) : x.size(0);
  at::Tensor y = scatter_slots > 0 ? at::empty({scatter_slots, N}, x.options()) : at::zeros({P, N}, x.options());
  at::Tensor bias_c, rw_c, zero_c, xs_c;
  if (bias.has_value()) bias_c = bias->to(at::kFloat).contiguous();  // added in fp32, as the reference
  if (row_weights.has_value()) rw_c = row_weights->to(at::kFloat).contiguous();
  if (w_zero.has_value()) zero_c = w_zero->contiguous();
  if (quant_x) xs_c = act_scale->to(at::kFloat).contiguous();

  quant_gemm::Params p{};
  p.x = x.data_ptr();
  p.w = static_cast<const uint8_t*>(w.data_ptr());
  p.wv.scale = w_scale.data_ptr();
  p.wv.zero = w_zero.has_value() ? static_cast<const uint8_t*>(zero_c.data_ptr()) : nullptr;
  p.wv.s_se = w_scale.stride(0);
  p.wv.s_sn = w_scale.stride(1);
  p.wv.s_sk = w_scale.dim() == 3 ? w_scale.stride(2) : 0;
  p.wv.z_se = w_zero.has_value() ? zero_c.stride(0) : 0;
  p.wv.z_sn = w_zero.has_value() ? zero_c.stride(1) : 0;
  p.wv.bn = static_cast<int>(std::min<int64_t>(block_n, INT_MAX));
  p.wv.bk = static_cast<int>(std::min<int64_t>(block_k, INT_MAX));
  p.bias = bias.has_value() ? bias_c.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.offsets = expert_offsets.data_ptr<int32_t>();
  p.slots = sorted_slots.has_value() ? sorted_slots->data_ptr<int32_t>() : nullptr;
  p.row_weights = row_weights.has_value() ? rw_c.data_ptr<float>() : nullptr;
  p.x_scale = quant_x ? xs_c.data_ptr<float>() : nullptr;
  p.xs_row = 0;
  p.xs_group = INT_MAX;
  p.x_scale_is_amax = act_mode != "static";
  p.xs_by_routed_row = act_by_routed_row;
  if (act_mode == "group") {
    TORCH_CHECK(act_group >= 1, fn, ": act_group must be positive");
    p.xs_row = (K + act_group - 1) / act_group;
    p.xs_group = static_cast<int>(std::min<int64_t>(act_group, INT_MAX));
  } else if (act_mode == "token") {
    p.xs_row = 1;
  } else {
    TORCH_CHECK(act_mode == "none" || act_mode == "tensor" || act_mode == "static", fn, ": unknown act_mode ",
                act_mode);
  }
  if (quant_x) {
    const int64_t q_rows = act_by_routed_row ? P : x.size(0);
    TORCH_CHECK(K == 0 || xs_c.numel() == (p.xs_row ? q_rows * p.xs_row : 1), fn, ": act_scale has ", xs_c.numel(),
                " elements for act_mode ", act_mode);
  }
  p.stride_x = x.stride(0);
  p.stride_we = w.stride(0) * w.element_size();
  p.stride_wn = w.stride(1) * w.element_size();
  p.stride_be = bias.has_value() ? bias_c.stride(0) : 0;
  p.stride_y = y.stride(0);
  p.num_experts = static_cast<int>(E);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.inter = static_cast<int>(N);
  p.top_k = static_cast<int>(gather_top_k > 0 ? gather_top_k : 1);
  p.act = activation_code(activation, "grouped_gemm_small_quant");
  p.gated = gated;
  p.gather = gather_top_k > 0;
  p.scatter = scatter_slots > 0;
  p.scale_input = scale_input;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (x.scalar_type()) {
    case at::kHalf:
      err = dispatch_format<__half>(p, wf, quant_x, stream);
      break;
    case at::kBFloat16:
      err = dispatch_format<__nv_bfloat16>(p, wf, quant_x, stream);
      break;
    default:
      TORCH_CHECK(false, fn, ": activations must be float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA error ", cudaGetErrorString(err));
  return y;
}

at::Tensor act_amax_cuda(const at::Tensor& x, const std::optional<at::Tensor>& sorted_slots, int64_t top_k,
                         const std::optional<at::Tensor>& row_weights, int64_t group, bool per_tensor) {
  const char* fn = "act_amax";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, fn, ": x must be a CUDA [rows, K] tensor, K contiguous");
  TORCH_CHECK(group >= 1, fn, ": group must be positive, got ", group);
  TORCH_CHECK(top_k >= 1, fn, ": top_k must be positive, got ", top_k);
  TORCH_CHECK(!row_weights.has_value() || sorted_slots.has_value(), fn, ": row_weights need sorted_slots");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(1), rows = sorted_slots.has_value() ? sorted_slots->size(0) : x.size(0);
  TORCH_CHECK(K < INT_MAX, fn, ": K must fit in 32 bits");
  const int64_t groups = (K + group - 1) / group;
  at::Tensor amax = per_tensor ? at::zeros({1}, x.options().dtype(at::kFloat))
                               : at::empty({rows, groups}, x.options().dtype(at::kFloat));
  if (!per_tensor && groups == 0) return amax;
  at::Tensor rw_c;
  if (row_weights.has_value()) rw_c = row_weights->to(at::kFloat).contiguous();
  quant_gemm::AmaxParams p{};
  p.x = x.data_ptr();
  p.slots = sorted_slots.has_value() ? sorted_slots->data_ptr<int32_t>() : nullptr;
  p.row_weights = row_weights.has_value() ? rw_c.data_ptr<float>() : nullptr;
  p.amax = amax.data_ptr<float>();
  p.stride_x = x.stride(0);
  p.rows = rows;
  p.K = static_cast<int>(K);
  p.group = static_cast<int>(std::min<int64_t>(group, INT_MAX));
  p.num_groups = static_cast<int>(groups);
  p.top_k = static_cast<int>(top_k);
  p.tensor = per_tensor;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  switch (x.scalar_type()) {
    case at::kHalf:
      err = quant_gemm::act_amax<__half>(p, stream);
      break;
    case at::kBFloat16:
      err = quant_gemm::act_amax<__nv_bfloat16>(p, stream);
      break;
    default:
      TORCH_CHECK(false, fn, ": activations must be float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA error ", cudaGetErrorString(err));
  return amax;
}

}  // namespace moe_kernels
