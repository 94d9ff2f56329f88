"""Tile configurations of the Triton kernels: heuristic defaults, optionally overridden by tuned JSON.

Tuned files live in ``configs/`` beside this module, one per (kernel, E, N, K, dtype, device), named
``<kernel>,E=<E>,N=<N>,K=<K>,dtype=<dtype>,device=<device>.json``; each maps a row count M (as a string)
to ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}``. The entry with the nearest M is used.
``python -m bench tune`` writes them. No autotuning happens at call time.

Every config is chosen for a target architecture (``_launch.target``: the tensors' GPU, or
``MOE_KERNELS_ASSUME_DEVICE`` for CPU tensors) in one pipeline: target -> candidate (tuned entry or
heuristic) -> fitted to the target's shared memory per block -> config.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ..batch_invariance import is_batch_invariant
from ._launch import Target, assumed_target, target
from ._utils import next_pow2

CONFIG_DIR = Path(os.environ.get("MOE_KERNELS_CONFIG_DIR", Path(__file__).parent / "configs"))
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
INVARIANT_ROWS = 64  # the batch-invariant mode's tiles: those of 64 rows per expert, for every batch
MAX_ACC_PER_THREAD = 64  # fp32 accumulator registers per thread that leave room for the loads and epilogue
SMEM_RESERVE = 1024  # bytes kept free for the compiler's own scratch (barriers, layout conversions)


def use_tma(capability) -> bool:
    """The GEMMs' TMA flag for an architecture: descriptors for the operands on sm_90 and newer (Hopper's
    and Blackwell's tensor memory accelerator), the pointer path on sm_80/86/89; ``MOE_KERNELS_TMA=0`` turns
    it off everywhere. A launch still falls back to pointers when an operand's layout does not fit a
    descriptor (``triton_kernels/tma.py``)."""
    return tuple(capability) >= (9, 0) and os.environ.get("MOE_KERNELS_TMA", "1") != "0"


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")


def config_file(kernel: str, E: int, N: int, K: int, dtype: torch.dtype, device: str) -> Path:
    return CONFIG_DIR / f"{kernel},E={E},N={N},K={K},dtype={str(dtype).replace('torch.', '')},device={device}.json"


@functools.lru_cache(maxsize=256)
def _load(path: str) -> dict[int, dict] | None:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return {int(m): {k: int(v) for k, v in cfg.items() if k in KEYS} for m, cfg in raw.items()}


def _rows_per_expert(M: int, E: int) -> int:
    """The row count the tiles are chosen for; fixed in the batch-invariant mode (never from T).

    Otherwise the token count enters only through the bucket of rows per expert (<= 16, <= 32, <= 256, more):
    under torch.compile with a dynamic token count that is one graph per bucket, never one per size."""
    if is_batch_invariant():
        return INVARIANT_ROWS
    return M // max(E, 1)  # average rows per expert; the buckets below are the only dependence on M


def default_config(M: int, N: int, K: int, E: int, dtype: torch.dtype, target: Target | None = None,
                   gated: bool = False) -> dict:
    """The heuristic candidate for ``target``: small row tiles and long K tiles for decode (few rows per
    expert: the weight read dominates), wgmma-sized tiles for prefill; then fitted to the target's
    shared memory (:func:`fit_shared_memory`)."""
    target = target or assumed_target()
    rows = _rows_per_expert(M, E)
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 256 else 128
    bn = min(128, max(16, next_pow2(N)))
    bk = min(128 if bm <= 32 else 64, max(16, next_pow2(K)))
    if dtype == torch.float32:
        bk = min(bk, 32)
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 3 if bm >= 64 else 4
    if target.capability[0] < 9 and bm >= 128:  # mma.sync: more stages hide the global loads better
        stages = 4
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
    return fit_shared_memory(cfg, dtype, target, gated)


def smem_bytes(cfg: dict, dtype: torch.dtype, gated: bool = False, target: Target | None = None) -> int:
    """Shared memory of the pipelined loads: buffers of the x tile and the one (or, gated, two) weight
    tiles, ``num_stages - 1`` of them for mma.sync and ``num_stages`` for Hopper's wgmma (64-row tiles
    and up on sm_90). It matches what the compiler reports (``bench/results/compile_*.md``)."""
    per_stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] + (2 if gated else 1) * cfg["BLOCK_K"] * cfg["BLOCK_N"]
    wgmma = target is not None and target.has_wgmma and cfg["BLOCK_M"] >= 64
    buffers = cfg["num_stages"] if wgmma else max(1, cfg["num_stages"] - 1)
    return buffers * per_stage * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def fit_shared_memory(cfg: dict, dtype: torch.dtype, target: Target, gated: bool = False) -> dict:
    """``cfg`` shrunk until it fits ``target``'s shared memory per block: first shorter K tiles (down to
    64), then fewer stages (down to 2), then K tiles down to 32, then narrower N and M tiles."""
    cfg = dict(cfg)
    limit = target.smem_per_block - SMEM_RESERVE
    steps = (("BLOCK_K", 64), ("num_stages", 2), ("BLOCK_K", 32), ("BLOCK_N", 64), ("BLOCK_M", 32), ("BLOCK_K", 16),
             ("BLOCK_N", 16), ("BLOCK_M", 16))
    for key, floor in steps:
        while smem_bytes(cfg, dtype, gated, target) > limit and cfg[key] > floor:
            cfg[key] = cfg[key] - 1 if key == "num_stages" else cfg[key] // 2
    if smem_bytes(cfg, dtype, gated, target) > limit:  # pragma: no cover - 16x16x16 tiles fit every GPU
        raise RuntimeError(f"no grouped GEMM config fits {target.arch}'s {target.smem_per_block} B of shared memory")
    return fit_registers(cfg, gated)


def fit_registers(cfg: dict, gated: bool = False) -> dict:
    """At most ``MAX_ACC_PER_THREAD`` fp32 accumulator elements per thread (gated tiles hold two
    accumulators): more warps (up to 8), then narrower N tiles. Beyond that ptxas spills (the compile
    check fails on any spilled byte)."""
    cfg = dict(cfg)
    acc = lambda c: (2 if gated else 1) * c["BLOCK_M"] * c["BLOCK_N"] // (32 * c["num_warps"])  # noqa: E731
    while acc(cfg) > MAX_ACC_PER_THREAD and cfg["num_warps"] < 8:
        cfg["num_warps"] *= 2
    while acc(cfg) > MAX_ACC_PER_THREAD and cfg["BLOCK_N"] > 16:
        cfg["BLOCK_N"] //= 2
    return cfg


def get_config(kernel: str, M: int, N: int, K: int, E: int, dtype: torch.dtype, device: torch.device) -> dict:
    """target -> candidate -> fit -> config. The target comes from ``device`` (see ``_launch.target``);
    the candidate is the tuned config of the nearest M when a tuned file exists for this shape and device
    (not in the batch-invariant mode: tuned files are keyed by row count), else :func:`default_config`;
    either is fitted to the target's shared memory."""
    tgt = target(device)
    gated = kernel.endswith("_gated")
    if not is_batch_invariant():
        tuned = _load(str(config_file(kernel, E, N, K, dtype, device_name(device))))
        if tuned:
            return fit_shared_memory(tuned[min(tuned, key=lambda m: abs(m - M))], dtype, tgt, gated)
    return default_config(M, N, K, E, dtype, tgt, gated)
