"""The last step of a fused MoE path: the sum over each token's k slots, in fixed order (no atomics).

``out[t] = sum_j rows[t*k + j]`` over the kept slots (``slot_to_row >= 0``) of rows already in slot
order (the GEMM scattered them there, weighted), j ascending, in fp32. With partial dot products
``parts [n, S]`` (one per n-tile of a GEMM, see grouped_gemm's ``ROW_DOT``) it also writes
``dw[s] = sum_i parts[i, s]`` (0 for dropped slots): the routing-weight gradient of the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import identity_launch, next_pow2


@triton.jit
def combine_kernel(
    rows_ptr, slot_to_row_ptr, out_ptr, parts_ptr, dw_ptr, T, N, top_k, n_parts, stride_rows, stride_parts,
    HAS_PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask, cmask = toks < T, cols < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for j in range(top_k):
        slot = toks * top_k + j
        live = tl.load(slot_to_row_ptr + slot, mask=tmask, other=-1) >= 0
        acc += tl.load(rows_ptr + slot[:, None] * stride_rows + cols[None, :], mask=live[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
        if HAS_PARTS:
            if tl.program_id(1) == 0:
                d = tl.zeros([BLOCK_T], tl.float32)
                for p0 in range(0, n_parts, BLOCK_P):
                    ps = p0 + tl.arange(0, BLOCK_P)
                    v = tl.load(parts_ptr + ps[None, :] * stride_parts + slot[:, None],
                                mask=live[:, None] & (ps < n_parts)[None, :], other=0.0)
                    d += tl.sum(v, 1)
                tl.store(dw_ptr + slot, d, mask=tmask)
    tl.store(out_ptr + toks[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


def combine(rows, slot_to_row, top_k, parts=None, *, launch=identity_launch, empty):
    """Launcher: ``rows [S, N]`` (slot order) -> ``[T, N]``; with ``parts`` also ``dw [T, k]`` fp32: ``(out, dw)``."""
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    S, N = slot_to_row.shape[0], rows.shape[1]
    T = S // top_k
    out = empty((T, N), dtype=rows.dtype, device=rows.device)
    dw = empty((T, top_k), dtype=torch.float32, device=rows.device) if parts is not None else None
    if T == 0 or (N == 0 and parts is None):
        return (out, dw) if parts is not None else out
    if parts is not None and parts.shape[0] == 0:
        parts = None  # no n-tile wrote a partial (N = 0): the dots are zero
        dw.zero_()
    block_n = min(max(next_pow2(N), 16), 1024)
    block_t = max(1, min(64, 4096 // block_n))
    launch(combine_kernel)[(triton.cdiv(T, block_t), max(1, triton.cdiv(N, block_n)))](
        rows, slot_to_row, out, parts if parts is not None else rows, dw if dw is not None else rows, T, N, top_k,
        parts.shape[0] if parts is not None else 0, rows.stride(0), parts.stride(0) if parts is not None else 0,
        HAS_PARTS=parts is not None, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_P=16,
    )
    return (out, dw) if dw is not None else out
