// Small-batch (decode) grouped GEMM with quantized weights, on raw pointers (no torch headers).
//
// As small_gemm.cuh (every weight element read once, the expert's few rows staged in shared memory,
// gather / activation / routing weight / scatter by flags), but the weight rows are fp8 (e4m3fn, e5m2),
// int8, int4 or mxfp4 bytes, streamed with 16-byte loads and dequantized in registers
// (quant_decode.cuh): 16 fp8/int8 or 32 int4/mxfp4 elements a load, scales once per 16 elements.
// Activations are fp16 or bf16 (the dtypes quantized models run in).
//
// FP8 weights with activation quantization (QUANT_X): each staged input is replaced by its fp8 code's
// value fp8(x / s) (exact in fp16, the staging type), and the per-16-column scale s of its row by
// xscale; the dot product of a 16-element half is multiplied by it. The scales come from x_scale:
// amax values of groups (act_amax_kernel; s = max(amax, 1e-10) / fmax) or a static scale.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_runtime.h>

#include "moe_kernels/dtype.cuh"
#include "moe_kernels/quant_decode.cuh"
#include "moe_kernels/small_gemm.cuh"

namespace moe_kernels {
namespace quant_gemm {

using small_gemm::kColsPerWarp;
using small_gemm::kMaxRows;
using small_gemm::kNone;
using small_gemm::kStageBytes;
using small_gemm::kWarps;

struct Params {
  const void* x;             // [rows or tokens, K] activations (fp32 / fp16 / bf16)
  const uint8_t* w;          // [E, n_w, K or K/2] packed bytes, K contiguous
  quant::WeightView wv;      // weight scales and zero points
  const float* bias;         // [E, n_w] fp32 or null
  void* y;                   // [P or S, N]
  const int32_t* offsets;    // [E+1]
  const int32_t* slots;      // [P] or null
  const float* row_weights;  // [S] or null
  // Activation quantization: the scale of input row q and column k is x_scale[q * xs_row + k / xs_group]
  // (an amax when x_scale_is_amax); q is the routed row when xs_by_routed_row, else the input row.
  const float* x_scale;
  int64_t xs_row;
  int xs_group;
  bool x_scale_is_amax, xs_by_routed_row;
  int64_t stride_x, stride_we, stride_wn, stride_be, stride_y;  // stride_we / stride_wn in bytes
  int num_experts, N, K, inter, top_k;
  int act;
  bool gated, gather, scatter, scale_input;
};

// Eight staged 2-byte inputs (one 16-byte shared-memory load) as fp32.
__device__ __forceinline__ float2 pair_to_float2(uint32_t u, __half) {
  __half2 h;
  memcpy(&h, &u, 4);
  return __half22float2(h);
}
__device__ __forceinline__ float2 pair_to_float2(uint32_t u, __nv_bfloat16) {
  __nv_bfloat162 h;
  memcpy(&h, &u, 4);
  return __bfloat1622float2(h);
}

template <typename S>
__device__ __forceinline__ void load_staged8(const S* p, float* out) {
  static_assert(sizeof(S) == 2, "staged inputs are fp16 or bf16");
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = pair_to_float2(u[i], S());
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Dot of one chunk of weights (one 16-byte load) with the staged inputs of every row (QUANT_X: per
// 16-element half times the row's activation scale).
template <int WF, bool QUANT_X, typename S>
__device__ __forceinline__ void accumulate(const uint8_t* wrow, const quant::WeightView& wv, int64_t e, int64_t n,
                                           int64_t k_abs, const S* stage, const float* xscale, int kk, int m_rows,
                                           float (&acc)[kMaxRows]) {
  constexpr int C = quant::Format<WF>::kChunk;
  const int64_t byte0 = quant::Format<WF>::kPacked ? k_abs / 2 : k_abs;
  const uint4 raw = *reinterpret_cast<const uint4*>(wrow + byte0);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  float wv_f[C];
  quant::dequantize_chunk<WF>(words, wv, e, n, k_abs, wv_f);
  constexpr int K_TILE = kStageBytes / (kMaxRows * sizeof(S));
  constexpr int kScalesPerTile = K_TILE / 16;
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < m_rows) {
      const S* xs = stage + m * K_TILE + kk;  // 16-byte aligned: kk is a multiple of the chunk
#pragma unroll
      for (int h = 0; h < C / 16; ++h) {
        float xv[16];
        load_staged8(xs + 16 * h, xv);
        load_staged8(xs + 16 * h + 8, xv + 8);
        float part = 0.f;
#pragma unroll
        for (int v = 0; v < 16; ++v) part += wv_f[16 * h + v] * xv[v];
        acc[m] += QUANT_X ? part * xscale[m * kScalesPerTile + (kk >> 4) + h] : part;
      }
    }
  }
}

// grid: (num_experts, ceil(N / (kWarps * kColsPerWarp))); block: kWarps * 32 threads.
// K must be a multiple of the chunk and the rows 16-byte aligned (the launcher checks).
template <typename T, int WF, bool QUANT_X>
__global__ void __launch_bounds__(kWarps * 32) quant_small_gemm_kernel(Params p) {
  using S = typename std::conditional<QUANT_X, __half, T>::type;  // fp8 codes are exact in fp16
  constexpr bool kE5M2 = WF == quant::kFp8E5M2;
  constexpr int C = quant::Format<WF>::kChunk;
  constexpr int K_TILE = kStageBytes / (kMaxRows * sizeof(S));
  constexpr int kScalesPerTile = K_TILE / 16;
  __shared__ __align__(16) S stage[kMaxRows * K_TILE];
  __shared__ float xscale[QUANT_X ? kMaxRows * kScalesPerTile : 1];
  __shared__ small_gemm::RowTable rows;

  const int e = blockIdx.x;
  const int64_t lo = p.offsets[e], hi = p.offsets[e + 1];
  if (hi <= lo) return;  // no rows: the expert's weight is never read
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* x = static_cast<const T*>(p.x);
  const uint8_t* w = p.w + e * p.stride_we;
  const int col0 = (blockIdx.y * kWarps + warp) * kColsPerWarp;

  for (int64_t r0 = lo; r0 < hi; r0 += kMaxRows) {
    const int m_rows = static_cast<int>(hi - r0 < kMaxRows ? hi - r0 : kMaxRows);
    __syncthreads();  // the previous pass's epilogue has read the row table
    if (threadIdx.x < kMaxRows) small_gemm::fill_row_table(p, rows, threadIdx.x, m_rows, r0, p.xs_by_routed_row);
    __syncthreads();
    float acc_g[kColsPerWarp][kMaxRows], acc_u[kColsPerWarp][kMaxRows];
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) acc_g[c][m] = acc_u[c][m] = 0.f;

    for (int k0 = 0; k0 < p.K; k0 += K_TILE) {
      const int k_tile = p.K - k0 < K_TILE ? p.K - k0 : K_TILE;
      __syncthreads();  // the previous tile is done with
      if (QUANT_X) {  // the scale of every (row, 16 columns) of the tile
        for (int i = threadIdx.x; i < m_rows * kScalesPerTile; i += blockDim.x) {
          const int m = i / kScalesPerTile, c = i - m * kScalesPerTile;
          float s = 1.f;
          if (rows.q[m] >= 0 && 16 * c < k_tile) {
            s = p.x_scale[rows.q[m] * p.xs_row + (k0 + 16 * c) / p.xs_group];
            if (p.x_scale_is_amax) s = quant::amax_to_scale<kE5M2>(s);
          }
          xscale[i] = s;
        }
        __syncthreads();
      }
      for (int i = threadIdx.x; i < m_rows * k_tile; i += blockDim.x) {
        const int m = i / k_tile, kk = i - m * k_tile;
        float v = 0.f;
        if (rows.src[m] >= 0) {
          v = to_float(x[rows.src[m] * p.stride_x + k0 + kk]);
          if (p.scale_input) v = to_float(from_float<T>(v * rows.w[m]));
          if (QUANT_X) v = quant::quantize_value<kE5M2>(v, xscale[m * kScalesPerTile + (kk >> 4)]);
        }
        stage[m * K_TILE + kk] = from_float<S>(v);
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kColsPerWarp; ++c) {
        const int n = col0 + c;
        if (n >= p.N) continue;
        const uint8_t* wg = w + static_cast<int64_t>(n) * p.stride_wn;
        const uint8_t* wu = w + static_cast<int64_t>(p.inter + n) * p.stride_wn;
        for (int kk = lane * C; kk < k_tile; kk += 32 * C) {
          accumulate<WF, QUANT_X>(wg, p.wv, e, n, k0 + kk, stage, xscale, kk, m_rows, acc_g[c]);
          if (p.gated) accumulate<WF, QUANT_X>(wu, p.wv, e, p.inter + n, k0 + kk, stage, xscale, kk, m_rows, acc_u[c]);
        }
      }
    }
    small_gemm::write_outputs<T, float>(p, rows, e, col0, lane, m_rows, acc_g, acc_u);
  }
}

// Per-group amax of the rows a quantized GEMM reads (gather and input scaling as the GEMM), for its
// dynamic activation scales: amax[r * num_groups + g] over columns [g * group, (g + 1) * group), or
// (tensor) one amax over everything, atomically (a max of non-negative floats, as bits: deterministic)
// into amax[0], which the launcher zeroes.
struct AmaxParams {
  const void* x;
  const int32_t* slots;       // [rows] or null: row r reads token slots[r] / top_k (-1: a zero row)
  const float* row_weights;   // [S] or null: rows scaled by their slot's weight, rounded to the input dtype
  float* amax;
  int64_t stride_x, rows;
  int K, group, num_groups, top_k;
  bool tensor;
};

// grid: (rows, ceil(num_groups / kWarps)); block: kWarps * 32 threads, a warp per group.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) act_amax_kernel(AmaxParams p) {
  const int64_t r = blockIdx.x;
  const int g = blockIdx.y * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (g >= p.num_groups) return;
  int64_t src = r;
  float wt = 1.f;
  if (p.slots) {
    const int64_t slot = p.slots[r];
    src = slot >= 0 ? slot / p.top_k : -1;
    if (slot >= 0 && p.row_weights) wt = p.row_weights[slot];
  }
  const T* x = static_cast<const T*>(p.x);
  float a = 0.f;
  const int k_end = (g + 1) * p.group < p.K ? (g + 1) * p.group : p.K;
  if (src >= 0) {
    for (int k = g * p.group + lane; k < k_end; k += 32) {
      float v = to_float(x[src * p.stride_x + k]);
      if (p.row_weights) v = to_float(from_float<T>(v * wt));
      a = quant::max_nan(a, fabsf(v));
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) a = quant::max_nan(a, __shfl_xor_sync(0xFFFFFFFFu, a, off));
  if (lane == 0) {
    if (p.tensor) {
      atomicMax(reinterpret_cast<unsigned int*>(p.amax), quant::float_to_bits(a));
    } else {
      p.amax[r * p.num_groups + g] = a;
    }
  }
}

template <typename T, int WF, bool QUANT_X>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const dim3 grid(p.num_experts, (p.N + kWarps * kColsPerWarp - 1) / (kWarps * kColsPerWarp));
  if (p.num_experts == 0 || p.N == 0) return cudaSuccess;
  quant_small_gemm_kernel<T, WF, QUANT_X><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t act_amax(const AmaxParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.num_groups == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.rows), (p.num_groups + kWarps - 1) / kWarps);
  act_amax_kernel<T><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace quant_gemm
}  // namespace moe_kernels
