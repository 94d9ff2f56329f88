// Fused top-k gating, one warp per token, on raw pointers (no torch headers).
//
// Lane l holds experts l, l+32, ... (VPT values per lane, E <= 32*VPT). Every candidate carries an
// int64 key ordering (score descending, expert ascending): the fp32 bits mapped to a monotone int32
// in the high word, ~expert in the low word. Keys are unique, so a warp max-reduction with shuffles
// picks the best expert and ties go to the lower index, exactly as the reference. NaN ranks below every
// number, -inf included. Scores are softmax, sigmoid or sqrt(softplus), always finite (see safe_exp and
// pointwise_score); renormalised softmax weights are the softmax of the selected logits.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "moe_kernels/dtype.cuh"

namespace moe_kernels {
namespace gating {

constexpr long long kTaken = static_cast<long long>(0x8000000000000000ULL);  // padding / chosen
constexpr long long kExcluded = kTaken + 1;                                    // outside chosen groups

constexpr int kNanMono = -0x7FFFFFFF;  // high word of a NaN score: below -inf, above kTaken / kExcluded

__device__ __forceinline__ long long make_key(float v, int index) {
  const int bits = __float_as_int(v + 0.0f);  // -0.0 -> +0.0
  const int mono = v != v ? kNanMono : bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return (static_cast<long long>(mono) << 32) | static_cast<long long>(0xFFFFFFFFu - static_cast<unsigned>(index));
}

__device__ __forceinline__ int key_index(long long key) {
  return static_cast<int>(0xFFFFFFFFu - static_cast<unsigned>(key & 0xFFFFFFFFLL));
}

// The score of a key; a NaN score reads as -inf (how group scores count it).
__device__ __forceinline__ float key_value(long long key) {
  const int mono = static_cast<int>(key >> 32);
  if (mono == kNanMono) return -INFINITY;
  return __int_as_float(mono ^ ((mono >> 31) & 0x7FFFFFFF));
}

__device__ __forceinline__ long long warp_max(long long v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const long long o = __shfl_xor_sync(0xFFFFFFFFu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

enum Scoring : int { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };

struct Params {
  int64_t num_tokens, stride_t, stride_e;
  int num_experts, top_k, num_groups, topk_groups;
  int scoring;  // Scoring
  bool renormalize;
  int group_n;  // a group's score: the sum of its group_n best selection scores
  float scaling;
};

constexpr float kFltMax = 3.402823466e38f;
constexpr float kRenormEps = 1e-20f;

// The non-finite rule of the softmax (finite weights always): NaN weighs 0 and is left out of the
// normaliser; if the maximum is +inf, the +inf entries share the mass; with no finite or +inf entry,
// everything is 0. `shift` is the row maximum when finite, else 0; `pinf` whether it is +inf.
__device__ __forceinline__ float safe_exp(float x, float shift, bool pinf) {
  if (x != x) return 0.f;
  if (pinf) return x == INFINITY ? 1.f : 0.f;
  return expf(x - shift);
}

// Scores other than softmax, finite: NaN -> 0, +-inf clamped to the largest finite float.
__device__ __forceinline__ float pointwise_score(float x, int scoring) {
  if (x != x) return 0.f;
  const float xc = fminf(fmaxf(x, -kFltMax), kFltMax);
  if (scoring == kSigmoid) return 1.f / (1.f + expf(-xc));
  return sqrtf(xc > 20.f ? xc : log1pf(expf(xc)));  // sqrt(softplus), torch's softplus threshold
}

// blockDim.x is a multiple of 32; warp w of the grid handles token w.
template <int VPT, typename T>
__global__ void topk_gating_kernel(const T* __restrict__ logits, const float* __restrict__ bias,
                                   float* __restrict__ weights, int32_t* __restrict__ ids, Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (t >= p.num_tokens) return;  // uniform per warp
  const int E = p.num_experts;

  float x[VPT], s[VPT];
  long long key[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + 32 * i;
    x[i] = e < E ? to_float(logits[t * p.stride_t + e * p.stride_e]) : NAN;
  }
  if (p.scoring == kSoftmax) {
    float row_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < VPT; ++i) row_max = fmaxf(row_max, x[i]);  // fmaxf skips NaN
    row_max = warp_max(row_max);
    const bool pinf = row_max == INFINITY;
    const float shift = isfinite(row_max) ? row_max : 0.f;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      s[i] = safe_exp(x[i], shift, pinf);
      sum += s[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < VPT; ++i) s[i] = sum > 0.f ? s[i] / sum : 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) s[i] = pointwise_score(x[i], p.scoring);
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + 32 * i;
    const float sel = x[i] != x[i] ? NAN : (bias ? s[i] + bias[e] : s[i]);  // a NaN logit ranks last
    key[i] = e < E ? make_key(sel, e) : kTaken;
  }

  if (p.num_groups > 1) {  // num_groups <= 32: lane g scores group g
    const int group_size = E / p.num_groups;
    long long my_group = kTaken;
    for (int g = 0; g < p.num_groups; ++g) {
      long long gk[VPT];
#pragma unroll
      for (int i = 0; i < VPT; ++i) gk[i] = (lane + 32 * i) / group_size == g ? key[i] : kTaken;
      float score = 0.f;
      for (int j = 0; j < p.group_n; ++j) {
        long long best = kTaken;
#pragma unroll
        for (int i = 0; i < VPT; ++i) best = gk[i] > best ? gk[i] : best;
        best = warp_max(best);
        score += key_value(best);
#pragma unroll
        for (int i = 0; i < VPT; ++i)
          if (gk[i] == best) gk[i] = kTaken;
      }
      if (lane == g) my_group = make_key(score, g);
    }
    unsigned chosen = 0;
    for (int j = 0; j < p.topk_groups; ++j) {
      const long long best = warp_max(my_group);
      chosen |= 1u << key_index(best);
      if (my_group == best) my_group = kTaken;
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !((chosen >> (e / group_size)) & 1u)) key[i] = kExcluded;
    }
  }

  float* w_out = weights + t * p.top_k;
  int32_t* id_out = ids + t * p.top_k;
  float total = 0.f, sel_max = -INFINITY;  // every lane holds the same values
  const bool softmax_renorm = p.renormalize && p.scoring == kSoftmax;
  for (int j = 0; j < p.top_k; ++j) {
    long long best = kTaken;
    float best_s = 0.f, best_x = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (key[i] > best) { best = key[i]; best_s = s[i]; best_x = x[i]; }
    const long long winner = warp_max(best);
    const int src = key_index(winner) & 31;  // the lane that owns the winner
    best_s = __shfl_sync(0xFFFFFFFFu, best_s, src);
    best_x = __shfl_sync(0xFFFFFFFFu, best_x, src);
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (key[i] == winner) key[i] = kTaken;
    if (lane == 0) {
      w_out[j] = softmax_renorm ? best_x : best_s;  // the selected logit, renormalised below
      id_out[j] = key_index(winner);
    }
    total += best_s;
    sel_max = fmaxf(sel_max, best_x);
  }
  if (softmax_renorm) {  // the softmax of the selected logits: never 0/0
    __syncwarp();  // lane 0's stores are visible to the warp
    const bool pinf = sel_max == INFINITY;
    const float shift = isfinite(sel_max) ? sel_max : 0.f;
    float sum = 0.f;
    for (int j = lane; j < p.top_k; j += 32) sum += safe_exp(w_out[j], shift, pinf);
    sum = warp_sum(sum);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int j = lane; j < p.top_k; j += 32) w_out[j] = safe_exp(w_out[j], shift, pinf) * inv * p.scaling;
  } else if (p.renormalize || p.scaling != 1.f) {
    __syncwarp();  // lane 0's stores are visible to the warp
    const float denom = p.renormalize ? total + kRenormEps : 1.f;
    for (int j = lane; j < p.top_k; j += 32) w_out[j] = (p.renormalize ? w_out[j] / denom : w_out[j]) * p.scaling;
  }
}

template <typename T>
cudaError_t topk_gating(const T* logits, const float* bias, float* weights, int32_t* ids, const Params& p,
                        cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  constexpr int kThreads = 256;  // 8 tokens per block
  const int64_t blocks = (p.num_tokens * 32 + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(blocks));
#define MOE_GATING_LAUNCH(V) topk_gating_kernel<V, T><<<grid, kThreads, 0, stream>>>(logits, bias, weights, ids, p)
  if (p.num_experts <= 32) MOE_GATING_LAUNCH(1);
  else if (p.num_experts <= 64) MOE_GATING_LAUNCH(2);
  else if (p.num_experts <= 128) MOE_GATING_LAUNCH(4);
  else if (p.num_experts <= 256) MOE_GATING_LAUNCH(8);
  else if (p.num_experts <= 512) MOE_GATING_LAUNCH(16);
  else MOE_GATING_LAUNCH(32);
#undef MOE_GATING_LAUNCH
  return cudaGetLastError();
}

}  // namespace gating
}  // namespace moe_kernels
