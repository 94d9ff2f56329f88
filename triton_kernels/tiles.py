"""Tile configs of the grouped GEMM and dW kernels, chosen per GPU architecture.

The target is ``_launch.target`` (the tensors' GPU or ``MOE_KERNELS_ASSUME_DEVICE``: compute capability,
shared memory per block, SM count); a tuned JSON file (see :mod:`configs`) overrides the heuristic for
its shape. Rows per expert come from ``configs._rows_per_expert`` (fixed in the batch-invariant mode).
The heuristic:

============ ============================== =================================================
rows/expert  tile (BLOCK_M x BLOCK_N x K)    why
============ ============================== =================================================
<= 16        16 x 64 x 128, 4 warps          decode: bound by the weight bytes; many n-tiles
<= 32        32 x 128 x 64, 4 warps
<= 96        64 x 128 x 64, 4 warps          one warpgroup MMA (wgmma m64) per tile (gated: 8 warps,
                                             dA: 64 x 64; no spills)
> 96         128 x 256 x 64, 8 warps (sm_90)  prefill: BLOCK_N 256 for one weight matrix, 128 for the
             128 x 128 x 64, 8 warps          gated GEMM (two accumulators) on sm_90, one weight on sm_80/86/89;
             128 x 64 x 64, 8 warps           the dA GEMM (its epilogue holds h, dH and act(h) tiles:
                                             BLOCK_N 128 spills on sm_90) and the gated GEMM on sm_80/86/89
                                             (two 128 x 128 mma.sync accumulators spill)
============ ============================== =================================================

Epilogue adjustments (``_fit_epilogue``): the swiglu_oai dA GEMM holds half that accumulator (128 x 32, 64 x 64
with 8 warps, 32 x 64: its epilogue spills at the table's dA tiles); the biased GEMM with gathered rows runs
its 128 x 256 tiles one a program on sm_90 (persistent, it spills).

Tile order: GROUP_M m-tiles per group (n-tiles inside), as many as fill 70% of L2 with their A rows;
dW tiles likewise (GROUP_A a-tiles per group of an expert, at the average rows per expert).
Stages: 4 where ``stages x (BM x BK + n_w x BK x BN) x bytes`` fits the architecture's shared memory
(sm_90 232,448 B, sm_80 166,912 B, sm_86/89 101,376 B per block), else as many as fit (at least 2).
Prefill GEMMs on sm_90 run persistent (grid = SMs x resident programs, striding over the real tiles).
TMA: on sm_90 and newer the weights (and x when its rows are not gathered) load through descriptors
(``configs.use_tma``; the pointer path where a layout does not fit one).
On CPU (the interpreter) tiles are clamped small to keep it fast; the results do not depend on tiles.
"""

from __future__ import annotations

import os

import torch

from . import _launch, configs
from ._utils import next_pow2

DEFAULT_SMEM = 101376  # the smallest of the targets: safe for an architecture not listed
L2 = {"sm_80": 40 * 2**20, "sm_86": 6 * 2**20, "sm_89": 72 * 2**20, "sm_90": 50 * 2**20, "sm_100": 126 * 2**20}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def target(device: torch.device) -> tuple[tuple[int, int], int, int]:
    """``(compute capability, shared memory per block in bytes, SMs)`` of ``_launch.target`` (the
    tensors' GPU, or ``MOE_KERNELS_ASSUME_DEVICE``); for CPU tensors in the interpreter with no assumed
    device a small stand-in (4 SMs), so that the persistent loops run several tiles a program there."""
    if device.type == "cpu" and interpreting() and not os.environ.get("MOE_KERNELS_ASSUME_DEVICE"):
        return (0, 0), DEFAULT_SMEM, 4
    t = _launch.target(device)
    return t.capability, t.smem_per_block, t.sm_count


def l2_bytes(device: torch.device) -> int:
    """L2 cache of the device (or of the assumed one; 6 MB, the smallest listed, when unknown)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or L2["sm_86"]
    if device.type == "cpu" and interpreting() and not os.environ.get("MOE_KERNELS_ASSUME_DEVICE"):
        return L2["sm_86"]
    return L2.get(_launch.target(device).arch, L2["sm_86"])


def group_m(block: int, K: int, es: int, l2: int) -> int:
    """Tiles per group of the tile order: as many row-blocks (``block x K`` elements) as fill 70% of L2
    (1 to 32), so that a group's rows stay in L2 while its other tiles stream the weights, and each
    weight tile is read from HBM once per group (the rest of L2 holds a wave's weight tiles)."""
    # symbolic min/max: K may be a token-derived count under torch.compile (the dW reduction), never a guard
    return torch.sym_max(1, torch.sym_min(32, (l2 * 7 // 10) // torch.sym_max(block * K * es, 1)))


def smem_bytes(bm: int, bn: int, bk: int, stages: int, es: int, n_w: int = 1) -> int:
    """Shared memory of the pipelined operand buffers: ``stages`` copies of an A and ``n_w`` B tiles."""
    return stages * (bm * bk + n_w * bk * bn) * es


def _fit_stages(cfg: dict, es: int, n_w: int, smem: int) -> dict:
    stages = 4
    while stages > 2 and smem_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], stages, es, n_w) > smem:
        stages -= 1
    cfg["num_stages"] = stages
    return cfg


# Activations whose backward epilogue (dA GEMM) needs half the accumulator of the table's dA tile: swiglu_oai
# (gpt-oss: clamps, sigmoid(alpha * gate) and its derivative, (up + 1), on gate and up tiles) spills at 32 fp32
# accumulator elements per thread (128 x 64 with 8 warps, 64 x 64 with 4, 32 x 128 with 4) on sm_80 and sm_90a.
HEAVY_ACT_BWD = ("swiglu_oai",)


def _fit_epilogue(cfg: dict, kernel: str, activation: str, bias: bool, gather: bool) -> dict:
    """The heuristic tile adjusted where the epilogue or the A loads leave too few registers (ptxas spills;
    ``tests/triton_compile_check.py`` fails on any spilled byte); every other launch keeps its tile.

    - dA of a :data:`HEAVY_ACT_BWD` activation: 16 accumulator elements per thread, keeping the row tile (the
      plan's schedule fixes it): 128 x 32 (8 warps), 64 x 64 with 8 warps instead of 4, 32 x 64 (4 warps).
    - The persistent 128 x 256 GEMM on sm_90 with a bias and gathered rows (the backward's recompute of the
      pre-activation with biased experts): one tile per program instead (the persistent loop's state is
      what spills), still 128 x 256 with wgmma and TMA weights.
    """
    if kernel == "gemm_act_bwd" and activation in HEAVY_ACT_BWD:
        if cfg["BLOCK_M"] >= 128:
            cfg.update(BLOCK_N=min(cfg["BLOCK_N"], 32), num_warps=8)
        elif cfg["BLOCK_M"] >= 64:
            cfg["num_warps"] = 8
        else:
            cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)
    if kernel == "gemm" and cfg.get("PERSISTENT") and cfg["BLOCK_N"] >= 256 and bias and gather:
        cfg["PERSISTENT"] = False
    return cfg


def gemm_config(kernel: str, M: int, N: int, K: int, E: int, dtype: torch.dtype, device: torch.device,
                block_m: int | None = None, *, activation: str = "none", bias: bool = False,
                gather: bool = False) -> dict:
    """The config of one grouped GEMM launch (``kernel`` "gemm", "gemm_gated" or "gemm_act_bwd"; M rows, N output columns,
    K reduction); ``block_m`` forces the row tile (a schedule built for it). ``activation``, ``bias`` and
    ``gather`` (rows of x read through the plan) describe the epilogue and the A loads: the few launches
    whose registers they exhaust get narrower tiles (:data:`HEAVY_ACT_BWD`, :func:`_fit_epilogue`)."""
    cap, smem, sms = target(device)
    es = dtype.itemsize
    n_w = 2 if kernel == "gemm_gated" else 1
    tuned = configs._load(str(configs.config_file(kernel, E, N, K, dtype, configs.device_name(device))))
    if tuned:
        cfg = dict(tuned[min(tuned, key=lambda m: abs(m - M))])
    else:
        rows = configs._rows_per_expert(M, E)  # buckets only (no max(1, .): a 0/1 guard); fixed when batch-invariant
        if rows <= 16:
            cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4)
        elif rows <= 32:
            cfg = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4)
        elif rows <= 96:  # the gated GEMM's two accumulators: 8 warps; the dA epilogue's h/dH tiles: 64 wide
            cfg = dict(BLOCK_M=64, BLOCK_N=64 if kernel == "gemm_act_bwd" else 128, BLOCK_K=64,
                       num_warps=8 if kernel == "gemm_gated" else 4)
        else:
            wide = cap >= (9, 0) and kernel == "gemm"  # the dA epilogue holds h tiles too: 128 wide
            narrow = kernel == "gemm_act_bwd" or (kernel == "gemm_gated" and cap < (9, 0))
            cfg = dict(BLOCK_M=128, BLOCK_N=256 if wide else 64 if narrow else 128, BLOCK_K=64, num_warps=8)
            cfg["PERSISTENT"] = cap >= (9, 0) and kernel != "gemm_act_bwd"  # persistent dA spills (sm_90)
        if block_m is not None:
            cfg["BLOCK_M"] = block_m
        _fit_epilogue(cfg, kernel, activation, bias, gather)
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, next_pow2(N)))
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, next_pow2(K)))
        if dtype == torch.float32:
            cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    cfg.setdefault("GROUP_M", group_m(cfg["BLOCK_M"], K, es, l2_bytes(device)))
    cfg.setdefault("PERSISTENT", False)
    cfg.setdefault("TMA", configs.use_tma(cap))
    if interpreting() and device.type == "cpu":  # small tiles keep the interpreter fast
        cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 32) if block_m is None else block_m, BLOCK_N=min(cfg["BLOCK_N"], 64),
                   BLOCK_K=min(cfg["BLOCK_K"], 32))
    if "num_stages" not in cfg or not tuned:
        _fit_stages(cfg, es, n_w, smem)
    per_prog = smem_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], es, n_w)
    cfg.setdefault("NUM_PROGS", sms * max(1, min(4, smem // max(per_prog, 1))))
    return cfg


def fused_block_m(M: int, E: int, dtype: torch.dtype, device: torch.device, I: int, H: int) -> int:
    """The row tile shared by both GEMMs of fused_moe (one schedule from the plan): the first GEMM's."""
    return gemm_config("gemm_gated", M, I, H, E, dtype, device)["BLOCK_M"]


def wgrad_config(A: int, B: int, dtype: torch.dtype, device: torch.device, rows_per_expert: int = 0) -> dict:
    """dW tiles ``out[e] = a_e^T b_e`` ([A, B] per expert, reduction over the segment's rows): 128 x 128
    output tiles, 64 rows a step, 8 warps, 4 stages where they fit, persistent over (expert, tile)."""
    cap, smem, sms = target(device)
    es = dtype.itemsize
    ba, bb = min(128, max(16, next_pow2(A))), min(128, max(16, next_pow2(B)))
    bm = 32 if dtype == torch.float32 else 64
    if interpreting() and device.type == "cpu":
        ba, bb, bm = min(ba, 64), min(bb, 64), 32
    cfg = dict(BLOCK_A=ba, BLOCK_B=bb, BLOCK_M=bm, num_warps=8 if ba * bb >= 128 * 128 else 4)
    stages = 4
    while stages > 2 and stages * (bm * ba + bm * bb) * es > smem:
        stages -= 1
    cfg["num_stages"] = stages
    per_prog = stages * (bm * ba + bm * bb) * es
    cfg["NUM_PROGS"] = sms * max(1, min(2, smem // max(per_prog, 1)))
    cfg["GROUP_A"] = group_m(ba, torch.sym_max(1, rows_per_expert), es, l2_bytes(device))  # a runtime argument: no recompiles
    return cfg
