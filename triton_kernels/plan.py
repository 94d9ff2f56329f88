"""Routing plan on the device: a stable counting sort of the (token, slot) pairs by expert.

Two passes over the ids, each by the same grid of programs over contiguous chunks:
1. ``plan_hist_kernel``: each program's per-expert histogram of its chunk (``tl.histogram``).
2. ``plan_scan_kernel`` (one program): exclusive prefix sums of the histograms over programs (the
   first rank of every expert in every chunk), per-expert totals and padded expert offsets.
3. ``plan_rank_kernel``: each element's rank within its expert = the chunk's base for that expert
   + the running count of earlier sub-blocks + the count of equal experts before it in its sub-block.
   The final pass writes ``slot_to_row`` and ``sorted_slots`` and, given a row-tile size, the grouped
   GEMM's tile schedule (tile -> segment, tile -> first row, number of tiles), as vLLM's
   ``moe_align_block_size`` does: the GEMMs then need no schedule of their own.
Capacity (GShard) runs the rank pass once in priority order (all first choices before all second
choices) to find the slots that fit, then the plan pass drops the others. Sizes depend on shapes
only: no host synchronisation, CUDA-graph safe; every index is 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import identity_launch, next_pow2
from .schedule import block_t, empty_schedule, write_tiles

BLOCK = 128  # elements per sub-block (the in-block rank is a BLOCK x BLOCK comparison)
# The scan's [BLOCK_P, BLOCK_E] tile: 4096 elements over 8 warps, 16 a thread. Its column scan crosses lanes and
# warps (a histogram row is contiguous, so lanes run along the experts), which costs registers per element held:
# 8192 over 4 warps spilled on sm_80 and sm_90a at E = 60 (a 128 x 64 tile).
SCAN_TILE, SCAN_WARPS = 4096, 8


def scan_rows(block_e: int) -> int:
    """Histogram rows per step of ``plan_scan_kernel``: from E only, never a guard on the token count."""
    return max(1, min(256, SCAN_TILE // block_e))


@triton.jit
def _experts(ids_ptr, map_ptr, rank_ptr, idx, S, T, top_k, num_experts, num_global, capacity,
             PRIORITY: tl.constexpr, HAS_MAP: tl.constexpr, HAS_CAP: tl.constexpr):
    """(flat slot, local expert in [0, E], E meaning dropped) of elements ``idx`` in the pass order."""
    if PRIORITY:  # element p is choice p // T of token p % T
        slot = (idx % T) * top_k + idx // T
    else:
        slot = idx
    live = idx < S
    e = tl.load(ids_ptr + slot, mask=live, other=-1).to(tl.int64)
    if HAS_MAP:
        inside = (e >= 0) & (e < num_global)
        e = tl.where(inside, tl.load(map_ptr + tl.where(inside, e, 0), mask=live & inside, other=-1).to(tl.int64), -1)
    e = tl.where((e >= 0) & (e < num_experts), e, num_experts)
    if HAS_CAP:
        r = tl.load(rank_ptr + slot, mask=live, other=0)
        e = tl.where(r < capacity, e, num_experts)
    return slot, e


@triton.jit
def plan_hist_kernel(
    ids_ptr, map_ptr, rank_ptr, hist_ptr, S, T, top_k, num_experts, num_global, capacity, chunk,
    fill_ptr, num_rows, fill_chunk,
    PRIORITY: tl.constexpr, HAS_MAP: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr,
    FILL: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if FILL:  # sorted_slots = -1 (padding and tail rows) before the rank pass writes the real rows
        for start in range(0, fill_chunk, BLOCK):
            r = pid * fill_chunk + start + tl.arange(0, BLOCK)
            tl.store(fill_ptr + r, tl.full([BLOCK], -1, tl.int32), mask=(r < num_rows) & (r < (pid + 1) * fill_chunk))
    hist = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, chunk, BLOCK):
        idx = pid * chunk + start + tl.arange(0, BLOCK)
        _, e = _experts(ids_ptr, map_ptr, rank_ptr, idx, S, T, top_k, num_experts, num_global, capacity,
                        PRIORITY, HAS_MAP, HAS_CAP)
        hist += tl.histogram(tl.where(idx < S, e, BLOCK_E - 1).to(tl.int32), BLOCK_E)
    tl.store(hist_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E), hist)


@triton.jit
def plan_rank_kernel(
    ids_ptr, map_ptr, rank_ptr, base_ptr, offsets_ptr, rank_out_ptr, slot_to_row_ptr, sorted_slots_ptr,
    S, T, top_k, num_experts, num_global, capacity, chunk,
    tile_seg_ptr, tile_row_ptr, num_tiles_ptr, num_rows, max_tiles, tiles_per_prog,
    PRIORITY: tl.constexpr, HAS_MAP: tl.constexpr, HAS_CAP: tl.constexpr, FINAL: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK: tl.constexpr, SCHEDULE: tl.constexpr, TILE_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if SCHEDULE:  # this program's share of the GEMM tile schedule (the offsets are final already)
        write_tiles(offsets_ptr, tile_seg_ptr, tile_row_ptr, num_tiles_ptr, num_experts, num_rows, max_tiles,
                    pid * tiles_per_prog, tiles_per_prog, TILE_M, BLOCK_E, BLOCK_T)
    running = tl.load(base_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E))  # [BLOCK_E] first rank per expert
    i = tl.arange(0, BLOCK)
    earlier = i[None, :] < i[:, None]  # [BLOCK, BLOCK]: column before row
    for start in range(0, chunk, BLOCK):
        idx = pid * chunk + start + i
        live = idx < S
        slot, e = _experts(ids_ptr, map_ptr, rank_ptr, idx, S, T, top_k, num_experts, num_global, capacity,
                           PRIORITY, HAS_MAP, HAS_CAP)
        e = tl.where(live, e, BLOCK_E - 1).to(tl.int32)
        same_before = tl.sum((earlier & (e[None, :] == e[:, None])).to(tl.int32), 1)
        rank = tl.gather(running, e, 0) + same_before
        kept = live & (e < num_experts)
        if FINAL:
            row = tl.load(offsets_ptr + e, mask=kept, other=0).to(tl.int64) + rank
            tl.store(slot_to_row_ptr + slot, tl.where(kept, row, -1).to(tl.int32), mask=live)
            tl.store(sorted_slots_ptr + row, slot.to(tl.int32), mask=kept)
        else:
            tl.store(rank_out_ptr + slot, rank, mask=live)
        running += tl.histogram(e, BLOCK_E)


@triton.jit
def plan_scan_kernel(hist_ptr, base_ptr, counts_ptr, offsets_ptr, n_prog, num_experts, block_size,
                     FINAL: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: ``base`` = exclusive prefix sums of the per-program histograms over programs; with
    FINAL also the per-expert totals and the offsets of segments padded to ``block_size``."""
    e = tl.arange(0, BLOCK_E)
    p = tl.arange(0, BLOCK_P)
    running = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, n_prog, BLOCK_P):
        rows = p0 + p
        m = (rows < n_prog)[:, None]
        at = rows[:, None].to(tl.int64) * BLOCK_E + e[None, :]
        h = tl.load(hist_ptr + at, mask=m, other=0)  # [BLOCK_P, BLOCK_E]
        tl.store(base_ptr + at, running[None, :] + tl.cumsum(h, 0) - h, mask=m)
        running += tl.sum(h, 0)
    if FINAL:
        live = e < num_experts
        tl.store(counts_ptr + e, running, mask=live)
        padded = tl.where(live, (running + block_size - 1) // block_size * block_size, 0)
        tl.store(offsets_ptr + 1 + e, tl.cumsum(padded, 0), mask=live)
        tl.store(offsets_ptr + e, tl.zeros([BLOCK_E], tl.int32), mask=e == 0)


def _pass(ids, expert_map, rank_in, num_experts, capacity, priority, final, block_size, out, schedule=None, *,
          launch, empty):
    """One histogram + scan + rank pass (three launches); the final one writes the plan, the offsets
    padded to ``block_size`` and, given a ``schedule``, the GEMM tile schedule."""
    T, k = ids.shape
    S, dev = T * k, ids.device
    block_e = max(next_pow2(num_experts + 1), 16)
    n_prog = torch.sym_max(1, torch.sym_min(triton.cdiv(S, BLOCK), 1024))  # symbolic under torch.compile
    chunk = triton.cdiv(triton.cdiv(S, n_prog), BLOCK) * BLOCK
    n_prog = triton.cdiv(S, chunk)
    common = dict(PRIORITY=priority, HAS_MAP=expert_map is not None, HAS_CAP=rank_in is not None, BLOCK_E=block_e, BLOCK=BLOCK)
    map_arg = expert_map if expert_map is not None else ids
    rank_arg = rank_in if rank_in is not None else ids
    n_global = expert_map.shape[0] if expert_map is not None else 0
    cap = capacity if capacity is not None else 0
    # One row past the programs' rows: the row count is never 1, which torch.compile would otherwise
    # specialise on (one graph for the token counts with one program, one for the rest).
    hist = empty((n_prog + 1, block_e), dtype=torch.int32, device=dev)
    fill = out[2] if final else None
    launch(plan_hist_kernel)[(n_prog,)](ids, map_arg, rank_arg, hist, S, T, k, num_experts, n_global, cap, chunk,
                                        fill if fill is not None else hist, fill.shape[0] if fill is not None else 0,
                                        triton.cdiv(fill.shape[0], n_prog) if fill is not None else 0,
                                        FILL=fill is not None, **common)
    base = empty((n_prog + 1, block_e), dtype=torch.int32, device=dev)  # first rank per (program, expert)
    counts = empty((num_experts,), dtype=torch.int32, device=dev) if final else base
    offsets = empty((num_experts + 1,), dtype=torch.int32, device=dev) if final else base
    launch(plan_scan_kernel)[(1,)](hist, base, counts, offsets, n_prog, num_experts, block_size, FINAL=final,
                                   BLOCK_E=block_e, BLOCK_P=scan_rows(block_e), num_warps=SCAN_WARPS)
    rank_out, slot_to_row, sorted_slots = out
    sched = schedule
    launch(plan_rank_kernel)[(n_prog,)](
        ids, map_arg, rank_arg, base, offsets, rank_out if rank_out is not None else base,
        slot_to_row if slot_to_row is not None else base, sorted_slots if sorted_slots is not None else base,
        S, T, k, num_experts, n_global, cap, chunk,
        sched.tile_segment if sched else base, sched.tile_row if sched else base, sched.num_tiles if sched else base,
        S + num_experts * (block_size - 1), sched.max_tiles if sched else 0,
        triton.cdiv(sched.max_tiles, n_prog) if sched else 0,
        FINAL=final, SCHEDULE=sched is not None, TILE_M=sched.tile_m if sched else 1, BLOCK_T=block_t(block_e), **common,
    )
    return (counts, offsets) if final else (None, None)


def plan_routing(topk_ids, num_experts, block_size, capacity, expert_map, *, launch=identity_launch, empty):
    """Launcher: ``(sorted_slots [P], expert_offsets [E+1], tokens_per_expert [E], slot_to_row [S])``, int32."""
    return plan_schedule(topk_ids, num_experts, block_size, capacity, expert_map, 0, launch=launch, empty=empty)[:4]


def plan_schedule(topk_ids, num_experts, block_size, capacity, expert_map, tile_m, *, launch=identity_launch, empty):
    """Launcher: :func:`plan_routing`'s four tensors and, for ``tile_m > 0``, the grouped GEMM's
    :class:`TileSchedule` of row tiles of ``tile_m`` over the plan's ``P`` rows (else None), from the
    same launches."""
    T, k = topk_ids.shape
    S, E, dev = T * k, num_experts, topk_ids.device
    P = S + E * (block_size - 1)
    ids = topk_ids.contiguous()
    emap = expert_map.contiguous() if expert_map is not None else None
    sorted_slots = empty((P,), dtype=torch.int32, device=dev)  # -1 where no slot: filled by the first launch
    slot_to_row = empty((S,), dtype=torch.int32, device=dev)
    sched = empty_schedule(P, E, tile_m, dev, empty) if tile_m > 0 else None
    if S == 0:
        sorted_slots.fill_(-1)
        if sched is not None:
            sched.num_tiles.zero_()
        return (sorted_slots, torch.zeros(E + 1, dtype=torch.int32, device=dev), torch.zeros(E, dtype=torch.int32, device=dev),
                slot_to_row, sched)
    kw = dict(launch=launch, empty=empty)
    rank = None
    if capacity is not None:
        rank = empty((S,), dtype=torch.int32, device=dev)
        _pass(ids, emap, None, E, None, True, False, block_size, (rank, None, None), **kw)
    counts, offsets = _pass(ids, emap, rank, E, capacity, False, True, block_size, (None, slot_to_row, sorted_slots),
                            sched, **kw)
    return sorted_slots, offsets, counts, slot_to_row, sched


def capacity_drop(topk_ids, num_experts, capacity, drop_policy, topk_weights, expert_map, *, launch=identity_launch,
                  empty):
    """Launcher of the ``position`` and ``probs`` capacity policies: ``topk_ids`` as int32 with -1 for every
    slot whose (local) expert already holds ``capacity`` slots earlier in the policy's order; the plan pass
    then runs without a capacity. One rank pass (in slot order, or over the ids gathered in weight order)."""
    T, k = topk_ids.shape
    S, dev = T * k, topk_ids.device
    ids = topk_ids.contiguous()
    if S == 0:
        return ids.to(torch.int32)
    emap = expert_map.contiguous() if expert_map is not None else None
    order = None
    if drop_policy == "position":
        pass_ids = ids
    else:  # the pass visits the slots in ``order``: a [1, S] id array in that order
        w = topk_weights.reshape(-1)  # probs: highest weight first, NaN as -inf, ties to the lower slot
        order = torch.sort(torch.where(torch.isnan(w), float("-inf"), w), descending=True, stable=True).indices
        pass_ids = ids.reshape(-1).index_select(0, order).view(1, S)
    rank = empty((S,), dtype=torch.int32, device=dev)
    _pass(pass_ids, emap, None, num_experts, None, False, False, 1, (rank, None, None), launch=launch, empty=empty)
    if order is not None:
        rank = torch.empty_like(rank).scatter_(0, order, rank)
    return torch.where(rank.view(T, k) < capacity, ids.to(torch.int32), -1)
