"""Argument checks shared by every public function.

Each check raises ``ValueError`` (bad value, shape or device) or ``TypeError`` (bad type or dtype)
with a message that names the function, the argument and what was expected.

Checks that need the *values* of a tensor (ids in range, ...) would force a host synchronisation on
a GPU, so they run only where they are free (CPU tensors) or where the caller asked for them with
``MOE_KERNELS_CHECK_VALUES=1``; never while torch.compile traces or a CUDA graph is captured.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_tensor(
    fn: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    layout: str = "",
) -> torch.Tensor:
    """Check type, rank, dtype and (partially known) shape of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        what = f" {layout}" if layout else ""
        raise ValueError(f"{fn}: {name} must be a {ndim}-D tensor{what}, got shape {_shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            what = f" {layout}" if layout else ""
            raise ValueError(f"{fn}: {name} must have shape {want}{what}, got {_shape(t)}")
    return t


def check_same_device(fn: str, **tensors) -> torch.device:
    """All given (non-None) tensors on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    device = items[0][1].device
    for n, t in items[1:]:
        if t.device != device:
            first = items[0][0]
            raise ValueError(f"{fn}: {n} is on {t.device} but {first} is on {device}; all tensors must share a device")
    return device


def check_int(fn: str, name: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{fn}: {name} must be in {rng}, got {v}")
    return v


def check_choice(fn: str, name: str, v, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if v not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {v!r}")
    return v


def value_checks_enabled(t: torch.Tensor) -> bool:
    """True where a check of tensor values costs no host synchronisation (or was asked for)."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # a sync would break the capture
        return False
    if t.device.type == "cpu" or t.device.type == "meta":
        return t.device.type == "cpu"
    return os.environ.get("MOE_KERNELS_CHECK_VALUES", "0") == "1"


def check_ids_in_range(fn: str, name: str, ids: torch.Tensor, num_experts: int, *, allow_minus_one: bool = True) -> None:
    """ids in [0, num_experts), or -1 where dropping is allowed (value check, see module doc)."""
    if ids.numel() == 0 or not value_checks_enabled(ids):
        return
    lo = -1 if allow_minus_one else 0
    bad = (ids < lo) | (ids >= num_experts)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        allowed = f"[0, {num_experts}) or -1" if allow_minus_one else f"[0, {num_experts})"
        raise ValueError(f"{fn}: {name} must hold values in {allowed}; found {int(ids[idx])} at index {idx}")
