// Row movement between token order and expert order on raw pointers (no torch headers):
// permute (gather), unpermute (weighted combine) and slot_dots (the routing-weight gradient).
//
// Every kernel writes every element of its output (padding rows and dropped slots as zeros),
// addresses rows in 64 bits and reduces in a fixed order (no atomics): results are deterministic and
// a token's result does not depend on the rest of the batch. Rows move as 16-byte vectors when the
// pointers, the row strides and the row length allow it, else element by element.
//
// Layout of permute / unpermute: a block of kThreads threads is (tpr, kThreads / tpr): threadIdx.y
// picks a row, threadIdx.x walks its columns; rows are visited with a grid-stride loop.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "moe_kernels/dtype.cuh"

namespace moe_kernels {
namespace route {

constexpr int kThreads = 256;

// Elements per memory access: a 16-byte vector, or one element.
template <typename T, bool VEC>
__host__ __device__ constexpr int access_width() {
  return VEC ? static_cast<int>(16 / sizeof(T)) : 1;
}

// N elements of T at p (16-byte aligned when N * sizeof(T) == 16) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&f)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = to_float(p[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&f)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_float<T>(f[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(f[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

// out[r] = w[slot] * x[slot / k] for slot = sorted_slots[r] (w = 1 without weights); zero where the
// slot is -1 (or outside [0, num_slots)). Without weights the row is copied bit for bit.
template <typename T, bool VEC, bool HAS_W>
__global__ void permute_kernel(const T* __restrict__ x, int64_t stride_x, const int32_t* __restrict__ sorted_slots,
                               const float* __restrict__ w, T* __restrict__ out, int64_t num_rows, int64_t H,
                               int64_t num_slots, int64_t top_k) {
  constexpr int N = access_width<T, VEC>();
  const int64_t units = H / N;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < num_rows; r += row_step) {
    const int64_t slot = sorted_slots[r];
    const bool live = slot >= 0 && slot < num_slots;
    const T* src = x + (live ? slot / top_k : 0) * stride_x;
    T* dst = out + r * H;
    float scale = 1.f;
    if (HAS_W && live) scale = w[slot];
    for (int64_t c = threadIdx.x; c < units; c += blockDim.x) {
      if (!live) {
        float z[N];
#pragma unroll
        for (int i = 0; i < N; ++i) z[i] = 0.f;
        store_floats<T, N>(dst + c * N, z);
      } else if constexpr (HAS_W) {
        float v[N];
        load_floats<T, N>(src + c * N, v);
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = v[i] * scale;
        store_floats<T, N>(dst + c * N, v);
      } else if constexpr (VEC) {
        *reinterpret_cast<uint4*>(dst + c * N) = *reinterpret_cast<const uint4*>(src + c * N);
      } else {
        dst[c] = src[c];
      }
    }
  }
}

// out[t] = sum_j w[t*k + j] * y[slot_to_row[t*k + j]] over kept slots (row in [0, num_rows)), in
// fp32, j ascending, each term rounded before it is added (no fused multiply-add), as the reference.
template <typename T, bool VEC, bool HAS_W>
__global__ void unpermute_kernel(const T* __restrict__ y, int64_t stride_y, const int32_t* __restrict__ slot_to_row,
                                 const float* __restrict__ w, T* __restrict__ out, int64_t num_tokens, int64_t N_cols,
                                 int64_t num_rows, int64_t top_k) {
  constexpr int N = access_width<T, VEC>();
  const int64_t units = N_cols / N;
  const int64_t tok_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < num_tokens; t += tok_step) {
    const int32_t* rows = slot_to_row + t * top_k;
    const float* wt = HAS_W ? w + t * top_k : nullptr;
    T* dst = out + t * N_cols;
    for (int64_t c = threadIdx.x; c < units; c += blockDim.x) {
      float acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.f;
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t row = rows[j];
        if (row < 0 || row >= num_rows) continue;
        float v[N];
        load_floats<T, N>(y + row * stride_y + c * N, v);
        if constexpr (HAS_W) {
          const float wj = wt[j];
#pragma unroll
          for (int i = 0; i < N; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(v[i], wj));
        } else {
#pragma unroll
          for (int i = 0; i < N; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
        }
      }
      store_floats<T, N>(dst + c * N, acc);
    }
  }
}

// out[s] = <rows[slot_to_row[s]], tok[s / k]> in fp32, one warp per slot (lanes over columns, then a
// shuffle reduction); 0 for dropped slots. blockDim.x is a multiple of 32.
template <typename T, bool VEC>
__global__ void slot_dots_kernel(const T* __restrict__ rows, int64_t stride_rows, const int32_t* __restrict__ slot_to_row,
                                 const T* __restrict__ tok, int64_t stride_tok, float* __restrict__ out,
                                 int64_t num_slots, int64_t N_cols, int64_t num_rows, int64_t top_k) {
  constexpr int N = access_width<T, VEC>();
  const int64_t units = N_cols / N;
  const int lane = threadIdx.x & 31;
  const int64_t warp_step = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; s < num_slots; s += warp_step) {
    const int64_t row = slot_to_row[s];  // the same for the whole warp
    float acc = 0.f;
    if (row >= 0 && row < num_rows) {
      const T* a = rows + row * stride_rows;
      const T* b = tok + (s / top_k) * stride_tok;
      for (int64_t c = lane; c < units; c += 32) {
        float va[N], vb[N];
        load_floats<T, N>(a + c * N, va);
        load_floats<T, N>(b + c * N, vb);
#pragma unroll
        for (int i = 0; i < N; ++i) acc = fmaf(va[i], vb[i], acc);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) out[s] = acc;
  }
}

// ----- host side ------------------------------------------------------------------------------------

// Rows of `cols` elements, `stride` elements apart, starting at `base`: can each be read as 16-byte vectors?
template <typename T>
inline bool vectorizable(const T* base, int64_t stride, int64_t cols) {
  constexpr int64_t es = static_cast<int64_t>(sizeof(T));
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (cols * es) % 16 == 0 && (stride * es) % 16 == 0;
}

// (threads per row, rows per block) for rows of `units` accesses.
inline dim3 row_block(int64_t units) {
  const int tpr = units <= 32 ? 32 : units <= 64 ? 64 : units <= 128 ? 128 : 256;
  return dim3(tpr, kThreads / tpr);
}

inline unsigned grid_for(int64_t items, int64_t items_per_block, int num_sms) {
  const int64_t want = (items + items_per_block - 1) / items_per_block;
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 32;
  return static_cast<unsigned>(want < cap ? want : cap);
}

// x [T, H] (row stride stride_x, unit column stride) -> out [num_rows, H] contiguous; row_weights
// (fp32, indexed by slot, num_slots = T*k of them) or nullptr.
template <typename T>
cudaError_t permute(const T* x, int64_t stride_x, const int32_t* sorted_slots, const float* row_weights, T* out,
                    int64_t num_rows, int64_t H, int64_t num_slots, int64_t top_k, int num_sms, cudaStream_t stream) {
  if (num_rows == 0 || H == 0) return cudaSuccess;
  const bool vec = vectorizable(x, stride_x, H) && vectorizable(out, H, H);
  const dim3 block = row_block(vec ? H / access_width<T, true>() : H);
  const dim3 grid(grid_for(num_rows, block.y, num_sms));
#define MOE_PERMUTE_LAUNCH(V, W)                                                                                  \
  permute_kernel<T, V, W><<<grid, block, 0, stream>>>(x, stride_x, sorted_slots, row_weights, out, num_rows, H, \
                                                      num_slots, top_k)
  if (vec) {
    if (row_weights) MOE_PERMUTE_LAUNCH(true, true);
    else MOE_PERMUTE_LAUNCH(true, false);
  } else {
    if (row_weights) MOE_PERMUTE_LAUNCH(false, true);
    else MOE_PERMUTE_LAUNCH(false, false);
  }
#undef MOE_PERMUTE_LAUNCH
  return cudaGetLastError();
}

// y [num_rows, N] (row stride stride_y) -> out [num_tokens, N] contiguous; slot_to_row and topk_weights
// (fp32 or nullptr) hold num_tokens * top_k entries.
template <typename T>
cudaError_t unpermute(const T* y, int64_t stride_y, const int32_t* slot_to_row, const float* topk_weights, T* out,
                      int64_t num_tokens, int64_t N_cols, int64_t num_rows, int64_t top_k, int num_sms,
                      cudaStream_t stream) {
  if (num_tokens == 0 || N_cols == 0) return cudaSuccess;
  const bool vec = vectorizable(y, stride_y, N_cols) && vectorizable(out, N_cols, N_cols);
  const dim3 block = row_block(vec ? N_cols / access_width<T, true>() : N_cols);
  const dim3 grid(grid_for(num_tokens, block.y, num_sms));
#define MOE_UNPERMUTE_LAUNCH(V, W)                                                                              \
  unpermute_kernel<T, V, W><<<grid, block, 0, stream>>>(y, stride_y, slot_to_row, topk_weights, out, num_tokens, \
                                                        N_cols, num_rows, top_k)
  if (vec) {
    if (topk_weights) MOE_UNPERMUTE_LAUNCH(true, true);
    else MOE_UNPERMUTE_LAUNCH(true, false);
  } else {
    if (topk_weights) MOE_UNPERMUTE_LAUNCH(false, true);
    else MOE_UNPERMUTE_LAUNCH(false, false);
  }
#undef MOE_UNPERMUTE_LAUNCH
  return cudaGetLastError();
}

// rows [num_rows, N], tok [num_slots / top_k, N] -> out [num_slots] fp32.
template <typename T>
cudaError_t slot_dots(const T* rows, int64_t stride_rows, const int32_t* slot_to_row, const T* tok, int64_t stride_tok,
                      float* out, int64_t num_slots, int64_t N_cols, int64_t num_rows, int64_t top_k, int num_sms,
                      cudaStream_t stream) {
  if (num_slots == 0) return cudaSuccess;
  const bool vec = vectorizable(rows, stride_rows, N_cols) && vectorizable(tok, stride_tok, N_cols);
  const dim3 grid(grid_for(num_slots, kThreads / 32, num_sms));
  if (vec) {
    slot_dots_kernel<T, true><<<grid, kThreads, 0, stream>>>(rows, stride_rows, slot_to_row, tok, stride_tok, out,
                                                             num_slots, N_cols, num_rows, top_k);
  } else {
    slot_dots_kernel<T, false><<<grid, kThreads, 0, stream>>>(rows, stride_rows, slot_to_row, tok, stride_tok, out,
                                                              num_slots, N_cols, num_rows, top_k);
  }
  return cudaGetLastError();
}

}  // namespace route
}  // namespace moe_kernels
