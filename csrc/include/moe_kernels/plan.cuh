// Routing plan on raw pointers (no torch headers): a stable counting sort of the S = T*k (token, slot)
// pairs by expert, with no host synchronisation (every size follows from the shapes).
//
// The S elements, taken in a pass order, are cut into contiguous chunks; one warp owns one chunk.
// A pass is three launches:
//   1. count: each warp's histogram of its chunk over the E experts -> hist [num_chunks, E];
//   2. scan:  per expert, the exclusive prefix of hist over chunks (in place: the first rank of each
//             expert in each chunk) and the totals;
//   3. rank:  each warp walks its chunk in order, 32 elements at a time, with per-expert running
//             counters in shared memory that start at the chunk's first ranks. Within a step,
//             __match_any_sync groups the lanes of one expert and a lane's rank is the counter plus the
//             number of its group's lanes below it; the group's lowest lane then advances the counter.
//             Ranks therefore grow with the pass order: the sort is stable.
// Capacity (GShard): a first pass in priority order (element p = j*T + t is choice j of token t, so all
// first choices come before all second choices, earlier tokens first) writes every slot's rank within
// its expert; the final pass, in slot order, drops the slots whose rank is >= capacity. The final pass
// turns the totals into padded expert offsets (one block scan) and writes slot_to_row and sorted_slots.
//
// Experts: ids are mapped through expert_map when there is one (global -> local, -1 = absent); ids
// outside [0, E) after that (-1 included) are dropped. Every index is 64-bit; ranks and rows are int32
// (P = S + E*(block_size-1) < 2^31 is the caller's precondition).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moe_kernels {
namespace plan {

constexpr int kMaxExperts = 1024;
constexpr int kWarps = 4;             // warps (= chunks) per block of the count and rank kernels
constexpr int kUnroll = 4;            // 32-element steps whose ids are loaded together
constexpr int64_t kMinChunk = 256;    // elements per chunk, at least (a multiple of 32)
constexpr int64_t kMaxChunks = 4096;  // chunks, at most: bounds the [num_chunks, E] histogram

struct Params {
  int64_t num_slots;   // S = T*k
  int64_t num_tokens;  // T
  int64_t top_k;       // k
  int64_t num_global;  // entries of expert_map
  int64_t capacity;    // slots an expert keeps (read only with a rank array)
  int64_t chunk;       // elements per chunk, a multiple of 32
  int64_t num_chunks;
  int32_t num_experts;  // E; key E means dropped
  bool has_map;
};

// Chunking of S elements: a function of S only.
inline void chunking(int64_t num_slots, int64_t* chunk, int64_t* num_chunks) {
  int64_t c = (num_slots + kMaxChunks - 1) / kMaxChunks;
  c = c < kMinChunk ? kMinChunk : (c + 31) / 32 * 32;
  *chunk = c;
  *num_chunks = (num_slots + c - 1) / c;
}

// Local expert of a slot in [0, E], E meaning dropped (unmapped, out of range, or over capacity when
// `rank` is given).
template <typename IdT>
__device__ __forceinline__ int32_t expert_of(const IdT* __restrict__ ids, const int64_t* __restrict__ map,
                                             const int32_t* __restrict__ rank, int64_t slot, const Params& p) {
  int64_t e = static_cast<int64_t>(ids[slot]);
  if (p.has_map) e = (e >= 0 && e < p.num_global) ? map[e] : -1;
  if (e < 0 || e >= p.num_experts) return p.num_experts;
  if (rank != nullptr && rank[slot] >= p.capacity) return p.num_experts;
  return static_cast<int32_t>(e);
}

enum Mode : int { kCount = 0, kRank = 1, kPlace = 2 };

// One warp per chunk; dynamic shared memory: kWarps * E int32 counters. No block-level barrier, so
// warps past the last chunk simply leave.
//   kCount: hist [num_chunks, E] <- per-chunk histograms.
//   kRank:  hist holds the chunks' first ranks; rank_out[slot] <- rank within its expert (INT32_MAX if dropped).
//   kPlace: hist holds the chunks' first ranks; slot_to_row[slot] <- offsets[e] + rank (or -1),
//           sorted_slots[row] <- slot.
// `priority`: element p of the pass is slot (p % T) * k + p / T, else slot p.
template <int MODE, typename IdT>
__global__ void __launch_bounds__(kWarps * 32)
    plan_pass_kernel(const IdT* __restrict__ ids, const int64_t* __restrict__ map, const int32_t* __restrict__ rank_in,
                     bool priority, Params p, int32_t* __restrict__ hist, const int32_t* __restrict__ offsets,
                     int32_t* __restrict__ rank_out, int32_t* __restrict__ slot_to_row,
                     int32_t* __restrict__ sorted_slots) {
  extern __shared__ int32_t plan_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (c >= p.num_chunks) return;  // the whole warp
  const int32_t E = p.num_experts;
  int32_t* cnt = plan_smem + warp * E;
  int32_t* chunk_hist = hist + c * E;
  for (int32_t e = lane; e < E; e += 32) cnt[e] = MODE == kCount ? 0 : chunk_hist[e];
  __syncwarp();

  const unsigned below = (1u << lane) - 1u;
  const int64_t begin = c * p.chunk;
  const int64_t end = begin + p.chunk < p.num_slots ? begin + p.chunk : p.num_slots;
  for (int64_t step = begin; step < end; step += 32 * kUnroll) {
    int64_t slot[kUnroll];
    int32_t key[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t q = step + u * 32 + lane;
      slot[u] = priority ? (q % p.num_tokens) * p.top_k + q / p.num_tokens : q;
      key[u] = q < end ? expert_of(ids, map, rank_in, slot[u], p) : E;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool live = step + u * 32 + lane < end;
      const int32_t e = key[u];
      const bool kept = e < E;
      const unsigned same = __match_any_sync(0xFFFFFFFFu, e);
      int32_t r = 0;
      if (kept) r = cnt[e] + __popc(same & below);
      __syncwarp();
      if (kept && (same & below) == 0) cnt[e] += __popc(same);  // the group's lowest lane
      __syncwarp();
      if (MODE == kRank && live) rank_out[slot[u]] = kept ? r : INT32_MAX;
      if (MODE == kPlace && live) {
        int32_t row = -1;
        if (kept) {
          row = offsets[e] + r;
          sorted_slots[row] = static_cast<int32_t>(slot[u]);
        }
        slot_to_row[slot[u]] = row;
      }
    }
  }
  if (MODE == kCount) {
    for (int32_t e = lane; e < E; e += 32) chunk_hist[e] = cnt[e];
  }
}

// In place over hist [num_chunks, E]: column e becomes its exclusive prefix sum over chunks; counts[e]
// (when not null) gets the column total. Grid ceil(E / 32), block (32, 32): lane x is an expert,
// row y a contiguous segment of the chunks. Each thread rewrites only its own segment, after the
// barrier that ends every read of the first loop.
static __global__ void __launch_bounds__(1024)
    plan_scan_kernel(int32_t* __restrict__ hist, int32_t* __restrict__ counts, int64_t num_chunks, int32_t E) {
  __shared__ int32_t part[32][33];
  const int32_t e = static_cast<int32_t>(blockIdx.x) * 32 + static_cast<int32_t>(threadIdx.x);
  const int64_t per = (num_chunks + 31) / 32;
  int64_t c0 = static_cast<int64_t>(threadIdx.y) * per;
  c0 = c0 < num_chunks ? c0 : num_chunks;
  const int64_t c1 = c0 + per < num_chunks ? c0 + per : num_chunks;
  int32_t sum = 0;
  if (e < E)
    for (int64_t c = c0; c < c1; ++c) sum += hist[c * E + e];
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  int32_t run = 0;
  for (unsigned y = 0; y < threadIdx.y; ++y) run += part[y][threadIdx.x];
  if (e < E) {
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t h = hist[c * E + e];
      hist[c * E + e] = run;
      run += h;
    }
    if (threadIdx.y == 31 && counts != nullptr) counts[e] = run;  // the last segment ends at the total
  }
}

// offsets[0] = 0, offsets[e+1] = sum over e' <= e of counts[e'] rounded up to block_size. One block of
// 1024 threads (E <= 1024): warp scans, then a scan of the warp totals.
static __global__ void __launch_bounds__(1024)
    plan_offsets_kernel(const int32_t* __restrict__ counts, int32_t E, int64_t block_size, int32_t* __restrict__ offsets) {
  __shared__ int64_t warp_total[32];
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
  int64_t v = e < E ? (static_cast<int64_t>(counts[e]) + block_size - 1) / block_size * block_size : 0;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int64_t o = __shfl_up_sync(0xFFFFFFFFu, v, off);
    if (lane >= off) v += o;
  }
  if (lane == 31) warp_total[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t t = warp_total[lane];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t o = __shfl_up_sync(0xFFFFFFFFu, t, off);
      if (lane >= off) t += o;
    }
    warp_total[lane] = t;
  }
  __syncthreads();
  if (warp > 0) v += warp_total[warp - 1];
  if (e < E) offsets[e + 1] = static_cast<int32_t>(v);
  if (e == 0) offsets[0] = 0;
}

// Scratch the launcher allocates: hist holds workspace_hist() int32, rank (with a capacity) S int32.
inline int64_t workspace_hist(int64_t num_slots, int32_t num_experts) {
  int64_t chunk = 0, num_chunks = 0;
  chunking(num_slots, &chunk, &num_chunks);
  return num_chunks * num_experts;
}

// ids [T, k] contiguous; map [num_global] int64 when has_map; capacity < 0: none. Outputs: sorted_slots
// [P] (P = T*k + E*(block_size-1)), offsets [E+1], tokens [E], slot_to_row [T*k]. Queued on `stream`.
template <typename IdT>
cudaError_t plan_routing(const IdT* ids, int64_t num_tokens, int64_t top_k, int32_t num_experts, int64_t block_size,
                         int64_t capacity, const int64_t* map, bool has_map, int64_t num_global, int32_t* hist,
                         int32_t* rank, int32_t* sorted_slots, int32_t* offsets, int32_t* tokens,
                         int32_t* slot_to_row, cudaStream_t stream) {
  const int64_t S = num_tokens * top_k;
  const int64_t P = S + static_cast<int64_t>(num_experts) * (block_size - 1);
  cudaError_t err = cudaMemsetAsync(sorted_slots, 0xFF, sizeof(int32_t) * P, stream);  // -1
  if (err != cudaSuccess) return err;
  if (S == 0) {
    err = cudaMemsetAsync(offsets, 0, sizeof(int32_t) * (num_experts + 1), stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(tokens, 0, sizeof(int32_t) * num_experts, stream);
  }
  if (capacity >= S) capacity = -1;  // a rank is below the expert's count <= S: nothing is dropped

  Params p{};
  p.num_slots = S;
  p.num_tokens = num_tokens;
  p.top_k = top_k;
  p.num_global = num_global;
  p.capacity = capacity;
  p.num_experts = num_experts;
  p.has_map = has_map;
  chunking(S, &p.chunk, &p.num_chunks);
  const dim3 pass_grid(static_cast<unsigned>((p.num_chunks + kWarps - 1) / kWarps));
  const size_t smem = sizeof(int32_t) * kWarps * num_experts;
  const dim3 scan_grid(static_cast<unsigned>((num_experts + 31) / 32)), scan_block(32, 32);

  const int32_t* rank_in = nullptr;
  if (capacity >= 0) {
    plan_pass_kernel<kCount, IdT><<<pass_grid, kWarps * 32, smem, stream>>>(ids, map, nullptr, true, p, hist, nullptr,
                                                                            nullptr, nullptr, nullptr);
    plan_scan_kernel<<<scan_grid, scan_block, 0, stream>>>(hist, nullptr, p.num_chunks, num_experts);
    plan_pass_kernel<kRank, IdT><<<pass_grid, kWarps * 32, smem, stream>>>(ids, map, nullptr, true, p, hist, nullptr,
                                                                           rank, nullptr, nullptr);
    rank_in = rank;
  }
  plan_pass_kernel<kCount, IdT><<<pass_grid, kWarps * 32, smem, stream>>>(ids, map, rank_in, false, p, hist, nullptr,
                                                                          nullptr, nullptr, nullptr);
  plan_scan_kernel<<<scan_grid, scan_block, 0, stream>>>(hist, tokens, p.num_chunks, num_experts);
  plan_offsets_kernel<<<1, 1024, 0, stream>>>(tokens, num_experts, block_size, offsets);
  plan_pass_kernel<kPlace, IdT><<<pass_grid, kWarps * 32, smem, stream>>>(ids, map, rank_in, false, p, hist, offsets,
                                                                          nullptr, slot_to_row, sorted_slots);
  return cudaGetLastError();
}

}  // namespace plan
}  // namespace moe_kernels
