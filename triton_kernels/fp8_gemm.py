"""FP8 (w8a8) grouped expert GEMM, and its weight-only (w8a16) form for GPUs without fp8 tensor cores.

``y[r] = epilogue(q(x)[row(r)] @ w_q[e(r)]^T * scales)`` over the segments of a routing plan, one launch for
all experts, with the tile schedule, activations, gather, routing weights, scatter and biases of
:mod:`.grouped_gemm` (its jit helpers and schedule are imported, not copied).

Scales. Every weight layout arrives as block scales ``[E, NB, KB]`` of ``bn x bk`` blocks (per tensor: one
``N x K`` block; per channel: ``1 x K`` blocks); column n of a tile reads ``scale[e, n // bn, kb]``, so any
``bn`` works. When the weight has several K blocks, or activations are quantized per group, the scales are
applied per K block in the main loop, DeepSeek-style: ``acc += dot(a_q, w_q) * s_a[:, None] * s_w[None, :]``
with ``BLOCK_K`` dividing ``bk`` (equal to it for per-group activations); otherwise once in the epilogue.

Activations (``A_MODE``):
- 2, dynamic per token and group of ``BLOCK_K`` columns: quantized on load, the group's scale computed from
  the loaded tile (``s = max(amax, 1e-10) / fmax``, ``q = clamp(a / s, +-fmax)`` rounded to nearest even);
- 1, per token or per tensor, dynamic or static: quantized on load with a scale read once per row (stride 0
  for one scale). The dynamic scales come from ``act_scale_kernel`` over the GEMM's input, or, for the second
  GEMM of the fused MoE, from the first GEMM's epilogue (``OUT_AMAX``: each program folds its tile's row
  maxima into the scale buffer with an atomic max, which is exact and order-independent);
- 0, weight-only: ``x`` stays in its dtype and weight tiles are converted to it in registers (fp8 -> bf16/fp16
  is exact), for sm_80/sm_86 which have no fp8 tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import configs as _configs
from . import tma as _tma
from ._launch import DIRECT, Target, TARGETS, target
from ._utils import next_pow2
from .grouped_gemm import ACTS, _activate, _bias_act, _dot, _store_rows, _tile_coords, _tile_rows, _zero_rows
from .schedule import tile_schedule
from .tiles import group_m, l2_bytes

AMAX_FLOOR = tl.constexpr(1e-10)  # the amax floor (a zero group never divides by zero)
FLOOR = 1e-10


@triton.jit
def _round_to_fp8_grid(v, MANT: tl.constexpr, EMIN: tl.constexpr):
    """``v`` (fp32) rounded to nearest even on the grid of an fp8 format with MANT mantissa bits and smallest
    normal exponent EMIN, in fp32 arithmetic: the interpreter's own fp32 -> fp8 conversion gets the exponent
    wrong when rounding carries into it (126.8 -> 64), while the GPU's cvt.rn.satfinite is exact."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN) - MANT
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exponent - MANT), exact
    r = (v / step + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds to nearest even
    return r * step


@triton.jit
def _quantize(a, s, FP8_MAX: tl.constexpr, QTYPE: tl.constexpr, ROUND: tl.constexpr):
    """fp32 tile / its scale, clamped to +-FP8_MAX (NaN kept), in the fp8 type (round to nearest even)."""
    q = a / s
    q = tl.minimum(tl.maximum(q, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if ROUND:
        if FP8_MAX == 448.0:
            q = _round_to_fp8_grid(q, 3, -6)
        else:
            q = _round_to_fp8_grid(q, 2, -14)
    return q.to(QTYPE)


@triton.jit
def _fp8_bits_to_f32(b, E5M2: tl.constexpr):
    """fp8 values held as uint8 bits -> fp32, exactly (sm_80/sm_86 have no e4m3 type): sign, exponent and mantissa
    moved into fp32's fields; subnormals as ``mantissa * 2^(1 - bias - mantissa bits)``; e4m3fn's S.1111.111 and
    e5m2's exponent 31 become NaN / inf."""
    b = b.to(tl.int32)
    sign = (b >> 7) & 1
    if E5M2:
        exp = (b >> 2) & 0x1F
        man = b & 3
        normal = ((sign << 31) | ((exp + 112) << 23) | (man << 21)).to(tl.float32, bitcast=True)
        sub = man.to(tl.float32) * 1.52587890625e-05  # 2^-16
        special = exp == 31
        special_val = tl.where(man == 0, float("inf"), float("nan"))
    else:
        exp = (b >> 3) & 0xF
        man = b & 7
        normal = ((sign << 31) | ((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
        sub = man.to(tl.float32) * 0.001953125  # 2^-9
        special = (exp == 15) & (man == 7)
        special_val = tl.full(b.shape, float("nan"), tl.float32)
    v = tl.where(exp == 0, tl.where(sign == 1, -sub, sub), normal)
    return tl.where(special, tl.where(sign == 1, -special_val, special_val), v)


@triton.jit
def act_scale_kernel(x_ptr, s_ptr, R, K, stride_xm, PER_TENSOR: tl.constexpr, FP8_MAX: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dynamic activation scales ``max(amax, 1e-10) / fmax`` of ``x [R, K]``: per row into ``s [R]``, or the
    maximum over all rows folded into ``s [1]`` (initialised to the floor) with an atomic max."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    ks = tl.arange(0, BLOCK_K)
    m = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + ks)[None, :], mask=rmask[:, None] & ((k0 + ks) < K)[None, :],
                    other=0.0)
        m = tl.maximum(m, tl.max(tl.abs(a.to(tl.float32)), axis=1))
    s = tl.maximum(m, AMAX_FLOOR) / FP8_MAX
    if PER_TENSOR:
        tl.atomic_max(s_ptr, tl.max(tl.where(rmask, s, 0.0), axis=0))
    else:
        tl.store(s_ptr + rows, s, mask=rmask)


@triton.jit
def fp8_grouped_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, as_ptr, bias_ptr, y_ptr, ys_ptr, slots_ptr, row_w_ptr, tile_expert_ptr, tile_row_ptr,
    offsets_ptr, num_tiles_ptr,
    N, K, inter, top_k, num_m_tiles, num_experts, w_bn, w_bk,
    stride_xm, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_as, stride_be, stride_ym,
    HAS_SLOTS: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, A_MODE: tl.constexpr,
    SCALE_IN_LOOP: tl.constexpr, OUT_AMAX: tl.constexpr, FP8_MAX: tl.constexpr, W_BITS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr, ROUND_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 1, TMA_W: tl.constexpr = False,
):
    """One (m-tile, n-tile) per program over ``num_m_tiles`` (a bound) x n-tiles in the grouped GEMM's GROUP_M
    order; its tile rows, bias, activation and store are the grouped GEMM's (``grouped_gemm._tile_rows`` ...)."""
    m_tile, n_tile = _tile_coords(tl.program_id(0), num_m_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    if m_tile >= tl.load(num_tiles_ptr):
        return
    e = tl.load(tile_expert_ptr + m_tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + m_tile).to(tl.int64)
    row_end = tl.load(offsets_ptr + e + 1).to(tl.int64)  # (E + 2 ends: the last is the row count)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if e >= num_experts:  # the rows past the last segment: zeros (in expert order only)
        if not SCATTER:
            _zero_rows(y_ptr, rows, cols, row_end, cmask, stride_ym, BLOCK_M, BLOCK_N)
        return
    rmask, slot, src = _tile_rows(rows, row_end, slots_ptr, top_k, HAS_SLOTS, GATHER)
    if IN_SCALE or OUT_SCALE:
        row_w = tl.load(row_w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
    if A_MODE == 1:  # per-token / per-tensor scale, read once
        s_a = tl.maximum(tl.load(as_ptr + src * stride_as, mask=rmask, other=1.0), AMAX_FLOOR / FP8_MAX)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :]
    w_e = w_ptr + e * stride_we
    g_ptrs = w_e + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # [BK, BN] fp8
    if TMA_W:  # [E, N, K] with K contiguous: gate (or the one weight) and up halves, zero past N and K
        g_desc = _tma.weight_descriptor(w_ptr, num_experts, N, K, stride_we, stride_wn, 1, True, BLOCK_N, BLOCK_K)
        if GATED:
            u_desc = _tma.weight_descriptor(w_ptr + inter * stride_wn, num_experts, N, K, stride_we, stride_wn, 1,
                                            True, BLOCK_N, BLOCK_K)
    n0 = n_tile * BLOCK_N
    s_e = ws_ptr + e * stride_se
    g_srow = (cols // w_bn) * stride_sn  # [BN]: the scale row of each output column
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GATED:
        u_ptrs = g_ptrs + inter * stride_wn
        u_srow = ((inter + cols) // w_bn) * stride_sn
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if IN_SCALE:
            a = (a.to(tl.float32) * row_w[:, None]).to(a.dtype)
        if TMA_W:
            b = _tma.weight_tile(g_desc, e, n0, k0, True, BLOCK_N, BLOCK_K)
        else:
            b = tl.load(g_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if A_MODE == 0:  # weight-only: the exact fp8 -> bf16/fp16 conversion in registers
            if UPCAST:  # the interpreter multiplies bf16 bit patterns: upcast there
                a = a.to(tl.float32)
            if W_BITS:
                b = _fp8_bits_to_f32(b, FP8_MAX != 448.0).to(a.dtype)
            else:
                b = b.to(a.dtype)
        elif A_MODE == 2:  # per token and group of BLOCK_K columns, from the tile itself
            af = a.to(tl.float32)
            s_k = tl.maximum(tl.max(tl.abs(af), axis=1), AMAX_FLOOR) / FP8_MAX  # [BM]
            a = _quantize(af, s_k[:, None], FP8_MAX, w_ptr.dtype.element_ty, ROUND_FP8)
        else:
            a = _quantize(a.to(tl.float32), s_a[:, None], FP8_MAX, w_ptr.dtype.element_ty, ROUND_FP8)
        if SCALE_IN_LOOP:
            kb = k0 // w_bk
            sw_g = tl.load(s_e + g_srow + kb * stride_sk, mask=cmask, other=0.0)
            part = _dot(a, b, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
            if A_MODE == 2:
                part = part * s_k[:, None]
            acc_g += part * sw_g[None, :]
        else:
            acc_g = _dot(a, b, acc_g, IEEE)
        if GATED:
            if TMA_W:
                bu = _tma.weight_tile(u_desc, e, n0, k0, True, BLOCK_N, BLOCK_K)
            else:
                bu = tl.load(u_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            if A_MODE == 0:
                if W_BITS:
                    bu = _fp8_bits_to_f32(bu, FP8_MAX != 448.0).to(a.dtype)
                else:
                    bu = bu.to(a.dtype)
            if SCALE_IN_LOOP:
                sw_u = tl.load(s_e + u_srow + kb * stride_sk, mask=cmask, other=0.0)
                part_u = _dot(a, bu, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
                if A_MODE == 2:
                    part_u = part_u * s_k[:, None]
                acc_u += part_u * sw_u[None, :]
            else:
                acc_u = _dot(a, bu, acc_u, IEEE)
            u_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
    if not SCALE_IN_LOOP:  # one weight scale per column: the epilogue
        acc_g = acc_g * tl.load(s_e + g_srow, mask=cmask, other=0.0)[None, :]
        if GATED:
            acc_u = acc_u * tl.load(s_e + u_srow, mask=cmask, other=0.0)[None, :]
    if A_MODE == 1:
        acc_g = acc_g * s_a[:, None]
        if GATED:
            acc_u = acc_u * s_a[:, None]
    acc_g, acc_u = _bias_act(acc_g, acc_u if GATED else acc_g, bias_ptr, e, stride_be, cols, inter, cmask, HAS_BIAS,
                             ACT, GATED)
    out, dst, omask = _store_rows(y_ptr, acc_g, rows, slot, rmask, row_end, cols, cmask, stride_ym,
                                  row_w if OUT_SCALE else rmask, OUT_SCALE, SCATTER)
    if OUT_AMAX != 0:  # the next GEMM's dynamic scale, from the values as stored
        mag = tl.where(omask, tl.abs(out.to(tl.float32)), 0.0)
        s_row = tl.maximum(tl.max(mag, axis=1), AMAX_FLOOR) / FP8_MAX  # [BM]
        if OUT_AMAX == 1:
            tl.atomic_max(ys_ptr + dst, s_row, mask=rmask)
        else:
            tl.atomic_max(ys_ptr, tl.max(s_row, axis=0))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _group_m(bm: int, K: int, x: torch.Tensor) -> int:
    """m-tiles per group of the tile order: as many as fill 70% of L2 with their A rows (the grouped GEMM's
    ``tiles.group_m``), so that the weight tiles are read from HBM about once per group."""
    return group_m(bm, K, x.element_size(), l2_bytes(x.device))


def smem_bytes(cfg: dict, a_bytes: int, gated: bool) -> int:
    """Shared memory of the pipelined operand tiles: A ``[BM, BK]`` in its dtype, one or two fp8 ``[BK, BN]``
    weight tiles, per stage."""
    stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] * a_bytes + cfg["BLOCK_N"] * cfg["BLOCK_K"] * (2 if gated else 1)
    return stage * cfg["num_stages"]


def default_config(M: int, N: int, K: int, E: int, a_bytes: int, gated: bool, block_k: int | None,
                   tgt: Target, bias: bool = False) -> dict:
    """Heuristic tiles of the FP8 GEMM for one architecture (``_launch.Target``): row tiles by rows per expert
    (decode: 16), 128-byte K rows of fp8 (``BLOCK_K = 128``, or the block scale's ``bk`` where the loop needs it),
    as many pipeline stages (2-4) as the target's shared memory holds; on targets without fp8 tensor cores
    (the weight-only path) narrower tiles, since decoding the weight tiles takes registers (``bias``: the
    launch adds biases in the epilogue)."""
    capability = tgt.capability
    rows = max(1, M // max(E, 1))
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 256 else 128
    bn = min(128, max(16, next_pow2(N)))
    bk = block_k if block_k is not None else min(128, max(32, next_pow2(K)))
    if tuple(capability) < (8, 9):  # weight-only: the fp8 decode of the weight tiles takes registers too
        bn, bk = min(bn, 64), min(bk, 32 if gated else 64)
    acc_tiles = bm * bn * (2 if gated else 1)  # fp32 accumulators, plus one partial each with block scales
    if gated and bm * bn > 64 * 128:  # two 128x128 fp32 accumulators spill: halve the columns
        bn //= 2
        acc_tiles //= 2
    warps = 8 if acc_tiles * (2 if block_k is not None else 1) >= 128 * 128 else 4
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": 4,
           "TMA": _configs.use_tma(tgt.capability)}
    if tuple(capability) < (8, 9) and gated and block_k is not None and bias and bm * bn >= 128 * 64:
        # weight-only 128x64 gated tile with block scales (two accumulators and their partials) and biases: the
        # registers of a 4-stage pipeline spill on sm_80, 2 stages do not (the decode's work per stage hides latency)
        cfg["num_stages"] = 2
    limit = tgt.smem_per_block - 8192  # room for the epilogue's layout conversion
    while cfg["num_stages"] > 2 and smem_bytes(cfg, a_bytes, gated) > limit:
        cfg["num_stages"] -= 1
    while smem_bytes(cfg, a_bytes, gated) > limit and cfg["BLOCK_N"] > 32:
        cfg["BLOCK_N"] //= 2
    return cfg


def get_config(kernel: str, M: int, N: int, K: int, E: int, dtype: torch.dtype, gated: bool, block_k: int | None,
               device: torch.device, bias: bool = False) -> dict:
    """A tuned config (``configs/<kernel>,...json``, nearest M) if one exists for this shape and device, else the
    architecture's heuristic; a tuned BLOCK_K that breaks the block-scale constraint is ignored."""
    tuned = _configs._load(str(_configs.config_file(kernel, E, N, K, dtype, _configs.device_name(device))))
    if tuned:
        cfg = dict(tuned[min(tuned, key=lambda m: abs(m - M))])
        if block_k is None or cfg["BLOCK_K"] == block_k:
            return cfg
    return default_config(M, N, K, E, torch.finfo(dtype).bits // 8, gated, block_k, target(device), bias)


def act_scales(x: torch.Tensor, per_tensor: bool, fmax: float, *, launch=DIRECT, empty) -> torch.Tensor:
    """Dynamic activation scales of ``x [R, K]``: ``[R]`` per row, or ``[1]`` over all rows."""
    R, K = x.shape
    if per_tensor:
        s = torch.full((1,), FLOOR / fmax, dtype=torch.float32, device=x.device)
    else:
        s = empty((R,), dtype=torch.float32, device=x.device)
    if R == 0:
        return s
    br = 4 if _interpreting() else 8
    launch(act_scale_kernel)[(triton.cdiv(R, br),)](x, s, R, K, x.stride(0), PER_TENSOR=per_tensor, FP8_MAX=fmax,
                                                  BLOCK_R=br, BLOCK_K=min(1024, max(16, next_pow2(K))))
    return s


def fp8_grouped_gemm(
    x, w_data, w_scale, block_n, block_k, expert_offsets, bias, sorted_slots, act_mode, act_scale, *, gather_top_k=0,
    activation="none", gated=False, row_weights=None, scale_input=False, scatter_slots=0, out_amax="", config=None,
    weight_bits=None, launch=DIRECT, empty,
):
    """Launcher. ``x [R, K]`` (``R`` tokens when gathering, else the plan's rows), ``w_data [E, n_w, K]`` fp8 with
    block scales ``w_scale [E, NB, KB]`` of ``block_n x block_k``; ``act_mode`` as in ``moe_kernels._quant_ops``,
    ``act_scale``: the static scale, or precomputed dynamic scales (``[R]`` per token, ``[1]`` per tensor).
    ``out_amax`` = ``"token"`` / ``"tensor"`` also returns the dynamic scales of the output (per row / over all
    rows), for the next GEMM. ``weight_bits`` (default: on GPUs before sm_89) reads the weight-only path's fp8
    weights as uint8 bits and decodes them in the kernel. Returns ``(y, out_scales or None)``; ``y`` as
    :func:`.grouped_gemm.grouped_gemm`."""
    P = sorted_slots.shape[0] if sorted_slots is not None else x.shape[0]
    E, n_w, K = w_data.shape
    N = n_w // 2 if gated else n_w
    fmax = float(torch.finfo(w_data.dtype).max)
    scatter = scatter_slots > 0
    y = empty((scatter_slots if scatter else P, N), dtype=x.dtype, device=x.device)
    ys = None
    if out_amax:
        ys = torch.full((P if out_amax == "token" else 1,), FLOOR / fmax, dtype=torch.float32, device=x.device)
    if P == 0 or N == 0 or y.shape[0] == 0:
        return y, ys
    x = x if x.stride(1) == 1 else x.contiguous()
    kb_w = w_scale.shape[2]
    mode = act_mode
    if mode == "group" and block_k >= K:  # one group per row: per token
        mode = "token"
    if mode == "none":
        a_mode = 0
    elif mode == "group":
        a_mode = 2
    else:
        a_mode = 1
        if act_scale is None:
            act_scale = act_scales(x, mode == "tensor", fmax, launch=launch, empty=empty)
    if weight_bits is None:
        weight_bits = a_mode == 0 and target(x.device).capability < (8, 9)
    in_loop = kb_w > 1 or a_mode == 2
    need_bk = None
    if in_loop:
        need_bk = block_k if a_mode == 2 else min(block_k, 128)
    kernel = "fp8_gemm_gated" if gated else "fp8_gemm"
    cfg = config or get_config(kernel, P, N, K, E, x.dtype, gated, need_bk, x.device, bias is not None)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if _interpreting():  # small tiles keep the interpreter fast; tile sizes do not change results
        bm, bn = min(bm, 32), min(bn, 128)
        bk = need_bk if need_bk is not None else min(bk, 128)
    sched = tile_schedule(expert_offsets, P, bm, launch=launch, empty=empty)
    tile_seg, tile_row, num_tiles, max_tiles = sched.tile_segment, sched.tile_row, sched.num_tiles, sched.max_tiles
    ends = torch.cat([expert_offsets.to(torch.int64), expert_offsets.new_full((1,), P, dtype=torch.int64)])  # [E+2]
    grid = (max_tiles * triton.cdiv(N, bn),)
    bias = bias.contiguous() if bias is not None else None
    tma_w = bool(cfg.get("TMA", _configs.use_tma(target(x.device).capability))) and max(bn, bk) <= _tma.MAX_BOX and \
        _tma.weight_fits(w_data, True, N, K, N * w_data.stride(1) if gated else None)
    if tma_w:
        _tma.ensure_allocator(x.device)
    launch(fp8_grouped_gemm_kernel)[grid](
        x, w_data.view(torch.uint8) if weight_bits else w_data, w_scale, act_scale if act_scale is not None else w_scale, bias if bias is not None else w_scale, y,
        ys if ys is not None else w_scale, sorted_slots if sorted_slots is not None else tile_seg,
        row_weights if row_weights is not None else w_scale, tile_seg, tile_row, ends, num_tiles,
        N, K, N, max(gather_top_k, 1), max_tiles, E, block_n, block_k,
        x.stride(0), w_data.stride(0), w_data.stride(1), w_data.stride(2), w_scale.stride(0), w_scale.stride(1),
        w_scale.stride(2), 1 if act_scale is not None and act_scale.numel() > 1 else 0,
        bias.stride(0) if bias is not None else 0, y.stride(0),
        HAS_SLOTS=sorted_slots is not None, GATHER=gather_top_k > 0, SCATTER=scatter,
        IN_SCALE=row_weights is not None and scale_input, OUT_SCALE=row_weights is not None and not scale_input,
        HAS_BIAS=bias is not None, ACT=ACTS[activation], GATED=gated, A_MODE=a_mode, SCALE_IN_LOOP=in_loop,
        OUT_AMAX={"": 0, "token": 1, "tensor": 2}[out_amax], FP8_MAX=fmax, W_BITS=bool(weight_bits),
        UPCAST=_interpreting() and x.dtype == torch.bfloat16, IEEE=a_mode == 0 and x.dtype == torch.float32,
        ROUND_FP8=_interpreting(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", _group_m(bm, K, x)), TMA_W=tma_w,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y, ys


def supports(x, w_data, w_scale, block_n, block_k, *args, **kwargs) -> str | None:
    """Why the Triton FP8 GEMM cannot serve these inputs, or None."""
    if x.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "the FP8 kernels need sm_80 or newer"
    K = w_data.shape[2]
    if w_scale.shape[2] > 1 and (block_k < 16 or block_k > 256 or block_k & (block_k - 1)):
        return f"block scales need bk a power of two in [16, 256] when K={K} spans several blocks, got bk={block_k}"
    return None
