"""Weight-only quantized grouped expert GEMM: int8 (w8a16), int4 (w4a16, optional zero points) and mxfp4 weights
with bf16/fp16/fp32 activations.

``y[r] = epilogue(x[row(r)] @ deq(w)[e(r)]^T)`` over the segments of a routing plan, one launch for all experts,
with the tile schedule, activations, gather, routing weights, scatter and biases of :mod:`.grouped_gemm` (its jit
helpers and schedule are imported, not copied). Layouts: :mod:`moe_kernels.quant_int`.

Tile order: groups of ``GROUP_M`` m-tiles with the n-tiles inside (as :mod:`.grouped_gemm`; ``GROUP_M`` from
the L2 size, :func:`.tiles.group_m`), so that a group's activation rows are read from HBM once.

Main loop: each K step loads the packed weight tile (``[BLOCK_K, BLOCK_N]`` bytes for int8; for int4/mxfp4 each
byte serves the two rows of its nibbles, so the tile reads ``BLOCK_K / 2`` distinct bytes per column), unpacks
the codes in registers (shift by 4 for odd k, mask 0xF), subtracts the zero point (int4) or decodes e2m1
(mxfp4), multiplies by the group's scale (``BLOCK_K`` divides the group, so one scale per column and step) and
runs ``tl.dot`` in the activations' dtype with fp32 accumulation. Under the interpreter bf16 tiles are upcast to
fp32 before the dot (it multiplies bf16 bit patterns).

MXFP4 on hardware with native microscaling MMA (sm_100): ``tl.dot_scaled`` (the same spelling in Triton 3.6 and
3.9) takes the packed e2m1 tile ``[BLOCK_K / 2, BLOCK_N]`` and its e8m0 scales ``[BLOCK_N, BLOCK_K / 32]`` as they
are in memory; ``BLOCK_K`` is then free of the 32-element group. The config's ``DOT_SCALED`` picks the activation
side (:data:`DOT_SCALED_MODES`): ``1`` (sm_100's default) keeps the bf16/fp16 activations (the compiler widens the
e2m1 weights itself: ``tcgen05.mma ... kind::f16``, the numerics of the dequantize path); ``2`` quantizes each
activation tile to MXFP8 in the main loop (e4m3 values, one e8m0 scale per 32 elements of K, ``s = 2^ceil(log2(
amax / 448))``, round to nearest even), so that the compiler emits the native block-scaled MMA (``tcgen05.mma ...
kind::mxf8f6f4.block_scale``) at the cost of the activations' quantization error (about 3% of max|out| on random
normal data, like w8a8 FP8; opt-in); ``0`` is the dequantize path, every other architecture's default.
``MOE_KERNELS_MXFP4_DOT`` (``dequant``, ``bf16``, ``mxfp8``) overrides the heuristic (where the architecture has no
native MX MMA the compiler emulates the scaled dot). fp32 activations always take the dequantize path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import configs as _configs
from . import tiles as _tiles
from ._launch import DIRECT, Target, target
from ._utils import next_pow2
from .fp8_gemm import _interpreting, _round_to_fp8_grid
from .grouped_gemm import ACTS, _bias_act, _dot, _store_rows, _tile_coords, _tile_rows, _zero_rows
from .schedule import tile_schedule

FMT_IDS = {"int8": 0, "int4": 1, "mxfp4": 2}
MIN_E8M0 = tl.constexpr(5.877471754111438e-39)  # 2^-127, the e8m0 code 0 (an fp32 subnormal)
DOT_SCALED_MODES = {"dequant": 0, "bf16": 1, "mxfp8": 2}  # MXFP4 main loop: see the module docstring
MX_DOT_ENV = "MOE_KERNELS_MXFP4_DOT"


@triton.jit
def _mxfp8(a, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROUND: tl.constexpr):
    """``(values e4m3 [BM, BK], scales e8m0 uint8 [BM, BK/32])`` of an activation tile: per 32 elements of K the
    smallest power of two ``2^e`` with ``amax / 2^e <= 448``, values ``a / 2^e`` rounded to nearest even
    (``ROUND``: on the fp8 grid in fp32 first, for the interpreter's inexact fp32 -> fp8 conversion)."""
    a3 = tl.reshape(a.to(tl.float32), (BLOCK_M, BLOCK_K // 32, 32))
    x = tl.max(tl.abs(a3), axis=2) * (1.0 / 448.0)  # [BM, BK/32]
    xi = x.to(tl.int32, bitcast=True)
    e = ((xi >> 23) & 0xFF) - 127 + ((xi & 0x7FFFFF) != 0).to(tl.int32)  # ceil(log2(x)), -127 for x = 0
    e = tl.minimum(tl.maximum(e, -127), 127)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e exactly
    q = tl.reshape(a3 * inv[:, :, None], (BLOCK_M, BLOCK_K))
    if ROUND:
        q = _round_to_fp8_grid(q, 3, -6)
    return q.to(tl.float8e4nv), (e + 127).to(tl.uint8)


@triton.jit
def _dot_mx(a, a_scale, w_e, s_e, n, k0, K, nmask, acc, stride_wn, stride_wk, stride_sn, stride_sg,
            A_FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + a @ w[n, k0:k0+BK]^T`` by ``tl.dot_scaled`` on the packed e2m1 tile and its e8m0 scales."""
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    w = tl.load(w_e + n[None, :] * stride_wn + kb[:, None] * stride_wk, mask=(kb < K // 2)[:, None] & nmask[None, :],
                other=0)  # [BK/2, BN] uint8, two k per byte
    ws = tl.load(s_e + n[:, None] * stride_sn + g[None, :] * stride_sg, mask=nmask[:, None] & (g < K // 32)[None, :],
                 other=127)  # [BN, BK/32] e8m0
    return tl.dot_scaled(a, a_scale, A_FMT, w, ws, "e2m1", acc)


@triton.jit
def _dequant_tile(w_e, s_e, z_e, n, k, kg, nmask, mask, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                  FMT: tl.constexpr, HAS_ZERO: tl.constexpr):
    """fp32 ``[BK, BN]`` weight tile: rows ``k`` (dense K indices) of weight rows ``n``, group ``kg``."""
    s = tl.load(s_e + n * stride_sn + kg * stride_sg, mask=nmask, other=0)  # [BN]
    if FMT == 0:
        v = tl.load(w_e + n[None, :] * stride_wn + k[:, None] * stride_wk, mask=mask, other=0).to(tl.float32)
        return v * s.to(tl.float32)[None, :]
    byte = tl.load(w_e + n[None, :] * stride_wn + (k // 2)[:, None] * stride_wk, mask=mask, other=0).to(tl.int32)
    q = (byte >> ((k % 2) * 4)[:, None]) & 0xF  # low nibble for even k
    if FMT == 1:
        if HAS_ZERO:
            zb = tl.load(z_e + (n // 2) * stride_zn + kg * stride_zg, mask=nmask, other=0).to(tl.int32)
            z = (zb >> ((n % 2) * 4)) & 0xF  # low nibble for even n
        else:
            z = tl.full(n.shape, 8, tl.int32)
        return (q - z[None, :]).to(tl.float32) * s[None, :]
    # mxfp4: e2m1 (sign bit 3, exponent bits 1-2, mantissa bit 0) times 2^(s - 127), built as fp32 bits (one select
    # per element): exponent field ex > 0 is 2^(ex-1) * (1 + m/2), i.e. fp32 exponent ex + 126 and mantissa bit 22;
    # codes 0 and 1 are 0 and 0.5 (fp32 exponent 126, no mantissa)
    c = q & 7
    mag = tl.where(c < 2, c * (126 << 23), (((c >> 1) + 126) << 23) | ((c & 1) << 22))
    v = (mag | ((q & 8) << 28)).to(tl.float32, bitcast=True)
    si = s.to(tl.int32)
    sf = (si << 23).to(tl.float32, bitcast=True)
    sf = tl.where(si == 0, MIN_E8M0, sf)
    sf = tl.where(si == 255, float("nan"), sf)
    return v * sf[None, :]


@triton.jit
def wna16_grouped_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, wz_ptr, bias_ptr, y_ptr, slots_ptr, row_w_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    num_tiles_ptr,
    N, K, inter, top_k, num_m_tiles, num_experts, group,
    stride_xm, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
    stride_be, stride_ym,
    HAS_SLOTS: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, IN_SCALE: tl.constexpr,
    OUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, FMT: tl.constexpr,
    HAS_ZERO: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_SCALED: tl.constexpr = 0, A_FMT: tl.constexpr = "bf16", ROUND_FP8: tl.constexpr = False,
    GROUP_M: tl.constexpr = 1,
):
    # tile order: groups of GROUP_M m-tiles, n-tiles inside (a group's rows stay in L2 across its n-tiles)
    m_tile, n_tile = _tile_coords(tl.program_id(0), num_m_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    if m_tile >= tl.load(num_tiles_ptr):
        return
    e = tl.load(tile_expert_ptr + m_tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + m_tile).to(tl.int64)
    row_end = tl.load(offsets_ptr + e + 1).to(tl.int64)
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
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :]
    w_e = w_ptr + e * stride_we
    s_e = ws_ptr + e * stride_se
    z_e = wz_ptr + e * stride_ze
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if GATED:
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        kmask = k < K
        kg = k0 // group  # BLOCK_K divides the group (group = K for per-channel scales)
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if IN_SCALE:  # Llama-4: the routing weight scales the token before the experts
            a = (a.to(tl.float32) * row_w[:, None]).to(a.dtype)
        if DOT_SCALED != 0:  # mxfp4 on native microscaling MMA: packed tiles straight into tl.dot_scaled
            if DOT_SCALED == 2:
                a_q, a_s = _mxfp8(a, BLOCK_M, BLOCK_K, ROUND_FP8)
                acc_g = _dot_mx(a_q, a_s, w_e, s_e, cols, k0, K, cmask, acc_g, stride_wn, stride_wk, stride_sn,
                                stride_sg, "e4m3", BLOCK_K)
                if GATED:
                    acc_u = _dot_mx(a_q, a_s, w_e, s_e, inter + cols, k0, K, cmask, acc_u, stride_wn, stride_wk,
                                    stride_sn, stride_sg, "e4m3", BLOCK_K)
            else:
                acc_g = _dot_mx(a, None, w_e, s_e, cols, k0, K, cmask, acc_g, stride_wn, stride_wk, stride_sn, stride_sg,
                                A_FMT, BLOCK_K)
                if GATED:
                    acc_u = _dot_mx(a, None, w_e, s_e, inter + cols, k0, K, cmask, acc_u, stride_wn, stride_wk,
                                    stride_sn, stride_sg, A_FMT, BLOCK_K)
        else:
            if UPCAST:  # the interpreter multiplies bf16 bit patterns: upcast there
                a = a.to(tl.float32)
            wmask = kmask[:, None] & cmask[None, :]
            b = _dequant_tile(w_e, s_e, z_e, cols, k, kg, cmask, wmask, stride_wn, stride_wk, stride_sn, stride_sg,
                              stride_zn, stride_zg, FMT, HAS_ZERO)
            acc_g = _dot(a, b.to(a.dtype), acc_g, IEEE)
            if GATED:
                bu = _dequant_tile(w_e, s_e, z_e, inter + cols, k, kg, cmask, wmask, stride_wn, stride_wk, stride_sn,
                                   stride_sg, stride_zn, stride_zg, FMT, HAS_ZERO)
                acc_u = _dot(a, bu.to(a.dtype), acc_u, IEEE)
        a_ptrs += BLOCK_K
    acc_g, _ = _bias_act(acc_g, acc_u if GATED else acc_g, bias_ptr, e, stride_be, cols, inter, cmask, HAS_BIAS, ACT,
                         GATED)
    _store_rows(y_ptr, acc_g, rows, slot, rmask, row_end, cols, cmask, stride_ym, row_w if OUT_SCALE else rmask,
                OUT_SCALE, SCATTER)


def smem_bytes(cfg: dict, a_bytes: int, w_bits: int, gated: bool) -> int:
    """Shared memory of the pipelined operand tiles per stage: A ``[BM, BK]`` in its dtype and one or two packed
    weight tiles ``[BK, BN]`` of ``w_bits`` per element, plus the dequantized operand tile the dot reads."""
    w = cfg["BLOCK_N"] * cfg["BLOCK_K"] * w_bits // 8 * (2 if gated else 1)
    stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] * a_bytes + w
    deq = cfg["BLOCK_N"] * cfg["BLOCK_K"] * a_bytes * (2 if gated else 1)
    return stage * cfg["num_stages"] + deq


def dot_scaled_mode(fmt: str | None, a_bytes: int, tgt: Target) -> int:
    """The MXFP4 main loop (:data:`DOT_SCALED_MODES`) for activations of ``a_bytes`` bytes on ``tgt``:
    ``tl.dot_scaled`` with 16-bit activations where the architecture has native MX MMA (sm_100), else the
    dequantize path; ``MOE_KERNELS_MXFP4_DOT`` overrides (``mxfp8``: MXFP8 activations, the native block-scaled
    MMA)."""
    if fmt != "mxfp4" or a_bytes != 2:
        return 0
    env = os.environ.get(MX_DOT_ENV, "")
    if env:
        if env not in DOT_SCALED_MODES:
            raise ValueError(f"{MX_DOT_ENV} must be one of {tuple(DOT_SCALED_MODES)}, got {env!r}")
        return DOT_SCALED_MODES[env]
    return DOT_SCALED_MODES["bf16"] if tuple(tgt.capability) >= (10, 0) else 0


def default_config(M: int, N: int, K: int, E: int, a_bytes: int, w_bits: int, gated: bool, group: int,
                   tgt: Target, fmt: str | None = None, zero: bool = False) -> dict:
    """Heuristic tiles for one architecture: row tiles by rows per expert (decode: 16), ``BLOCK_K`` up to 128 and
    dividing the scale group (or a multiple of 32 on the ``tl.dot_scaled`` path of mxfp4, ``DOT_SCALED``), and as
    many stages (2-4) as the architecture's shared memory holds. ``zero``: int4 with zero points (``HAS_ZERO``),
    whose unpacking holds more registers per weight element."""
    rows = max(1, M // max(E, 1))
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 256 else 128
    bn = min(128, max(16, next_pow2(N)))
    bk = min(128, max(16, next_pow2(K)))
    mode = dot_scaled_mode(fmt, a_bytes, tgt)
    if mode:
        bk = max(32, bk)  # the scaled dot reads whole 32-element groups
        if gated and mode == DOT_SCALED_MODES["bf16"]:  # two accumulators: 128 columns of K per step spill on sm_100a
            bk = min(bk, 64)
    elif group:
        bk = min(bk, group)
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 8 if bm * bn >= 128 * 128 else 4, "num_stages": 4,
           "DOT_SCALED": mode}
    # registers: the fp32 accumulators and the dequantized weight tiles live in registers together; the
    # prefill tiles with 128 K columns per step, the gated prefill tile (two accumulators) and sm_80's 128x128
    # tile (mma.sync keeps the accumulator in registers) spill when compiled for sm_90a / sm_80, so they shrink
    if bm >= 64:  # prefill: 64 columns of K per step
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 64)
    if gated and bm >= 64:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)
    if tuple(tgt.capability) < (9, 0) and cfg["BLOCK_M"] * cfg["BLOCK_N"] > 64 * 128:
        cfg["BLOCK_M"], cfg["num_warps"] = 64, 4
    if (zero or fmt == "mxfp4") and not mode:  # int4 with zero points, e2m1 decode: their unpacking takes registers
        if gated and zero:  # two dequantized tiles: 128 (decode) / 64 (prefill) K columns per step spill (sm_80, sm_90a)
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32 if cfg["BLOCK_M"] >= 64 else 64)
        elif not gated and tuple(tgt.capability) < (9, 0) and cfg["BLOCK_M"] * cfg["BLOCK_N"] >= 64 * 128:
            cfg["num_warps"] = 8  # mma.sync keeps the 64x128 accumulator in registers: 4 warps spill on sm_80
    if mode == DOT_SCALED_MODES["mxfp8"]:  # the block-scaled tcgen05 MMA takes 128 rows (smaller tiles: kind::f16)
        cfg["BLOCK_M"], cfg["num_warps"] = 128, 8
        if gated:  # two accumulators and the tile's MXFP8 quantization: 128 x 128 spills on sm_100a
            cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)
    limit = tgt.smem_per_block - 8192  # room for the epilogue's layout conversion
    while cfg["num_stages"] > 2 and smem_bytes(cfg, a_bytes, w_bits, gated) > limit:
        cfg["num_stages"] -= 1
    while smem_bytes(cfg, a_bytes, w_bits, gated) > limit and cfg["BLOCK_N"] > 32:
        cfg["BLOCK_N"] //= 2
    return cfg


def get_config(kernel: str, M: int, N: int, K: int, E: int, dtype: torch.dtype, w_bits: int, gated: bool, group: int,
               device: torch.device, fmt: str | None = None, zero: bool = False) -> dict:
    """A tuned config (``configs/<kernel>,...json``, nearest M) if one exists for this shape and device, else the
    architecture's heuristic; a tuned config that does not fit the format (a BLOCK_K that does not divide the
    scale group, or is not a multiple of 32 on the ``DOT_SCALED`` path) is ignored."""
    tuned = _configs._load(str(_configs.config_file(kernel, E, N, K, dtype, _configs.device_name(device))))
    if tuned:
        cfg = dict(tuned[min(tuned, key=lambda m: abs(m - M))])
        if _config_fits(cfg, fmt, dtype, group):
            return cfg
    return default_config(M, N, K, E, torch.finfo(dtype).bits // 8, w_bits, gated, group, target(device), fmt, zero)


def _config_fits(cfg: dict, fmt: str | None, dtype: torch.dtype, group: int) -> bool:
    if cfg.get("DOT_SCALED", 0):
        return fmt == "mxfp4" and dtype in (torch.bfloat16, torch.float16) and cfg["BLOCK_K"] % 32 == 0
    return not group or group % cfg["BLOCK_K"] == 0


def wna16_grouped_gemm(
    x, w_data, w_scale, w_zero, fmt, group_size, expert_offsets, bias, sorted_slots, *, gather_top_k=0,
    activation="none", gated=False, row_weights=None, scale_input=False, scatter_slots=0, config=None,
    launch=DIRECT, empty,
):
    """Launcher. ``x [R, K]`` (``R`` tokens when gathering, else the plan's rows); ``w_data``, ``w_scale``,
    ``w_zero`` in the layout of ``fmt`` with ``group_size`` (0: per-channel scales ``[E, N]``). Other arguments
    and the result as :func:`.grouped_gemm.grouped_gemm`."""
    P = sorted_slots.shape[0] if sorted_slots is not None else x.shape[0]
    E, n_w, Kd = w_data.shape
    K = Kd * 2 if fmt != "int8" else Kd
    N = n_w // 2 if gated else n_w
    scatter = scatter_slots > 0
    y = empty((scatter_slots if scatter else P, N), dtype=x.dtype, device=x.device)
    if P == 0 or N == 0 or y.shape[0] == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    group = group_size or max(K, 1)
    kernel = f"wna16_{fmt}_gemm" + ("_gated" if gated else "")
    w_bits = 8 if fmt == "int8" else 4
    cfg = config or get_config(kernel, P, N, K, E, x.dtype, w_bits, gated, group_size, x.device, fmt, w_zero is not None)
    if not _config_fits(cfg, fmt, x.dtype, group_size):
        raise ValueError(f"wna16_grouped_gemm: config {cfg} does not fit fmt={fmt!r} with {x.dtype} activations and "
                         f"group_size={group_size} (DOT_SCALED needs mxfp4, bf16/fp16 and BLOCK_K % 32 == 0; else "
                         "BLOCK_K must divide the group)")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    mode = cfg.get("DOT_SCALED", 0)
    if _interpreting():  # small tiles keep the interpreter fast; tile sizes do not change results
        bm, bn = min(bm, 32), min(bn, 64)
    gm = cfg.get("GROUP_M") or _tiles.group_m(bm, K, x.element_size(), _tiles.l2_bytes(x.device))
    sched = tile_schedule(expert_offsets, P, bm, launch=launch, empty=empty)
    tile_seg, tile_row, num_tiles, max_tiles = sched.tile_segment, sched.tile_row, sched.num_tiles, sched.max_tiles
    ends = torch.cat([expert_offsets.to(torch.int64), expert_offsets.new_full((1,), P, dtype=torch.int64)])  # [E+2]
    grid = (max_tiles * triton.cdiv(N, bn),)
    bias = bias.contiguous() if bias is not None else None
    s3 = w_scale if w_scale.dim() == 3 else w_scale.unsqueeze(2)  # per channel: one group
    z = w_zero if w_zero is not None else s3
    launch(wna16_grouped_gemm_kernel)[grid](
        x, w_data, s3, z, bias if bias is not None else s3, y, sorted_slots if sorted_slots is not None else tile_seg,
        row_weights if row_weights is not None else s3, tile_seg, tile_row, ends, num_tiles,
        N, K, N, max(gather_top_k, 1), max_tiles, E, group,
        x.stride(0), w_data.stride(0), w_data.stride(1), w_data.stride(2), s3.stride(0), s3.stride(1), s3.stride(2),
        z.stride(0), z.stride(1), z.stride(2), bias.stride(0) if bias is not None else 0, y.stride(0),
        HAS_SLOTS=sorted_slots is not None, GATHER=gather_top_k > 0, SCATTER=scatter,
        IN_SCALE=row_weights is not None and scale_input, OUT_SCALE=row_weights is not None and not scale_input,
        HAS_BIAS=bias is not None, ACT=ACTS[activation], GATED=gated, FMT=FMT_IDS[fmt], HAS_ZERO=w_zero is not None,
        UPCAST=_interpreting() and x.dtype == torch.bfloat16, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_SCALED=mode, A_FMT="fp16" if x.dtype == torch.float16 else "bf16",
        ROUND_FP8=mode == 2 and _interpreting(), GROUP_M=gm,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def supports(x, w_data, w_scale, w_zero, fmt, group_size, *args, **kwargs) -> str | None:
    """Why the Triton weight-only GEMM cannot serve these inputs, or None."""
    if x.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "the weight-only quantized kernels need sm_80 or newer"
    if group_size and (group_size < 16 or group_size & (group_size - 1)):
        return f"the Triton kernel needs a power-of-two group_size >= 16, got {group_size}"
    return None
