"""Tile configurations of the Triton kernels: heuristic defaults, optionally overridden by tuned JSON.

Tuned files live in ``configs/`` beside this module, one per (kernel, E, N, K, dtype, device), named
``<kernel>,E=<E>,N=<N>,K=<K>,dtype=<dtype>,device=<device>.json``; each maps a row count M (as a string)
to ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"}``. The entry with the nearest M is used.
``python -m bench tune`` writes them. No autotuning happens at call time.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ._utils import next_pow2

CONFIG_DIR = Path(os.environ.get("MOE_KERNELS_CONFIG_DIR", Path(__file__).parent / "configs"))
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


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


def default_config(M: int, N: int, K: int, E: int, dtype: torch.dtype) -> dict:
    """Good-everywhere heuristics: small row tiles for decode (few rows per expert), large for prefill.

    The token count enters only through the bucket of rows per expert (<= 16, <= 32, <= 256, more):
    under torch.compile with a dynamic token count that is one graph per bucket, never one per size."""
    rows = M // max(E, 1)  # average rows per expert; the buckets below are the only dependence on M
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 256 else 128
    bn = min(128, max(16, next_pow2(N)))
    bk = min(128 if bm <= 32 else 64, max(16, next_pow2(K)))
    if dtype == torch.float32:
        bk = min(bk, 32)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": 3 if bm >= 64 else 4}


def get_config(kernel: str, M: int, N: int, K: int, E: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The tuned config of the nearest M if a tuned file exists for this shape and device, else the default."""
    tuned = _load(str(config_file(kernel, E, N, K, dtype, device_name(device))))
    if tuned:
        return dict(tuned[min(tuned, key=lambda m: abs(m - M))])
    return default_config(M, N, K, E, dtype)
