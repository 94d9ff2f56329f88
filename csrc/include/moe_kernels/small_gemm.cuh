// Small-batch grouped GEMM for decode, on raw pointers (no torch headers).
//
// When an expert has few rows the GEMM is bound by reading its weight, so every weight element is
// read exactly once: block (e, column group) streams rows n of w[e] ([N, K], K contiguous) with
// 16-byte loads and multiplies each against all of the expert's rows (up to kMaxRows at a time),
// staged in shared memory, accumulating in fp32. Experts without rows return before touching memory.
//
// The same fusions as the Triton kernel, by flags: gather (row r reads token sorted_slots[r] / k),
// gated activation (gate column n and up column inter + n), input or output scaling by the routing
// weight of the row's slot, and scatter (row r written at its slot).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "moe_kernels/dtype.cuh"

namespace moe_kernels {
namespace small_gemm {

constexpr int kMaxRows = 16;      // rows of one expert handled per pass
constexpr int kWarps = 8;         // warps per block
constexpr int kColsPerWarp = 2;   // output columns per warp
constexpr int kStageBytes = 32768;  // shared memory for the staged input rows

enum Act : int { kNone = 0, kSilu = 1, kGelu = 2, kRelu = 3, kSwigluOai = 4 };

struct Params {
  const void* x;            // [rows or tokens, K]
  const void* w;            // [E, n_w, K], K contiguous
  const void* bias;         // [E, n_w] or null
  void* y;                  // [P or S, N]
  const int32_t* offsets;   // [E+1]
  const int32_t* slots;     // [P] or null
  const float* row_weights; // [S] or null
  int64_t stride_x, stride_we, stride_wn, stride_be, stride_y;
  int num_experts, N, K, inter, top_k;
  int act;
  bool gated, gather, scatter, scale_input;
};

// max/min that propagate NaN (fmaxf/fminf return the other operand): a NaN token gives a NaN row.
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ float min_nan(float a, float b) { return (a != a || a < b) ? a : b; }

__device__ __forceinline__ float activate(float g, float u, int act, bool gated) {
  if (act == kSwigluOai) {
    g = min_nan(g, 7.f);
    u = min_nan(max_nan(u, -7.f), 7.f);
    return (u + 1.f) * g / (1.f + expf(-1.702f * g));
  }
  float a = g;
  if (act == kSilu) a = g / (1.f + expf(-g));
  else if (act == kGelu) a = 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
  else if (act == kRelu) a = max_nan(g, 0.f);
  return gated ? a * u : a;
}

// Dot of VEC consecutive weights (one 16-byte load when VECTOR) with VEC staged inputs of each row.
template <typename T, bool VECTOR>
__device__ __forceinline__ void accumulate(const T* wrow, const T* stage, int k_tile, int kk, int m_rows,
                                           float (&acc)[kMaxRows]) {
  constexpr int VEC = 16 / sizeof(T);
  T wv[VEC];
  if (VECTOR) {
    *reinterpret_cast<uint4*>(wv) = *reinterpret_cast<const uint4*>(wrow + kk);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) wv[v] = wrow[kk + v];
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < m_rows) {
      const T* xs = stage + m * k_tile + kk;
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[m] += to_float(wv[v]) * to_float(xs[v]);
    }
  }
}

// The rows of one pass (up to kMaxRows of an expert's segment starting at r0), in shared memory: where
// each reads its input (src), writes its output (dst), finds its activation scale (q: the routed row or
// the input row) and its routing weight. -1: no input (padding, dropped) / not written.
struct RowTable {
  int64_t src[kMaxRows], dst[kMaxRows], q[kMaxRows];
  float w[kMaxRows];
};

// Thread m < kMaxRows fills entry m (P: the kernel's Params, with slots, row_weights, gather, scatter, top_k).
template <typename P>
__device__ __forceinline__ void fill_row_table(const P& p, RowTable& t, int m, int m_rows, int64_t r0,
                                               bool q_by_routed_row) {
  int64_t slot = -1, src = -1, dst = -1, q = -1;
  float wt = 0.f;
  if (m < m_rows) {
    const int64_t r = r0 + m;
    slot = p.slots ? p.slots[r] : r;
    if (slot >= 0) {
      src = p.gather ? slot / p.top_k : r;
      dst = p.scatter ? slot : r;
      q = q_by_routed_row ? r : src;
      wt = p.row_weights ? p.row_weights[slot] : 1.f;
    } else if (!p.scatter) {
      dst = r;  // padding row: written as zeros in expert order
    }
  }
  t.src[m] = src;
  t.dst[m] = dst;
  t.q[m] = q;
  t.w[m] = wt;
}

// Reduce each row's partial sums over the warp and write the warp's columns col0 .. col0 + kColsPerWarp:
// bias (of dtype B), activation, routing weight on the output, in the output dtype T.
template <typename T, typename B, typename P>
__device__ __forceinline__ void write_outputs(const P& p, const RowTable& t, int e, int col0, int lane, int m_rows,
                                              float (&acc_g)[kColsPerWarp][kMaxRows],
                                              float (&acc_u)[kColsPerWarp][kMaxRows]) {
  const B* bias = static_cast<const B*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int c = 0; c < kColsPerWarp; ++c) {
    const int n = col0 + c;
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      float g = acc_g[c][m], u = acc_u[c][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        g += __shfl_xor_sync(0xFFFFFFFFu, g, off);
        u += __shfl_xor_sync(0xFFFFFFFFu, u, off);
      }
      if (lane == m && m < m_rows && n < p.N && t.dst[m] >= 0) {
        float out = 0.f;
        if (t.src[m] >= 0) {
          if (bias) {
            g += to_float(bias[e * p.stride_be + n]);
            if (p.gated) u += to_float(bias[e * p.stride_be + p.inter + n]);
          }
          out = p.act == kNone ? g : activate(g, u, p.act, p.gated);
          if (p.row_weights && !p.scale_input) out *= t.w[m];
        }
        y[t.dst[m] * p.stride_y + n] = from_float<T>(out);
      }
    }
  }
}

// grid: (num_experts, ceil(N / (kWarps * kColsPerWarp))); block: kWarps * 32 threads.
// K must be a multiple of 16 / sizeof(T) (the launcher checks); VECTOR also needs 16-byte aligned rows.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kWarps * 32) small_gemm_kernel(Params p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int K_TILE = kStageBytes / (kMaxRows * sizeof(T));
  __shared__ __align__(16) T stage[kMaxRows * K_TILE];
  __shared__ RowTable rows;

  const int e = blockIdx.x;
  const int64_t lo = p.offsets[e], hi = p.offsets[e + 1];
  if (hi <= lo) return;  // no rows: the expert's weight is never read
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w) + e * p.stride_we;
  const int col0 = (blockIdx.y * kWarps + warp) * kColsPerWarp;

  for (int64_t r0 = lo; r0 < hi; r0 += kMaxRows) {
    const int m_rows = static_cast<int>(hi - r0 < kMaxRows ? hi - r0 : kMaxRows);
    __syncthreads();  // the previous pass's epilogue has read the row table
    if (threadIdx.x < kMaxRows) fill_row_table(p, rows, threadIdx.x, m_rows, r0, false);
    __syncthreads();  // the row table is written before anyone reads it (with K = 0 no tile loop syncs)
    float acc_g[kColsPerWarp][kMaxRows], acc_u[kColsPerWarp][kMaxRows];
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) acc_g[c][m] = acc_u[c][m] = 0.f;

    for (int k0 = 0; k0 < p.K; k0 += K_TILE) {
      const int k_tile = p.K - k0 < K_TILE ? p.K - k0 : K_TILE;
      __syncthreads();  // the previous tile (and the row table on the first pass) is done with
      for (int i = threadIdx.x; i < m_rows * k_tile; i += blockDim.x) {
        const int m = i / k_tile, kk = i - m * k_tile;
        float v = 0.f;
        if (rows.src[m] >= 0) {
          v = to_float(x[rows.src[m] * p.stride_x + k0 + kk]);
          if (p.scale_input) v = to_float(from_float<T>(v * rows.w[m]));
        }
        stage[m * k_tile + kk] = from_float<T>(v);
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kColsPerWarp; ++c) {
        const int n = col0 + c;
        if (n >= p.N) continue;
        const T* wg = w + static_cast<int64_t>(n) * p.stride_wn + k0;
        const T* wu = w + static_cast<int64_t>(p.inter + n) * p.stride_wn + k0;
        for (int kk = lane * VEC; kk < k_tile; kk += 32 * VEC) {
          accumulate<T, VECTOR>(wg, stage, k_tile, kk, m_rows, acc_g[c]);
          if (p.gated) accumulate<T, VECTOR>(wu, stage, k_tile, kk, m_rows, acc_u[c]);
        }
      }
    }
    write_outputs<T, T>(p, rows, e, col0, lane, m_rows, acc_g, acc_u);
  }
}

template <typename T>
cudaError_t small_gemm(const Params& p, bool vector, cudaStream_t stream) {
  const dim3 grid(p.num_experts, (p.N + kWarps * kColsPerWarp - 1) / (kWarps * kColsPerWarp));
  if (p.num_experts == 0 || p.N == 0) return cudaSuccess;
  if (vector) {
    small_gemm_kernel<T, true><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    small_gemm_kernel<T, false><<<grid, kWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace small_gemm
}  // namespace moe_kernels
