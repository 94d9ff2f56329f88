"""Grouped expert GEMM over the segments of a routing plan, with optional fusions.

``y[r] = epilogue(x[row(r)] @ w[e(r)]^T)`` for every row r of expert e's segment, one launch for all
experts. The tile schedule (expert, m-tile) is computed on the device from the expert offsets: the
grid is sized from shapes only (``cdiv(P, BLOCK_M) + E`` m-tiles is an upper bound), and programs
past the last real tile exit at once, so empty experts cost nothing and nothing syncs with the host.

Flags of the one kernel (no twin kernels):
- ``GATHER``: row r reads ``x[sorted_slots[r] // k]`` (token order) instead of ``x[r]``.
- ``ACT``: a gated activation epilogue; the program computes the gate tile (rows ``[n, n+BN)`` of w)
  and the up tile (rows ``[I+n, ...)``) and writes ``act(gate) * up`` (bias added before the act).
  ``INTERLEAVED``: gate and up rows alternate (gpt-oss): gate rows ``2n``, up rows ``2n+1``.
- ``SCATTER``: write row r at its slot ``sorted_slots[r]`` (token order), for a deterministic
  reduction over the k slots afterwards; ``OUT_SCALE`` multiplies it by its routing weight first.
- ``IN_SCALE``: scale the gathered rows by their routing weight before the product (Llama-4).
- weight layout by strides: ``w[e]`` as ``[N, K]`` or ``[K, N]``; dX in backward is this kernel with
  the weight read transposed.
``grouped_wgrad_kernel`` computes per-expert ``a_e^T @ b_e`` over the rows of each segment (dW)
without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import identity_launch, next_pow2
from .configs import get_config

ACTS = {"none": 0, "silu": 1, "gelu": 2, "relu": 3, "swiglu_oai": 4}


@triton.jit
def _activate(g, u, ACT: tl.constexpr, GATED: tl.constexpr):
    # max/min propagate NaN (the default drops it): a NaN token gives a NaN row, as the reference does
    if ACT == 4:  # gpt-oss: clamped gate and up, (up + 1) * gate * sigmoid(1.702 gate)
        g = tl.minimum(g, 7.0, propagate_nan=tl.PropagateNan.ALL)
        u = tl.minimum(tl.maximum(u, -7.0, propagate_nan=tl.PropagateNan.ALL), 7.0, propagate_nan=tl.PropagateNan.ALL)
        return (u + 1.0) * g * tl.sigmoid(1.702 * g)
    if ACT == 1:
        a = g * tl.sigmoid(g)
    elif ACT == 2:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 3:
        a = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        a = g
    if GATED:
        a = a * u
    return a


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 operands: full fp32 products, as torch's default matmul (no TF32)
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, slots_ptr, row_w_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, num_tiles_ptr,
    N, K, inter, top_k, num_m_tiles, num_experts,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_ym,
    HAS_SLOTS: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERLEAVED: tl.constexpr = False,
):
    pid = tl.program_id(0)
    m_tile = pid % num_m_tiles
    n_tile = pid // num_m_tiles
    if m_tile >= tl.load(num_tiles_ptr):
        return
    e = tl.load(tile_expert_ptr + m_tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + m_tile).to(tl.int64)
    row_end = tl.load(offsets_ptr + e + 1).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns
    cmask = cols < N
    if e >= num_experts:  # the rows past the last segment: zeros (in expert order only)
        if not SCATTER:
            zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], zero, mask=(rows < row_end)[:, None] & cmask[None, :])
        return
    rmask = rows < row_end
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        rmask = rmask & (slot >= 0)
    if GATHER:
        src = tl.where(rmask, slot // top_k, 0)
    else:
        src = rows
    if IN_SCALE or OUT_SCALE:
        row_w = tl.load(row_w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
    w_e = w_ptr + e * stride_we
    g_rows = cols * 2 if INTERLEAVED else cols  # weight (and bias) rows of the gate
    up_shift = 1 if INTERLEAVED else inter  # up row of gate row r: r + up_shift
    g_ptrs = w_e + g_rows[None, :] * stride_wn + ks[:, None] * stride_wk  # [BK, BN]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GATED:
        u_ptrs = g_ptrs + up_shift * stride_wn
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if IN_SCALE:  # Llama-4: the routing weight scales the token before the experts
            a = (a.to(tl.float32) * row_w[:, None]).to(a.dtype)
        b = tl.load(g_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 bit patterns: upcast there
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc_g = _dot(a, b, acc_g, IEEE)
        if GATED:
            bu = tl.load(u_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:
                bu = bu.to(tl.float32)
            acc_u = _dot(a, bu, acc_u, IEEE)
            u_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + e * stride_be + g_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(bias_ptr + e * stride_be + up_shift + g_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ACT != 0:
        if GATED:
            acc_g = _activate(acc_g, acc_u, ACT, GATED)
        else:
            acc_g = _activate(acc_g, acc_g, ACT, GATED)
    if OUT_SCALE:
        acc_g = acc_g * row_w[:, None]
    if SCATTER:
        dst = tl.where(rmask, slot, 0)
        omask = rmask[:, None] & cmask[None, :]
    else:
        dst = rows
        acc_g = tl.where(rmask[:, None], acc_g, 0.0)  # padding rows of a segment are zero
        omask = (rows < row_end)[:, None] & cmask[None, :]
    tl.store(y_ptr + dst[:, None] * stride_ym + cols[None, :], acc_g.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def grouped_wgrad_kernel(
    a_ptr, b_ptr, out_ptr, offsets_ptr, slots_ptr, A, B, stride_am, stride_bm, num_a_tiles, num_b_tiles,
    HAS_SLOTS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[e] = a_e^T @ b_e over the rows of segment e (padding rows of a plan skipped): [E, A, B], fp32
    accumulation, every element written."""
    pid = tl.program_id(0)
    e = pid // (num_a_tiles * num_b_tiles)
    rest = pid % (num_a_tiles * num_b_tiles)
    ia = (rest // num_b_tiles).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    ib = (rest % num_b_tiles).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    lo = tl.load(offsets_ptr + e).to(tl.int64)
    hi = tl.load(offsets_ptr + e + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    ms = tl.arange(0, BLOCK_M)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + ms
        rm = rows < hi
        if HAS_SLOTS:
            rm = rm & (tl.load(slots_ptr + rows, mask=rm, other=-1) >= 0)
        at = tl.load(a_ptr + rows[None, :] * stride_am + ia[:, None], mask=rm[None, :] & (ia < A)[:, None], other=0.0)
        bt = tl.load(b_ptr + rows[:, None] * stride_bm + ib[None, :], mask=rm[:, None] & (ib < B)[None, :], other=0.0)
        if UPCAST:
            at, bt = at.to(tl.float32), bt.to(tl.float32)
        acc = _dot(at, bt, acc, IEEE)
    out = out_ptr + e.to(tl.int64) * A * B + ia[:, None] * B + ib[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(ia < A)[:, None] & (ib < B)[None, :])


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_schedule(expert_offsets: torch.Tensor, num_rows: int, block_m: int):
    """Device-side (segment, first row) of every m-tile and the count of real tiles; no host sync.

    The segments are the E experts plus the tail ``[offsets[E], P)`` (segment E, written as zeros).
    Returns ``(tile_segment [M] int32, tile_row [M] int64, num_tiles [1] int32, ends [E+2] int64, M)``
    with ``M = cdiv(P, BM) + E + 1`` an upper bound on the tiles.
    """
    E = expert_offsets.shape[0] - 1
    ends = torch.cat([expert_offsets.to(torch.int64), expert_offsets.new_full((1,), num_rows, dtype=torch.int64)])
    tiles = (ends[1:] - ends[:-1] + block_m - 1) // block_m  # [E+1]
    tile_start = torch.cat([tiles.new_zeros(1), torch.cumsum(tiles, 0)])  # [E+2]
    max_tiles = triton.cdiv(num_rows, block_m) + E + 1
    idx = torch.arange(max_tiles, device=ends.device)
    seg = torch.searchsorted(tile_start[1:].contiguous(), idx, right=True).clamp(max=E)
    row = ends[seg] + (idx - tile_start[seg]) * block_m
    return seg.to(torch.int32), row, tile_start[-1:].to(torch.int32), ends, max_tiles


def grouped_gemm(
    x, w, expert_offsets, bias, sorted_slots, trans_w, *, gather_top_k=0, activation="none", gated=False,
    interleaved=False, row_weights=None, scale_input=False, scatter_slots=0, config=None, launch=identity_launch, empty,
):
    """Launcher. ``w[e]`` is ``[N, K]`` (``trans_w``) or ``[K, N]``; N counts output columns (``inter``
    for a gated activation, whose weight has ``2*inter`` rows, gate then up or ``interleaved``). ``row_weights`` (per slot, ``[T*k]``)
    scale the input rows (``scale_input``) or the output rows. Returns ``[P, N]`` in expert order, or
    ``[scatter_slots, N]`` in slot order when ``scatter_slots > 0`` (rows of dropped slots not written).
    ``config`` overrides the tile config (for tuning)."""
    P = sorted_slots.shape[0] if sorted_slots is not None else x.shape[0]
    E = w.shape[0]
    n_w = w.shape[1] if trans_w else w.shape[2]
    K = w.shape[2] if trans_w else w.shape[1]
    N = n_w // 2 if gated else n_w
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if trans_w else (w.stride(2), w.stride(1))
    scatter = scatter_slots > 0
    y = empty((scatter_slots if scatter else P, N), dtype=x.dtype, device=x.device)
    if P == 0 or N == 0 or y.shape[0] == 0:
        return y
    kernel = "gemm_gated" if gated else "gemm"
    cfg = config or get_config(kernel, P, N, K, E, x.dtype, x.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if _interpreting():  # small tiles keep the interpreter fast; tile sizes do not change results
        bm, bn, bk = min(bm, 32), min(bn, 64), min(bk, 32)
    tile_seg, tile_row, num_tiles, ends, max_tiles = tile_schedule(expert_offsets, P, bm)
    grid = (max_tiles * triton.cdiv(N, bn),)
    bias = bias.contiguous() if bias is not None else None
    launch(grouped_gemm_kernel)[grid](
        x, w, bias if bias is not None else w, y, sorted_slots if sorted_slots is not None else tile_seg,
        row_weights if row_weights is not None else w, tile_seg, tile_row, ends, num_tiles,
        N, K, N, max(gather_top_k, 1), max_tiles, E,
        x.stride(0), x.stride(1), w.stride(0), stride_wn, stride_wk, bias.stride(0) if bias is not None else 0, y.stride(0),
        HAS_SLOTS=sorted_slots is not None, GATHER=gather_top_k > 0, SCATTER=scatter,
        IN_SCALE=row_weights is not None and scale_input, OUT_SCALE=row_weights is not None and not scale_input,
        HAS_BIAS=bias is not None,
        ACT=ACTS[activation], GATED=gated, UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INTERLEAVED=bool(interleaved and gated),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def grouped_wgrad(a, b, expert_offsets, sorted_slots=None, *, launch=identity_launch, empty):
    """Launcher: ``[E, A, B]`` with ``out[e] = a_e^T @ b_e`` over segment e's rows (zeros for empty experts),
    skipping the padding rows of ``sorted_slots`` when given."""
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    E, A, B = expert_offsets.shape[0] - 1, a.shape[1], b.shape[1]
    out = empty((E, A, B), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    ba, bb = min(64, max(16, next_pow2(A))), min(64, max(16, next_pow2(B)))
    na, nb = triton.cdiv(A, ba), triton.cdiv(B, bb)
    launch(grouped_wgrad_kernel)[(E * na * nb,)](
        a, b, out, expert_offsets, sorted_slots if sorted_slots is not None else expert_offsets, A, B,
        a.stride(0), b.stride(0), na, nb, HAS_SLOTS=sorted_slots is not None,
        UPCAST=_interpreting() and a.dtype == torch.bfloat16, IEEE=a.dtype == torch.float32,
        BLOCK_A=ba, BLOCK_B=bb, BLOCK_M=32,
    )
    return out
