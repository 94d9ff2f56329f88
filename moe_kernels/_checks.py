"""Argument checks shared by every public function.

Each check raises ``ValueError`` (bad value, shape or device) or ``TypeError`` (bad type or dtype)
with a message that names the function, the argument and what was expected.

Checks that need the *values* of a tensor (ids in range, ...) would force a host synchronisation on
a GPU, so they run only where they are free (CPU tensors) or where the caller asked for them with
``MOE_KERNELS_CHECK_VALUES=1``; never while torch.compile traces or a CUDA graph is captured.

Expert ids outside ``[0, E)`` are not errors: every backend drops those slots (vLLM's and Hugging
Face's expert-parallel sentinels, ``-1``, global ids an ``expert_map`` does not cover), so expert ids
are value-checked only in the strict mode ``MOE_KERNELS_CHECK_VALUES=1`` (:func:`check_expert_ids`).

Sizes may be symbolic under torch.compile (dynamic or data-dependent token counts): shape checks
raise where the answer is known and otherwise leave a runtime assertion (``torch._check``), never a
guard on a data-dependent size.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)  # expert ids (MegaBlocks: int16)


def known_true(cond) -> bool:
    """``cond`` (a bool or a symbolic bool) is certainly true; False where tracing cannot tell."""
    if isinstance(cond, bool):
        return cond
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    return guard_or_false(cond)


def check_size(fn: str, name: str, value, *, lo: int, what: str = "") -> None:
    """A (possibly symbolic) size ``>= lo``: ValueError where known, a runtime assertion otherwise."""
    if known_true(value < lo):
        raise ValueError(f"{fn}: {name} must be >= {lo}{what}, got {value}")
    if not isinstance(value, int):  # symbolic: checked when the graph runs
        check_symbolic(value >= lo, f"{fn}: {name} must be >= {lo}{what}")


def check_symbolic(cond, message: str) -> None:
    """A runtime assertion on a (symbolic) condition; ``message`` a plain string (torch.compile
    records it with the graph)."""
    if isinstance(cond, bool):
        if not cond:
            raise ValueError(message)
        return
    torch._check(cond, lambda: message)


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

        def msg():
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            what = f" {layout}" if layout else ""
            return f"{fn}: {name} must have shape {want}{what}, got {_shape(t)}"

        if len(shape) != t.dim() or any(s is not None and known_true(s != d) for s, d in zip(shape, t.shape)):
            raise ValueError(msg())
        for s, d in zip(shape, t.shape):
            if s is not None and not isinstance(s == d, bool):  # symbolic: checked when the graph runs
                check_symbolic(s == d, f"{fn}: {name} must have shape {layout or 'as documented'}")
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


def strict_values() -> bool:
    """``MOE_KERNELS_CHECK_VALUES=1``: out-of-range expert ids raise instead of being dropped."""
    return os.environ.get("MOE_KERNELS_CHECK_VALUES", "0") == "1"


def check_expert_ids(fn: str, name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Expert ids outside ``[0, num_experts)`` are dropped slots on every backend; only the strict
    mode rejects them (ids in ``[0, num_experts)`` or -1), at the cost of a host synchronisation on a GPU."""
    if torch.compiler.is_compiling() or not strict_values():
        return
    check_ids_in_range(fn, name, ids, num_experts)


def check_top_k(fn: str, name: str, ids: torch.Tensor) -> int:
    """The width k of ids ``[T, k]``: at least 1 (a token routed to no slot has ids of -1, not k = 0)."""
    k = ids.shape[1]
    check_size(fn, f"{name}.shape[1] (k)", k, lo=1, what=" (give dropped slots the id -1)")
    return k


def check_moe_routing(fn: str, topk_ids, topk_weights, T: int, E: int, H: int, I2: int, w13_bias, w2_bias, capacity,
                      drop_policy: str, expert_map, float_dtypes, drop_policies) -> tuple[int, int]:
    """The routing arguments of a fused MoE call (ids, weights, biases, capacity, drop policy, expert map), the
    same for every weight format; returns ``(k, number of valid ids)``."""
    check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=ID_DTYPES, shape=(T, None), layout="[T, k]")
    k = check_top_k(fn, "topk_ids", topk_ids)
    check_tensor(fn, "topk_weights", topk_weights, dtypes=float_dtypes, shape=(T, k), layout="[T, k]")
    if w13_bias is not None:
        check_tensor(fn, "w13_bias", w13_bias, dtypes=float_dtypes, shape=(E, I2), layout="[E, 2I]")
    if w2_bias is not None:
        check_tensor(fn, "w2_bias", w2_bias, dtypes=float_dtypes, shape=(E, H), layout="[E, H]")
    if capacity is not None:
        check_int(fn, "capacity", capacity, lo=0)
    check_choice(fn, "drop_policy", drop_policy, drop_policies)
    n_ids = E
    if expert_map is not None:
        check_tensor(fn, "expert_map", expert_map, ndim=1, dtypes=ID_DTYPES, layout="[E_global]")
        check_expert_ids(fn, "expert_map", expert_map, E)
        n_ids = expert_map.shape[0]
    return k, n_ids
