"""Grouped expert GEMM over the segments of a routing plan, with optional fusions.

``y[r] = epilogue(x[row(r)] @ w[e(r)]^T)`` for every row r of expert e's segment, one launch for all
experts. The tile schedule (segment, first row of every m-tile) comes from the plan's launches or one
launch of :mod:`schedule`; the grid is sized from shapes only (``max_tiles``, a tight bound), programs
past the last real tile exit at once, so empty experts cost nothing and nothing syncs with the host.
Tile order: groups of GROUP_M m-tiles with the n-tiles inside a group (an m-tile's A rows are read
from HBM about once, not once per n-tile); PERSISTENT programs (SMs x resident) stride over the real
tiles in the same order.

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
- ``STORE_PRE``: also write the pre-activation (kept for the backward, ``save_preactivation``).
- ``ACT_BWD``: the epilogue of dA = dY . W2: the activation's backward at the pre-activation h gives dH
  directly, act(h) is written for dW2; ``ROW_DOT`` partial dots give d(routing weights) without a
  second GEMM.
``grouped_wgrad_kernel`` computes per-expert ``a_e^T @ b_e`` over the rows of each segment (dW)
without atomics, persistent over (expert, tile), gathering token rows through the plan, with the bias
gradient from the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tma as _tma
from ._utils import identity_launch
from .schedule import _sym_min, tile_schedule
from .tiles import gemm_config, interpreting, wgrad_config

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
def _activate_backward(da, g, u, ACT: tl.constexpr, GATED: tl.constexpr):
    """``(d gate, d up, act)`` of ``act(g) * u`` (or ``act(g)``) given ``da`` = d loss / d act, in fp32."""
    if ACT == 4:
        gc = tl.minimum(g, 7.0, propagate_nan=tl.PropagateNan.ALL)
        uc = tl.minimum(tl.maximum(u, -7.0, propagate_nan=tl.PropagateNan.ALL), 7.0, propagate_nan=tl.PropagateNan.ALL)
        sg = tl.sigmoid(1.702 * gc)
        dg = tl.where(g <= 7.0, da * (uc + 1.0) * (sg + 1.702 * gc * sg * (1.0 - sg)), 0.0)
        du = tl.where((u >= -7.0) & (u <= 7.0), da * gc * sg, 0.0)
        return dg, du, (uc + 1.0) * gc * sg
    if ACT == 1:
        sg = tl.sigmoid(g)
        act = g * sg
        dact = sg * (1.0 + g * (1.0 - sg))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == 3:
        act = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)
        dact = tl.where(g > 0.0, 1.0, 0.0)
    else:
        act = g
        dact = tl.full(g.shape, 1.0, tl.float32)
    if GATED:
        return da * u * dact, da * act, act * u
    return da * dact, da, act


@triton.jit
def _tile_coords(t, num_m, num_n, GROUP_M):
    """(m-tile, n-tile) of linear tile ``t``: groups of GROUP_M m-tiles, n-tiles inside a group (the A rows
    of a group stay in L2 while every n-tile reads them)."""
    in_group = GROUP_M * num_n
    first_m = (t // in_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (t % in_group) % size, (t % in_group) // size


# ----- the tile prologue and epilogue shared by the GEMM kernels (bf16/fp16/fp32 here, FP8 in fp8_gemm) -------

@triton.jit
def _zero_rows(y_ptr, rows, cols, num_rows, cmask, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zeros in the rows of a tile past the last segment (in expert order, rows < ``num_rows``)."""
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], zero, mask=(rows < num_rows)[:, None] & cmask[None, :])


@triton.jit
def _tile_rows(rows, row_end, slots_ptr, top_k, HAS_SLOTS: tl.constexpr, GATHER: tl.constexpr):
    """``(rmask, slot, src)`` of a tile's plan rows ``rows`` (int64) in a segment ending at ``row_end``: the live
    rows (padding slots of a plan, -1, are dead), each row's slot, and the row of x it reads (the token
    ``slot // top_k`` when gathering)."""
    rmask = rows < row_end
    slot = rows
    if HAS_SLOTS:
        slot = tl.load(slots_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        rmask = rmask & (slot >= 0)
    if GATHER:
        src = tl.where(rmask, slot // top_k, 0)
    else:
        src = rows
    return rmask, slot, src


@triton.jit
def _bias_act(acc_g, acc_u, bias_ptr, e, stride_be, g_cols, up_shift, cmask, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
              DUAL: tl.constexpr, STOPPED: tl.constexpr = False):
    """The bias (gate columns ``g_cols``, up columns ``g_cols + up_shift`` when DUAL) added to the fp32
    accumulators, then the activation (``act(gate) * up`` when DUAL) unless STOPPED (the caller applies it
    after keeping the pre-activation). Returns ``(acc_g, acc_u)``."""
    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + e * stride_be + g_cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if DUAL:
            acc_u += tl.load(bias_ptr + e * stride_be + up_shift + g_cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ACT != 0 and not STOPPED:
        acc_g = _activate(acc_g, acc_u if DUAL else acc_g, ACT, DUAL)
    return acc_g, acc_u


@triton.jit
def _store_rows(y_ptr, acc, rows, slot, rmask, row_end, cols, cmask, stride_ym, row_w, OUT_SCALE: tl.constexpr,
                SCATTER: tl.constexpr):
    """The epilogue's store of an fp32 tile: times the rows' routing weights (OUT_SCALE), at the rows' slots
    (SCATTER: token order, dead rows not written) or in expert order with the padding rows of a segment zero.
    Returns ``(values as stored, destination rows, store mask)``."""
    if OUT_SCALE:
        acc = acc * row_w[:, None]
    if SCATTER:
        dst = tl.where(rmask, slot, 0)
        omask = rmask[:, None] & cmask[None, :]
    else:
        dst = rows
        acc = tl.where(rmask[:, None], acc, 0.0)  # padding rows of a segment are zero
        omask = (rows < row_end)[:, None] & cmask[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + dst[:, None] * stride_ym + cols[None, :], out, mask=omask)
    return out, dst, omask


@triton.jit
def _gemm_tile(
    m_tile, n_tile, x_ptr, w_ptr, bias_ptr, y_ptr, slots_ptr, row_w_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    pre_ptr, act_out_ptr, tok_ptr, part_ptr, a_desc, wg_desc, wu_desc,
    N, K, inter, top_k, num_experts, num_rows,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_ym, stride_pre, stride_tok, stride_part,
    HAS_SLOTS: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, STORE_PRE: tl.constexpr, ACT_BWD: tl.constexpr, ROW_DOT: tl.constexpr, BIAS_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERLEAVED: tl.constexpr,
    TMA_A: tl.constexpr, TMA_W: tl.constexpr, W_KMAJOR: tl.constexpr,
):
    e = tl.load(tile_expert_ptr + m_tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + m_tile).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns
    cmask = cols < N
    if e >= num_experts:  # the rows past the last segment: zeros (in expert order only)
        if not SCATTER and not ACT_BWD:
            _zero_rows(y_ptr, rows, cols, num_rows, cmask, stride_ym, BLOCK_M, BLOCK_N)
    else:
        row_end = tl.load(offsets_ptr + e + 1).to(tl.int64)
        rmask, slot, src = _tile_rows(rows, row_end, slots_ptr, top_k, HAS_SLOTS, GATHER)
        if IN_SCALE or OUT_SCALE:
            row_w = tl.load(row_w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
        DUAL: tl.constexpr = GATED and not ACT_BWD  # gate and up tiles in the main loop
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
        w_e = w_ptr + e * stride_we
        # gate columns of w13 / b13 / h (gate then up, or interleaved): gate c at g_cols, its up at + up_shift
        g_cols = cols * 2 if INTERLEAVED else cols
        up_shift = 1 if INTERLEAVED else inter
        w_cols = g_cols if DUAL else cols
        g_ptrs = w_e + w_cols[None, :] * stride_wn + ks[:, None] * stride_wk  # [BK, BN]
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if DUAL:
            u_ptrs = g_ptrs + up_shift * stride_wn
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if BIAS_DOT:  # <bias_dot[e], x row>, from the A tiles already loaded
            bdot = tl.zeros([BLOCK_M], tl.float32)
        n0 = n_tile * BLOCK_N
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + ks) < K
            if TMA_A:  # rows of x in expert order: a box (rows past the segment are masked in the epilogue)
                a = a_desc.load([row0.to(tl.int32), k0])
            else:
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            if IN_SCALE:  # Llama-4: the routing weight scales the token before the experts
                a = (a.to(tl.float32) * row_w[:, None]).to(a.dtype)
            if BIAS_DOT:
                bk = tl.load(bias_ptr + e * stride_be + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
                bdot += tl.sum(a.to(tl.float32) * bk[None, :], 1)
            if TMA_W:
                b = _tma.weight_tile(wg_desc, e, n0, k0, W_KMAJOR, BLOCK_N, BLOCK_K)
            else:
                b = tl.load(g_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if UPCAST:  # the interpreter multiplies bf16 bit patterns: upcast there
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc_g = _dot(a, b, acc_g, IEEE)
            if DUAL:
                if TMA_W:
                    bu = _tma.weight_tile(wu_desc, e, n0, k0, W_KMAJOR, BLOCK_N, BLOCK_K)
                else:
                    bu = tl.load(u_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
                if UPCAST:
                    bu = bu.to(tl.float32)
                acc_u = _dot(a, bu, acc_u, IEEE)
                u_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_xk
            g_ptrs += BLOCK_K * stride_wk
        if ACT_BWD:
            # dA = dY . W2 tile -> dH from the pre-activation h; act(h) for dW2; d(routing weight) partial
            wmask = (rows < row_end)[:, None] & cmask[None, :]
            hmask = rmask[:, None] & cmask[None, :]
            h_cols = g_cols if GATED else cols
            h_ptrs = pre_ptr + rows[:, None] * stride_pre + h_cols[None, :]
            hg = tl.load(h_ptrs, mask=hmask, other=0.0).to(tl.float32)
            hu = hg
            if GATED:
                hu = tl.load(h_ptrs + up_shift, mask=hmask, other=0.0).to(tl.float32)
            da = acc_g
            if OUT_SCALE:
                da = da * row_w[:, None]
            dg, du, act = _activate_backward(da, hg, hu, ACT, GATED)
            if ROW_DOT:  # <ys row, dY row> = <act(h), dY . W2> (+ <b2, dY row>): no second GEMM
                part = tl.sum(act.to(y_ptr.dtype.element_ty).to(tl.float32) * acc_g, 1)
                if BIAS_DOT:
                    part += tl.where(n_tile == 0, bdot, 0.0)
                tl.store(part_ptr + n_tile * stride_part + slot, part, mask=rmask)
            d_ptrs = y_ptr + rows[:, None] * stride_ym + h_cols[None, :]
            tl.store(d_ptrs, tl.where(rmask[:, None], dg, 0.0).to(y_ptr.dtype.element_ty), mask=wmask)
            if GATED:
                tl.store(d_ptrs + up_shift, tl.where(rmask[:, None], du, 0.0).to(y_ptr.dtype.element_ty), mask=wmask)
            tl.store(act_out_ptr + rows[:, None] * N + cols[None, :],
                     tl.where(rmask[:, None], act, 0.0).to(act_out_ptr.dtype.element_ty), mask=wmask)
        else:
            acc_g, acc_u = _bias_act(acc_g, acc_g if not DUAL else acc_u, bias_ptr, e, stride_be, w_cols, up_shift,
                                     cmask, HAS_BIAS, ACT, DUAL, STORE_PRE)
            if STORE_PRE:  # the pre-activation (in w13's row order), kept for the backward
                pmask = (rows < row_end)[:, None] & cmask[None, :]
                p_ptrs = pre_ptr + rows[:, None] * stride_pre + w_cols[None, :]
                tl.store(p_ptrs, tl.where(rmask[:, None], acc_g, 0.0).to(pre_ptr.dtype.element_ty), mask=pmask)
                if DUAL:
                    tl.store(p_ptrs + up_shift, tl.where(rmask[:, None], acc_u, 0.0).to(pre_ptr.dtype.element_ty), mask=pmask)
                if ACT != 0:
                    acc_g = _activate(acc_g, acc_u if DUAL else acc_g, ACT, DUAL)
            if ROW_DOT:  # d(routing weight on the input) partial: <dX row before the weight, token row>
                tok_row = tl.where(rmask, slot // top_k, 0)
                tok = tl.load(tok_ptr + tok_row[:, None] * stride_tok + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                              other=0.0).to(tl.float32)
                tl.store(part_ptr + n_tile * stride_part + slot, tl.sum(acc_g * tok, 1), mask=rmask)
            _store_rows(y_ptr, acc_g, rows, slot, rmask, row_end, cols, cmask, stride_ym, row_w if OUT_SCALE else rmask,
                        OUT_SCALE, SCATTER)


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, slots_ptr, row_w_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, num_tiles_ptr,
    pre_ptr, act_out_ptr, tok_ptr, part_ptr,
    N, K, inter, top_k, num_m_tiles, num_experts, num_rows,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_ym, stride_pre, stride_tok, stride_part,
    HAS_SLOTS: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    STORE_PRE: tl.constexpr, ACT_BWD: tl.constexpr, ROW_DOT: tl.constexpr, BIAS_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, NUM_PROGS: tl.constexpr, INTERLEAVED: tl.constexpr = False,
    TMA_A: tl.constexpr = False, TMA_W: tl.constexpr = False, W_KMAJOR: tl.constexpr = True,
):
    """One (m-tile, n-tile) per program over ``num_m_tiles`` (a bound) x n-tiles, in GROUP_M order; or,
    PERSISTENT, NUM_PROGS programs striding over the real tiles only. TMA_W / TMA_A: the weight (gate and up
    halves apart) / the rows of x (not gathered) through descriptors made once per program."""
    num_n = tl.cdiv(N, BLOCK_N)
    DUAL: tl.constexpr = GATED and not ACT_BWD
    a_desc, wg_desc, wu_desc = x_ptr, w_ptr, w_ptr  # unused unless TMA
    if TMA_A:
        a_desc = tl.make_tensor_descriptor(x_ptr, [num_rows, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
    if TMA_W:
        # output column c reads weight row c (gate), c + inter (up), or 2c and 2c + 1 (interleaved)
        w_sn = stride_wn * 2 if DUAL and INTERLEAVED else stride_wn
        wg_desc = _tma.weight_descriptor(w_ptr, num_experts, N, K, stride_we, w_sn, stride_wk, W_KMAJOR, BLOCK_N,
                                         BLOCK_K)
        if DUAL:
            up = stride_wn if INTERLEAVED else inter * stride_wn
            wu_desc = _tma.weight_descriptor(w_ptr + up, num_experts, N, K, stride_we, w_sn, stride_wk, W_KMAJOR,
                                             BLOCK_N, BLOCK_K)
    if PERSISTENT:
        num_m = tl.load(num_tiles_ptr)
        for t in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS):
            m_tile, n_tile = _tile_coords(t, num_m, num_n, GROUP_M)
            _gemm_tile(
                m_tile, n_tile, x_ptr, w_ptr, bias_ptr, y_ptr, slots_ptr, row_w_ptr, tile_expert_ptr, tile_row_ptr,
                offsets_ptr, pre_ptr, act_out_ptr, tok_ptr, part_ptr, a_desc, wg_desc, wu_desc, N, K, inter, top_k,
                num_experts, num_rows, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_ym,
                stride_pre, stride_tok, stride_part, HAS_SLOTS, GATHER, SCATTER, IN_SCALE, OUT_SCALE, HAS_BIAS, ACT,
                GATED, UPCAST, IEEE, STORE_PRE, ACT_BWD, ROW_DOT, BIAS_DOT, BLOCK_M, BLOCK_N, BLOCK_K, INTERLEAVED,
                TMA_A, TMA_W, W_KMAJOR,
            )
    else:
        m_tile, n_tile = _tile_coords(tl.program_id(0), num_m_tiles, num_n, GROUP_M)
        if m_tile < tl.load(num_tiles_ptr):
            _gemm_tile(
                m_tile, n_tile, x_ptr, w_ptr, bias_ptr, y_ptr, slots_ptr, row_w_ptr, tile_expert_ptr, tile_row_ptr,
                offsets_ptr, pre_ptr, act_out_ptr, tok_ptr, part_ptr, a_desc, wg_desc, wu_desc, N, K, inter, top_k,
                num_experts, num_rows, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_ym,
                stride_pre, stride_tok, stride_part, HAS_SLOTS, GATHER, SCATTER, IN_SCALE, OUT_SCALE, HAS_BIAS, ACT,
                GATED, UPCAST, IEEE, STORE_PRE, ACT_BWD, ROW_DOT, BIAS_DOT, BLOCK_M, BLOCK_N, BLOCK_K, INTERLEAVED,
                TMA_A, TMA_W, W_KMAJOR,
            )


@triton.jit
def _wgrad_tile(
    t, a_ptr, b_ptr, out_ptr, bias_out_ptr, offsets_ptr, slots_ptr, row_w_ptr, A, B, stride_am, stride_bm, top_k,
    num_a_tiles, num_b_tiles, HAS_SLOTS: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
    SCALE_A: tl.constexpr, SCALE_B: tl.constexpr, BIAS_A: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, group_a,
):
    e = t // (num_a_tiles * num_b_tiles)
    a_tile, b_tile = _tile_coords(t % (num_a_tiles * num_b_tiles), num_a_tiles, num_b_tiles, group_a)
    ia = a_tile.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    ib = b_tile.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    amask, bmask = ia < A, ib < B
    lo = tl.load(offsets_ptr + e).to(tl.int64)
    hi = tl.load(offsets_ptr + e + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    if BIAS_A:
        bacc = tl.zeros([BLOCK_A], tl.float32)
    ms = tl.arange(0, BLOCK_M)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + ms
        rm = rows < hi
        slot = rows
        if HAS_SLOTS:
            slot = tl.load(slots_ptr + rows, mask=rm, other=-1).to(tl.int64)
            rm = rm & (slot >= 0)
        src = tl.where(rm, slot // top_k, 0)  # token row of a slot (rows gathered through the plan)
        src_a = src if GATHER_A else rows
        src_b = src if GATHER_B else rows
        at = tl.load(a_ptr + src_a[:, None] * stride_am + ia[None, :], mask=rm[:, None] & amask[None, :], other=0.0)
        bt = tl.load(b_ptr + src_b[:, None] * stride_bm + ib[None, :], mask=rm[:, None] & bmask[None, :], other=0.0)
        if SCALE_A or SCALE_B:
            row_w = tl.load(row_w_ptr + slot, mask=rm, other=0.0).to(tl.float32)
            if SCALE_A:
                at = (at.to(tl.float32) * row_w[:, None]).to(at.dtype)
            if SCALE_B:
                bt = (bt.to(tl.float32) * row_w[:, None]).to(bt.dtype)
        if BIAS_A:
            bacc += tl.sum(at.to(tl.float32), 0)
        if UPCAST:
            at, bt = at.to(tl.float32), bt.to(tl.float32)
        acc = _dot(tl.trans(at), bt, acc, IEEE)
    out = out_ptr + e.to(tl.int64) * A * B + ia[:, None] * B + ib[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=amask[:, None] & bmask[None, :])
    if BIAS_A:
        if b_tile == 0:
            tl.store(bias_out_ptr + e.to(tl.int64) * A + ia, bacc.to(bias_out_ptr.dtype.element_ty), mask=amask)


@triton.jit
def grouped_wgrad_kernel(
    a_ptr, b_ptr, out_ptr, bias_out_ptr, offsets_ptr, slots_ptr, row_w_ptr, A, B, stride_am, stride_bm, top_k,
    num_experts, num_a_tiles, num_b_tiles, group_a,
    HAS_SLOTS: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr,
    SCALE_B: tl.constexpr, BIAS_A: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, NUM_PROGS: tl.constexpr,
):
    """out[e] = a_e^T @ b_e over the rows of segment e (padding rows of a plan skipped): [E, A, B], fp32
    accumulation, every element written. Persistent: NUM_PROGS programs stride over the (expert, a-tile,
    b-tile) tiles, expert-major and GROUP_A a-tiles per group with the b-tiles inside (like the GEMM's
    tile order), so the programs running together share an expert's rows in L2. Rows of
    a gathered operand are token rows ``x[slot // k]`` read through the plan (no permuted copy), scaled by
    the slot's routing weight with SCALE_*; BIAS_A also writes the column sums of a (a bias gradient)."""
    for t in tl.range(tl.program_id(0), num_experts * num_a_tiles * num_b_tiles, NUM_PROGS):
        _wgrad_tile(t, a_ptr, b_ptr, out_ptr, bias_out_ptr, offsets_ptr, slots_ptr, row_w_ptr, A, B, stride_am,
                    stride_bm, top_k, num_a_tiles, num_b_tiles, HAS_SLOTS, GATHER_A, GATHER_B, SCALE_A, SCALE_B,
                    BIAS_A, UPCAST, IEEE, BLOCK_A, BLOCK_B, BLOCK_M, group_a)


def _interpreting() -> bool:
    return interpreting()


def _tma_operands(cfg, x, w, trans_w, N, K, gather, dual, interleaved, block_k) -> tuple[bool, bool]:
    """(weight, A) through TMA descriptors: the config's TMA flag (per architecture) and each operand's
    layout meeting the descriptor rules (else the pointer path); A only when its rows are not gathered."""
    if not cfg.get("TMA", False) or N <= 0 or K <= 0 or max(cfg["BLOCK_M"], cfg["BLOCK_N"], block_k) > _tma.MAX_BOX:
        return False, False
    stride_wn = w.stride(1) if trans_w else w.stride(2)
    n_stride = 2 * stride_wn if dual and interleaved else stride_wn
    up = (stride_wn if interleaved else N * stride_wn) if dual else None
    tma_w = _tma.weight_fits(w, bool(trans_w), N, K, up, n_stride)
    P = x.shape[0]
    tma_a = not gather and _tma.descriptor_fits(x, (x.stride(0), x.stride(1)), (P, K)) and \
        block_k * x.element_size() >= 16
    return tma_w, tma_a


def grouped_gemm(
    x, w, expert_offsets, bias, sorted_slots, trans_w, *, gather_top_k=0, activation="none", gated=False,
    interleaved=False, row_weights=None, scale_input=False, scatter_slots=0, slot_top_k=0, config=None, schedule=None,
    store_pre=False,
    act_grad_of=None, row_dots=False, dot_tokens=None, bias_dot=None, launch=identity_launch, empty,
):
    """Launcher. ``w[e]`` is ``[N, K]`` (``trans_w``) or ``[K, N]``; N counts output columns (``inter``
    for a gated activation, whose weight has ``2*inter`` rows, gate then up or ``interleaved``). ``row_weights`` (per slot, ``[T*k]``)
    scale the input rows (``scale_input``) or the output rows. Returns ``[P, N]`` in expert order, or
    ``[scatter_slots, N]`` in slot order when ``scatter_slots > 0`` (rows of dropped slots not written).
    ``config`` overrides the tile config (for tuning); ``schedule`` is the plan's tile schedule (its
    row tile wins), else one is built (one launch).

    Fused epilogues (the training backward):
    - ``store_pre``: also return the pre-activation ``[P, 2I]`` (``(y, pre)``).
    - ``act_grad_of=h``: this GEMM is dA = dY . W2; the epilogue applies the activation's backward at
      ``h`` (scaled by ``row_weights`` first) and returns ``(dh [P, 2I], act(h) [P, I], parts)``; h and dh
      in w13's row order (``interleaved`` or gate then up).
    - ``row_dots``: ``parts [n_tiles, S]`` fp32, per-slot partial dots summed by the combine kernel:
      ``<act(h), dA>`` (+ ``<bias_dot[e], dY row>``) with ``act_grad_of``; else ``<y row before the
      weight, dot_tokens[slot // slot_top_k]>``; returned last.
    """
    P = sorted_slots.shape[0] if sorted_slots is not None else x.shape[0]
    E = w.shape[0]
    n_w = w.shape[1] if trans_w else w.shape[2]
    K = w.shape[2] if trans_w else w.shape[1]
    act_bwd = act_grad_of is not None
    N = n_w // 2 if gated and not act_bwd else n_w
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if trans_w else (w.stride(2), w.stride(1))
    scatter = scatter_slots > 0
    kernel = "gemm_act_bwd" if act_bwd else "gemm_gated" if gated else "gemm"
    block_m = schedule.tile_m if schedule is not None else None
    cfg = {"GROUP_M": 8, "PERSISTENT": False, "NUM_PROGS": 1, **config} if config else \
        gemm_config(kernel, P, N, K, E, x.dtype, x.device, block_m, activation=activation, bias=bias is not None,
                    gather=gather_top_k > 0)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    n_tiles = triton.cdiv(N, bn) if N > 0 else 0
    if act_bwd:
        y = empty((P, act_grad_of.shape[1]), dtype=x.dtype, device=x.device)
        act_out = empty((P, N), dtype=x.dtype, device=x.device)
    else:
        y = empty((scatter_slots if scatter else P, N), dtype=x.dtype, device=x.device)
        act_out = None
    pre = empty((P, 2 * N if gated else N), dtype=x.dtype, device=x.device) if store_pre else None
    parts = None
    if row_dots:
        n_slots = row_weights.shape[0]
        parts = empty((n_tiles, n_slots), dtype=torch.float32, device=x.device)
    outs = (y,) + ((pre,) if store_pre else ()) + ((act_out,) if act_bwd else ()) + ((parts,) if row_dots else ())
    if P == 0 or N == 0 or y.shape[0] == 0:
        return outs if len(outs) > 1 else y
    if schedule is None:
        schedule = tile_schedule(expert_offsets, P, bm, launch=launch, empty=empty)
    total = schedule.max_tiles * n_tiles
    persistent = bool(cfg.get("PERSISTENT", False))
    grid = (_sym_min(total, cfg["NUM_PROGS"]) if persistent else total,)  # no guard on the token count
    bias = bias.contiguous() if bias is not None else None
    bias_dot = bias_dot.contiguous() if bias_dot is not None else None
    h_arg = act_grad_of if act_bwd else pre
    tma_w, tma_a = _tma_operands(cfg, x, w, trans_w, N, K, gather_top_k > 0, gated and not act_bwd,
                                 bool(interleaved and gated), bk)
    if tma_w or tma_a:
        _tma.ensure_allocator(x.device)
    launch(grouped_gemm_kernel)[grid](
        x, w, (bias if bias is not None else bias_dot) if (bias is not None or bias_dot is not None) else w, y,
        sorted_slots if sorted_slots is not None else schedule.tile_segment,
        row_weights if row_weights is not None else w, schedule.tile_segment, schedule.tile_row, expert_offsets,
        schedule.num_tiles, h_arg if h_arg is not None else y, act_out if act_out is not None else y,
        dot_tokens if dot_tokens is not None else x, parts if parts is not None else y,
        N, K, N, max(gather_top_k, slot_top_k, 1), schedule.max_tiles, E, P,
        x.stride(0), x.stride(1), w.stride(0), stride_wn, stride_wk,
        bias.stride(0) if bias is not None else (bias_dot.stride(0) if bias_dot is not None else 0), y.stride(0),
        h_arg.stride(0) if h_arg is not None else 0, dot_tokens.stride(0) if dot_tokens is not None else 0,
        parts.stride(0) if parts is not None else 0,
        HAS_SLOTS=sorted_slots is not None, GATHER=gather_top_k > 0, SCATTER=scatter,
        IN_SCALE=row_weights is not None and scale_input, OUT_SCALE=row_weights is not None and not scale_input,
        HAS_BIAS=bias is not None,
        ACT=ACTS[activation], GATED=gated, UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        IEEE=x.dtype == torch.float32, STORE_PRE=store_pre, ACT_BWD=act_bwd, ROW_DOT=row_dots,
        BIAS_DOT=bias_dot is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        PERSISTENT=persistent, NUM_PROGS=cfg["NUM_PROGS"] if persistent else 1, INTERLEAVED=bool(interleaved and gated),
        TMA_A=tma_a, TMA_W=tma_w, W_KMAJOR=bool(trans_w), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return outs if len(outs) > 1 else y


def grouped_wgrad(a, b, expert_offsets, sorted_slots=None, *, gather_top_k=0, gather_a=False, gather_b=False,
                  row_weights=None, scale_a=False, scale_b=False, bias_a=False, config=None, launch=identity_launch,
                  empty):
    """Launcher: ``[E, A, B]`` with ``out[e] = a_e^T @ b_e`` over segment e's rows (zeros for empty experts),
    skipping the padding rows of ``sorted_slots`` when given. ``gather_a``/``gather_b``: that operand
    holds token rows (``[T, *]``), read for row r as row ``sorted_slots[r] // gather_top_k``, scaled by
    ``row_weights[slot]`` with ``scale_a``/``scale_b``. ``bias_a``: also return the per-expert column sums
    of a (``[E, A]``, the bias gradient) from the same pass: ``(out, bias)``."""
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    E, A, B = expert_offsets.shape[0] - 1, a.shape[1], b.shape[1]
    out = empty((E, A, B), dtype=a.dtype, device=a.device)
    bias = empty((E, A), dtype=a.dtype, device=a.device) if bias_a else None
    if out.numel() == 0:
        if bias is not None:
            bias.zero_()  # [E, 0]: nothing to write, or no rows (B = 0) to sum over: a zero sum
        return (out, bias) if bias_a else out
    cfg = {"GROUP_A": 8, **config} if config else wgrad_config(
        A, B, a.dtype, a.device, (sorted_slots.shape[0] if sorted_slots is not None else a.shape[0]) // max(E, 1))
    ba, bb = cfg["BLOCK_A"], cfg["BLOCK_B"]
    na, nb = triton.cdiv(A, ba), triton.cdiv(B, bb)
    total = E * na * nb
    launch(grouped_wgrad_kernel)[(min(total, cfg["NUM_PROGS"]),)](
        a, b, out, bias if bias is not None else out, expert_offsets,
        sorted_slots if sorted_slots is not None else expert_offsets, row_weights if row_weights is not None else a,
        A, B, a.stride(0), b.stride(0), max(gather_top_k, 1), E, na, nb, cfg["GROUP_A"], HAS_SLOTS=sorted_slots is not None,
        GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=scale_a, SCALE_B=scale_b, BIAS_A=bias_a,
        UPCAST=_interpreting() and a.dtype == torch.bfloat16, IEEE=a.dtype == torch.float32,
        BLOCK_A=ba, BLOCK_B=bb, BLOCK_M=cfg["BLOCK_M"], NUM_PROGS=min(total, cfg["NUM_PROGS"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (out, bias) if bias_a else out
