"""Output allocation for kernels.

With ``MOE_KERNELS_POISON=1`` (the test suite sets it) fresh outputs are filled with NaN (floats) or
a large sentinel (integers), so an element a kernel forgets to write fails the comparison instead of
passing on a lucky zero.
"""

from __future__ import annotations

import os

import torch

INT_SENTINEL = 0x5A5A5A5A


def poison_enabled() -> bool:
    return os.environ.get("MOE_KERNELS_POISON", "0") == "1"


def empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan") if dtype.is_floating_point else INT_SENTINEL)
    return out
