"""Row movement between token order and expert order: permute (gather), unpermute (weighted
combine) and the routing-weight gradient (row dot products).

Every kernel writes every element of its output (padding rows as zeros), addresses rows in 64 bits
and reduces in a fixed order (no atomics), so results are deterministic and a token's result does
not depend on the other tokens of the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import identity_launch, next_pow2


@triton.jit
def permute_kernel(
    x_ptr, slots_ptr, w_ptr, out_ptr, P, H, stride_x, top_k,
    HAS_WEIGHTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[r] = w[slot] * x[slot // k] for slot = sorted_slots[r]; zero where slot = -1."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask, cmask = rows < P, cols < H
    slot = tl.load(slots_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    live = slot >= 0
    tok = tl.where(live, slot // top_k, 0)
    v = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=live[:, None] & cmask[None, :], other=0.0)
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + slot, mask=live, other=0.0).to(tl.float32)
        v = v.to(tl.float32) * w[:, None]
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def unpermute_kernel(
    y_ptr, slot_to_row_ptr, w_ptr, out_ptr, T, N, stride_y, top_k,
    HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = sum_j w[t, j] * y[slot_to_row[t*k + j]] over kept slots, fp32, j ascending."""
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask, cmask = toks < T, cols < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for j in range(top_k):
        slot = toks * top_k + j
        row = tl.load(slot_to_row_ptr + slot, mask=tmask, other=-1).to(tl.int64)
        live = row >= 0
        v = tl.load(y_ptr + tl.where(live, row, 0)[:, None] * stride_y + cols[None, :],
                    mask=live[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            v = v * tl.load(w_ptr + slot, mask=tmask & live, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + toks[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def slot_dots_kernel(
    rows_ptr, slot_to_row_ptr, tok_ptr, out_ptr, S, N, stride_rows, stride_tok, top_k,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[s] = <rows[slot_to_row[s]], tok[s // k]> in fp32; 0 for dropped slots."""
    slots = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = slots < S
    row = tl.load(slot_to_row_ptr + slots, mask=smask, other=-1).to(tl.int64)
    live = row >= 0
    tok = slots // top_k
    acc = tl.zeros([BLOCK_S], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        m = live[:, None] & (cols < N)[None, :]
        a = tl.load(rows_ptr + tl.where(live, row, 0)[:, None] * stride_rows + cols[None, :], mask=m, other=0.0)
        b = tl.load(tok_ptr + tok[:, None] * stride_tok + cols[None, :], mask=m, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    tl.store(out_ptr + slots, acc, mask=smask)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_cols(n: int) -> int:
    return min(max(next_pow2(n), 16), 1024)


def permute(x, sorted_slots, slot_to_row, top_k, row_weights, *, launch=identity_launch, empty):
    """Launcher: ``x [T, H]`` -> ``[P, H]``; ``row_weights`` [T, k] (optional) scales each row by its slot's weight."""
    x = _row_major(x)
    P, H = sorted_slots.shape[0], x.shape[1]
    out = empty((P, H), dtype=x.dtype, device=x.device)
    if P == 0 or H == 0:
        return out
    block_h = _block_cols(H)
    block_r = max(1, min(64, 4096 // block_h))
    w = row_weights.contiguous() if row_weights is not None else x
    launch(permute_kernel)[(triton.cdiv(P, block_r), triton.cdiv(H, block_h))](
        x, sorted_slots, w, out, P, H, x.stride(0), top_k,
        HAS_WEIGHTS=row_weights is not None, BLOCK_R=block_r, BLOCK_H=block_h,
    )
    return out


def unpermute(y_sorted, sorted_slots, slot_to_row, top_k, topk_weights, *, launch=identity_launch, empty):
    """Launcher: ``y_sorted [P, N]`` -> ``[T, N]``, weighted by ``topk_weights`` [T, k] when given."""
    y_sorted = _row_major(y_sorted)
    T, N = slot_to_row.shape[0] // top_k, y_sorted.shape[1]
    out = empty((T, N), dtype=y_sorted.dtype, device=y_sorted.device)
    if T == 0 or N == 0:
        return out
    block_n = _block_cols(N)
    block_t = max(1, min(64, 4096 // block_n))
    w = topk_weights.contiguous() if topk_weights is not None else y_sorted
    launch(unpermute_kernel)[(triton.cdiv(T, block_t), triton.cdiv(N, block_n))](
        y_sorted, slot_to_row, w, out, T, N, y_sorted.stride(0), top_k,
        HAS_WEIGHTS=topk_weights is not None, BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return out


def slot_dots(rows, slot_to_row, per_token, top_k, *, launch=identity_launch, empty):
    """Launcher: ``[T, k]`` fp32 dot products of each kept slot's row with its token's row."""
    rows, per_token = _row_major(rows), _row_major(per_token)
    S, N = slot_to_row.shape[0], rows.shape[1]
    out = empty((S // top_k, top_k), dtype=torch.float32, device=rows.device)
    if S == 0:
        return out
    block_n = min(max(next_pow2(N), 16), 128)
    block_s = 32
    launch(slot_dots_kernel)[(triton.cdiv(S, block_s),)](
        rows, slot_to_row, per_token, out, S, N, rows.stride(0), per_token.stride(0), top_k,
        BLOCK_S=block_s, BLOCK_N=block_n,
    )
    return out
