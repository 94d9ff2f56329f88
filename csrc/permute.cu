// Launchers of permute, unpermute and slot_dots: checks, stream, dtype dispatch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe_kernels/permute.cuh"
#include "ops.h"

namespace moe_kernels {
namespace {

// f(T{}) with T the CUDA element type of a float32 / float16 / bfloat16 tensor.
template <typename F>
void dispatch_float(at::ScalarType type, const char* fn, F&& f) {
  switch (type) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK(false, fn, ": the cuda kernels serve float32, float16 and bfloat16, got ", type);
  }
}

// A 2-D tensor whose columns are adjacent (stride(1) == 1 unless there is at most one column).
at::Tensor row_major(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

void check_index(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), fn, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt, fn, ": ", name, " must be a 1-D int32 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
}

// Optional per-slot weights as a contiguous fp32 vector of num_slots entries.
std::optional<at::Tensor> slot_weights(const char* fn, const std::optional<at::Tensor>& w, const at::Tensor& like,
                                       int64_t num_slots) {
  if (!w.has_value()) return std::nullopt;
  TORCH_CHECK(w->device() == like.device(), fn, ": weights must be on ", like.device(), ", got ", w->device());
  TORCH_CHECK(w->numel() == num_slots, fn, ": weights must hold ", num_slots, " entries (T*k), got shape ", w->sizes());
  TORCH_CHECK(at::isFloatingType(w->scalar_type()), fn, ": weights must be a float tensor, got ", w->scalar_type());
  return w->to(at::kFloat).contiguous();
}

int sm_count(const at::Tensor& t) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device());
  return sms;
}

}  // namespace

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& slot_to_row,
                        int64_t top_k, const std::optional<at::Tensor>& row_weights) {
  constexpr const char* fn = "permute";
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, fn, ": x must be a 2-D CUDA tensor [T, H], got ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(top_k >= 1, fn, ": top_k must be >= 1, got ", top_k);
  check_index(fn, "sorted_slots", sorted_slots, x);
  check_index(fn, "slot_to_row", slot_to_row, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), H = x.size(1), P = sorted_slots.size(0), S = T * top_k;
  const at::Tensor xr = row_major(x);
  const at::Tensor slots = sorted_slots.contiguous();
  const std::optional<at::Tensor> w = slot_weights(fn, row_weights, x, S);
  at::Tensor out = at::empty({P, H}, x.options());
  const float* w_ptr = w.has_value() ? w->data_ptr<float>() : nullptr;
  const int sms = sm_count(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  dispatch_float(x.scalar_type(), fn, [&](auto tag) {
    using T_ = decltype(tag);
    err = route::permute(reinterpret_cast<const T_*>(xr.data_ptr()), xr.stride(0), slots.data_ptr<int32_t>(), w_ptr,
                         reinterpret_cast<T_*>(out.data_ptr()), P, H, S, top_k, sms, stream);
  });
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA error ", cudaGetErrorString(err));
  return out;
}

at::Tensor unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& sorted_slots, const at::Tensor& slot_to_row,
                          int64_t top_k, const std::optional<at::Tensor>& topk_weights) {
  constexpr const char* fn = "unpermute";
  TORCH_CHECK(y_sorted.is_cuda() && y_sorted.dim() == 2, fn, ": y_sorted must be a 2-D CUDA tensor [P, N], got ",
              y_sorted.sizes(), " on ", y_sorted.device());
  TORCH_CHECK(top_k >= 1, fn, ": top_k must be >= 1, got ", top_k);
  check_index(fn, "sorted_slots", sorted_slots, y_sorted);
  check_index(fn, "slot_to_row", slot_to_row, y_sorted);
  const int64_t S = slot_to_row.size(0);
  TORCH_CHECK(S % top_k == 0, fn, ": slot_to_row holds ", S, " slots, not a multiple of top_k=", top_k);
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t T = S / top_k, P = y_sorted.size(0), N = y_sorted.size(1);
  const at::Tensor y = row_major(y_sorted);
  const at::Tensor rows = slot_to_row.contiguous();
  const std::optional<at::Tensor> w = slot_weights(fn, topk_weights, y_sorted, S);
  at::Tensor out = at::empty({T, N}, y_sorted.options());
  const float* w_ptr = w.has_value() ? w->data_ptr<float>() : nullptr;
  const int sms = sm_count(y_sorted);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  dispatch_float(y_sorted.scalar_type(), fn, [&](auto tag) {
    using T_ = decltype(tag);
    err = route::unpermute(reinterpret_cast<const T_*>(y.data_ptr()), y.stride(0), rows.data_ptr<int32_t>(), w_ptr,
                           reinterpret_cast<T_*>(out.data_ptr()), T, N, P, top_k, sms, stream);
  });
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA error ", cudaGetErrorString(err));
  return out;
}

at::Tensor slot_dots_cuda(const at::Tensor& rows, const at::Tensor& slot_to_row, const at::Tensor& per_token,
                          int64_t top_k) {
  constexpr const char* fn = "slot_dots";
  TORCH_CHECK(rows.is_cuda() && rows.dim() == 2, fn, ": rows must be a 2-D CUDA tensor [P, N], got ", rows.sizes(),
              " on ", rows.device());
  TORCH_CHECK(top_k >= 1, fn, ": top_k must be >= 1, got ", top_k);
  check_index(fn, "slot_to_row", slot_to_row, rows);
  const int64_t S = slot_to_row.size(0);
  TORCH_CHECK(S % top_k == 0, fn, ": slot_to_row holds ", S, " slots, not a multiple of top_k=", top_k);
  const int64_t T = S / top_k, P = rows.size(0), N = rows.size(1);
  TORCH_CHECK(per_token.device() == rows.device() && per_token.dim() == 2 && per_token.size(0) == T &&
                  per_token.size(1) == N,
              fn, ": per_token must be [T=", T, ", N=", N, "] on ", rows.device(), ", got ", per_token.sizes(), " on ",
              per_token.device());
  const c10::cuda::CUDAGuard guard(rows.device());
  // One element type for both operands: fp32 when they differ (exact for every supported dtype).
  const bool same = rows.scalar_type() == per_token.scalar_type();
  const at::Tensor a = row_major(same ? rows : rows.to(at::kFloat));
  const at::Tensor b = row_major(same ? per_token : per_token.to(at::kFloat));
  const at::Tensor r = slot_to_row.contiguous();
  at::Tensor out = at::empty({T, top_k}, rows.options().dtype(at::kFloat));
  const int sms = sm_count(rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  dispatch_float(a.scalar_type(), fn, [&](auto tag) {
    using T_ = decltype(tag);
    err = route::slot_dots(reinterpret_cast<const T_*>(a.data_ptr()), a.stride(0), r.data_ptr<int32_t>(),
                           reinterpret_cast<const T_*>(b.data_ptr()), b.stride(0), out.data_ptr<float>(), S, N, P,
                           top_k, sms, stream);
  });
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA error ", cudaGetErrorString(err));
  return out;
}

}  // namespace moe_kernels
