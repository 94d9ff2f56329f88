"""The grouped GEMM's tile schedule: which segment and which first row every m-tile of a launch works on.

A plan's segments are the E experts ``[offsets[e], offsets[e+1])`` plus the tail ``[offsets[E], P)``
(segment E, rows of dropped slots). A segment of L rows takes ``cdiv(L, TILE_M)`` m-tiles, numbered
segment after segment. ``write_tiles`` fills a slice of ``tile_segment [M]`` / ``tile_row [M]`` and the
count of real tiles from the offsets alone; the plan's rank kernel calls it (no launch of its own) and
``tile_schedule_kernel`` runs it for offsets that did not come from a plan.

``max_tiles`` bounds the real tiles from shapes only, tightly enough that small batches launch few dead
programs: with ``n = min(E, P)`` non-empty segments at most, ``sum cdiv(L_e, TILE_M) <= n + cdiv(P - n, TILE_M)``
(each non-empty segment costs one tile plus one per further TILE_M rows). DeepSeek-V3 decode
(T=16, k=8, E=256, TILE_M=16): 128 tiles, where ``cdiv(P, TILE_M) + E + 1`` gives 265.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import identity_launch, next_pow2


@dataclass(frozen=True)
class TileSchedule:
    """``tile_segment [M]`` int32, ``tile_row [M]`` int32, ``num_tiles [1]`` int32 (real tiles first),
    for row tiles of ``tile_m``; ``M = max_tiles``."""

    tile_segment: torch.Tensor
    tile_row: torch.Tensor
    num_tiles: torch.Tensor
    tile_m: int
    max_tiles: int


def _sym_min(a, b):
    return torch.sym_min(a, b) if hasattr(torch, "sym_min") else min(a, b)


def max_tiles(num_rows: int, num_experts: int, tile_m: int) -> int:
    """Upper bound on the m-tiles of ``num_rows`` rows in ``num_experts`` segments plus a tail (shapes only)."""
    n = _sym_min(num_experts, num_rows)
    return n + (num_rows - n + tile_m - 1) // tile_m


def block_t(block_e: int) -> int:
    """Tiles per step of ``write_tiles`` (its segment search is a BLOCK_T x BLOCK_E comparison)."""
    return max(16, min(128, 8192 // block_e))


@triton.jit
def write_tiles(offsets_ptr, seg_ptr, row_ptr, num_ptr, num_experts, num_rows, max_tiles, t_start, t_count,
                TILE_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tiles ``[t_start, t_start + t_count)`` of the schedule (``BLOCK_E > E``); the program with
    ``t_start == 0`` writes the count."""
    e = tl.arange(0, BLOCK_E)
    lo = tl.load(offsets_ptr + e, mask=e <= num_experts, other=0).to(tl.int32)
    hi = tl.load(offsets_ptr + e + 1, mask=e < num_experts, other=0).to(tl.int32)
    hi = tl.where(e == num_experts, num_rows, hi)  # segment E: the tail
    length = tl.where(e <= num_experts, hi - lo, 0)
    tiles = (length + TILE_M - 1) // TILE_M
    end = tl.cumsum(tiles, 0)  # [BLOCK_E] inclusive: first tile after segment e
    start = end - tiles
    if t_start == 0:
        tl.store(num_ptr, tl.sum(tiles, 0))
    stop = tl.minimum(t_start + t_count, max_tiles)
    for t0 in range(t_start, stop, BLOCK_T):
        idx = t0 + tl.arange(0, BLOCK_T)
        seg = tl.sum((end[None, :] <= idx[:, None]).to(tl.int32), 1)  # segments ending at or before the tile
        seg = tl.minimum(seg, num_experts)
        row = tl.gather(lo, seg, 0) + (idx - tl.gather(start, seg, 0)) * TILE_M
        live = idx < stop
        tl.store(seg_ptr + idx, seg, mask=live)
        tl.store(row_ptr + idx, row, mask=live)


@triton.jit
def tile_schedule_kernel(offsets_ptr, seg_ptr, row_ptr, num_ptr, num_experts, num_rows, max_tiles, tiles_per_prog,
                         TILE_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    write_tiles(offsets_ptr, seg_ptr, row_ptr, num_ptr, num_experts, num_rows, max_tiles, pid * tiles_per_prog,
                tiles_per_prog, TILE_M, BLOCK_E, BLOCK_T)


def empty_schedule(num_rows: int, num_experts: int, tile_m: int, device, empty) -> TileSchedule:
    m = max_tiles(num_rows, num_experts, tile_m)
    i32 = dict(dtype=torch.int32, device=device)
    return TileSchedule(empty((m,), **i32), empty((m,), **i32), empty((1,), **i32), tile_m, m)


def tile_schedule(expert_offsets: torch.Tensor, num_rows: int, tile_m: int, *, launch=identity_launch, empty) -> TileSchedule:
    """Launcher: the schedule of ``num_rows`` rows cut by ``expert_offsets [E+1]`` (one launch, no host sync)."""
    E = expert_offsets.shape[0] - 1
    sched = empty_schedule(num_rows, E, tile_m, expert_offsets.device, empty)
    block_e = max(next_pow2(E + 1), 16)
    per_prog = 256
    grid = triton.cdiv(sched.max_tiles, per_prog)  # >= 1: callers launch only for rows > 0
    launch(tile_schedule_kernel)[(grid,)](
        expert_offsets, sched.tile_segment, sched.tile_row, sched.num_tiles, E, num_rows, sched.max_tiles, per_prog,
        TILE_M=tile_m, BLOCK_E=block_e, BLOCK_T=block_t(block_e),
    )
    return sched
