"""Grouped expert GEMM."""

from __future__ import annotations

import torch

from . import _backends, _checks
from . import ops  # noqa: F401
from .quant import QuantizedWeight, check_not_raw_fp8
from .routing import RoutingPlan

_OPS = torch.ops.moe_kernels
_backends.register("grouped_gemm", "torch")(_OPS.grouped_gemm.default)
_backends.register("grouped_gemm_wgrad", "torch")(_OPS.grouped_gemm_wgrad.default)


def grouped_gemm(
    x_sorted: torch.Tensor,
    w: torch.Tensor,
    plan_or_offsets: RoutingPlan | torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    weight_layout: str = "nk",
    activation_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Every expert's rows times its own weight, in one call.

    ============== ============ =====================================================================
    argument       shape        meaning
    ============== ============ =====================================================================
    x_sorted       [P, K]       rows grouped by expert (``permute`` output)
    w              [E, N, K]    per-expert weight in nn.Linear layout (``weight_layout="nk"``),
                   [E, K, N]    or transposed (``weight_layout="kn"``)
    plan_or_offsets             a RoutingPlan, or ``expert_offsets`` [E+1] int32 with offsets[0] = 0
    bias           [E, N]       optional per-expert bias
    y_sorted       [P, N]       ``x_sorted[r] @ w[e].T + bias[e]`` for rows r of expert e
    ============== ============ =====================================================================

    Rows outside every segment, and padding rows of a plan, are zero. ``x_sorted`` and ``w`` share a
    float dtype; accumulation is fp32 (fp64 for fp64). Differentiable in ``x_sorted``, ``w`` and ``bias``.

    ``w`` may be a :class:`~moe_kernels.QuantizedWeight` (FP8, ``[E, N, K]``; inference only): ``x_sorted`` is
    then quantized dynamically (see :mod:`moe_kernels.quant`), or with the static per-tensor
    ``activation_scale`` (one fp32 element) when given, and ``y`` comes out in ``x_sorted``'s dtype.
    """
    fn = "grouped_gemm"
    if isinstance(w, QuantizedWeight):
        from . import _quant_ops

        return _quant_ops.grouped_gemm(x_sorted, w, plan_or_offsets, bias=bias, weight_layout=weight_layout,
                                       activation_scale=activation_scale, backend=backend)
    check_not_raw_fp8(fn, w=w)
    if activation_scale is not None:
        raise ValueError(f"{fn}: activation_scale is for a QuantizedWeight w; w is a dense {type(w).__name__}")
    _checks.check_choice(fn, "weight_layout", weight_layout, ("nk", "kn"))
    _checks.check_tensor(fn, "x_sorted", x_sorted, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[P, K]")
    K = x_sorted.shape[1]
    shape = (None, None, K) if weight_layout == "nk" else (None, K, None)
    _checks.check_tensor(fn, "w", w, dtypes=(x_sorted.dtype,), shape=shape, layout=f"[E, {'N, K' if weight_layout == 'nk' else 'K, N'}] with K={K}")
    E = w.shape[0]
    N = w.shape[1] if weight_layout == "nk" else w.shape[2]
    offsets, sorted_slots = _segments(fn, "x_sorted", x_sorted, plan_or_offsets, E)
    if offsets.shape[0] != E + 1:
        raise ValueError(f"{fn}: w has E={E} experts but the plan has {offsets.shape[0] - 1}")
    if bias is not None:
        _checks.check_tensor(fn, "bias", bias, dtypes=_checks.FLOAT_DTYPES, shape=(E, N), layout="[E, N]")
    _checks.check_same_device(fn, x_sorted=x_sorted, w=w, plan=offsets, bias=bias)
    impl = _backends.select(fn, backend, x_sorted.device, x_sorted, w)
    return impl(x_sorted, w, offsets, bias, sorted_slots, weight_layout == "nk")


def _segments(fn: str, rows_name: str, rows: torch.Tensor, plan_or_offsets, num_experts: int | None):
    """``(expert_offsets int32 [E+1], sorted_slots or None)`` of a RoutingPlan or of checked offsets."""
    if isinstance(plan_or_offsets, RoutingPlan):
        if plan_or_offsets.num_rows != rows.shape[0]:
            raise ValueError(f"{fn}: {rows_name} must have the plan's P={plan_or_offsets.num_rows} rows, got {rows.shape[0]}")
        return plan_or_offsets.expert_offsets, plan_or_offsets.sorted_slots
    shape = (None if num_experts is None else num_experts + 1,)
    offsets = _checks.check_tensor(fn, "plan_or_offsets", plan_or_offsets, ndim=1, dtypes=_checks.INDEX_DTYPES, shape=shape,
                                   layout="[E+1] expert offsets")
    if offsets.shape[0] < 1:
        raise ValueError(f"{fn}: expert offsets must have E+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    if _checks.value_checks_enabled(offsets) and offsets.numel():
        o = offsets.tolist()
        if o[0] != 0 or any(b < a for a, b in zip(o, o[1:])) or o[-1] > rows.shape[0]:
            raise ValueError(f"{fn}: expert offsets must start at 0, not decrease and end at most at P={rows.shape[0]}; got {o}")
    return offsets.to(torch.int32), None


def grouped_gemm_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    plan_or_offsets: RoutingPlan | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Ragged-K grouped GEMM: per expert ``a_e^T @ b_e`` over the rows of its segment (the weight gradient).

    ============== ============ =====================================================================
    argument       shape        meaning
    ============== ============ =====================================================================
    a              [P, A]       rows grouped by expert (e.g. ``dY`` of a grouped GEMM)
    b              [P, B]       the same rows of the other operand (e.g. its input ``X``), same dtype
    plan_or_offsets             a RoutingPlan (its padding rows do not count), or ``expert_offsets`` [E+1]
    out            [E, A, B]    ``sum over rows r of expert e of a[r]^T b[r]``; 0 for an expert without rows
    ============== ============ =====================================================================

    What grouped_gemm's ``trans_a=True`` and triton_kernels' ragged-K matmul compute; accumulation is fp32
    (fp64 for fp64), the result in ``a``'s dtype. The weight gradient of ``y = grouped_gemm(x, w, plan)``
    (``w`` [E, N, K]) is ``grouped_gemm_wgrad(dy, x, plan)``. Differentiable in ``a`` and ``b``.

    Example::

        >>> dw = grouped_gemm_wgrad(dy_sorted, x_sorted, plan)  # [E, N, K]
    """
    fn = "grouped_gemm_wgrad"
    _checks.check_tensor(fn, "a", a, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[P, A]")
    _checks.check_tensor(fn, "b", b, ndim=2, dtypes=(a.dtype,), shape=(a.shape[0], None), layout=f"[P={a.shape[0]}, B] (a's dtype)")
    offsets, sorted_slots = _segments(fn, "a", a, plan_or_offsets, None)
    _checks.check_same_device(fn, a=a, b=b, plan=offsets)
    impl = _backends.select(fn, backend, a.device, a, b)
    return impl(a, b, offsets, sorted_slots)
