"""Weight-only quantized experts (``int8``, ``int4``, ``mxfp4``; :mod:`moe_kernels.quant_int`): the reference ops
(``torch`` backend), their registration, and the dispatch behind ``grouped_gemm`` / ``fused_moe`` for them.

Activations stay in their dtype (w8a16 / w4a16 / mxfp4 x bf16): the reference dequantizes the weight to the
activations' dtype and runs the dense reference; the Triton kernels dequantize tiles in the main loop. Inference
only: a backward raises, naming the weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import _backends, _checks
from . import reference as ref
from ._quant_ops import _offsets, inference_only
from .quant import QuantizedWeight
from .quant_int import INT_FORMATS, dequantize_raw


def _dense(fmt, data, scale, zero, group_size, dtype):
    return dequantize_raw(fmt, data, scale, zero, group_size, ref.acc_dtype(dtype)).to(dtype)


@custom_op("moe_kernels::wna16_grouped_gemm", mutates_args=())
def wna16_grouped_gemm(
    x: Tensor, w_data: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], fmt: str, group_size: int,
    expert_offsets: Tensor, bias: Optional[Tensor], sorted_slots: Optional[Tensor],
) -> Tensor:
    """``y[r] = x[r] @ deq(w)[e].T + bias[e]`` with ``deq(w)`` in ``x``'s dtype (``group_size`` 0: per channel)."""
    w = _dense(fmt, w_data, w_scale, w_zero, group_size, x.dtype)
    return ref.grouped_gemm(x, w, expert_offsets, bias.to(x.dtype) if bias is not None else None, sorted_slots)


@wna16_grouped_gemm.register_fake
def _(x, w_data, w_scale, w_zero, fmt, group_size, expert_offsets, bias, sorted_slots):
    return x.new_empty(x.shape[0], w_data.shape[1])


@custom_op("moe_kernels::wna16_fused_moe", mutates_args=())
def wna16_fused_moe(
    hidden: Tensor, w13_data: Tensor, w13_scale: Tensor, w13_zero: Optional[Tensor], w2_data: Tensor,
    w2_scale: Tensor, w2_zero: Optional[Tensor], fmt: str, w13_group: int, w2_group: int, topk_weights: Tensor,
    topk_ids: Tensor, activation: str, gated: bool, w13_bias: Optional[Tensor], w2_bias: Optional[Tensor],
    apply_router_weight_on_input: bool, capacity: Optional[int], expert_map: Optional[Tensor],
) -> Tensor:
    """The dense reference MoE on the weights dequantized to ``hidden``'s dtype."""
    dt = hidden.dtype
    w13 = _dense(fmt, w13_data, w13_scale, w13_zero, w13_group, dt)
    w2 = _dense(fmt, w2_data, w2_scale, w2_zero, w2_group, dt)
    b13 = w13_bias.to(dt) if w13_bias is not None else None
    b2 = w2_bias.to(dt) if w2_bias is not None else None
    return ref.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, gated, b13, b2,
                         apply_router_weight_on_input, capacity, expert_map).to(dt)


@wna16_fused_moe.register_fake
def _(hidden, *args):
    return torch.empty_like(hidden)


_bwd, _setup = inference_only("grouped_gemm", "w")
wna16_grouped_gemm.register_autograd(_bwd, setup_context=_setup)
_bwd, _setup = inference_only("fused_moe", "w13 / w2")
wna16_fused_moe.register_autograd(_bwd, setup_context=_setup)
_backends.register("wna16_grouped_gemm", "torch")(torch.ops.moe_kernels.wna16_grouped_gemm.default)
_backends.register("wna16_fused_moe", "torch")(torch.ops.moe_kernels.wna16_fused_moe.default)


# ----- dispatch of the public functions --------------------------------------------------------------


def _check(fn: str, name: str, w, N, K, layout: str, fmt: str | None = None) -> QuantizedWeight:
    if not isinstance(w, QuantizedWeight):
        raise ValueError(f"{fn}: {name} must be a QuantizedWeight like the other expert weight, got {type(w).__name__}")
    if w.fmt not in INT_FORMATS or (fmt is not None and w.fmt != fmt):
        raise ValueError(f"{fn}: {name} has fmt={w.fmt!r}; w13 and w2 must share a format"
                         if fmt is not None else f"{fn}: {name} has fmt={w.fmt!r}; expected one of {INT_FORMATS}")
    _, n, kk = w.shape
    if (N is not None and n != N) or (K is not None and kk != K):
        raise ValueError(f"{fn}: {name} must have dense shape {layout}, got {list(w.shape)}")
    return w


def grouped_gemm(x_sorted, w: QuantizedWeight, plan_or_offsets, *, bias=None, weight_layout="nk",
                 activation_scale=None, backend="auto") -> Tensor:
    """``moe_kernels.grouped_gemm`` with an int8 / int4 / mxfp4 QuantizedWeight (see there)."""
    fn = "grouped_gemm"
    if weight_layout != "nk":
        raise ValueError(f"{fn}: a QuantizedWeight is [E, N, K] (weight_layout='nk'), got weight_layout={weight_layout!r}")
    if activation_scale is not None:
        raise ValueError(f"{fn}: activation_scale is for FP8 weights; fmt={w.fmt!r} is weight-only (activations stay "
                         "in their dtype)")
    _checks.check_tensor(fn, "x_sorted", x_sorted, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[P, K]")
    P, K = x_sorted.shape
    _check(fn, "w", w, None, K, f"[E, N, K={K}]")
    E, N, _ = w.shape
    offsets, slots = _offsets(fn, plan_or_offsets, P, E)
    if bias is not None:
        _checks.check_tensor(fn, "bias", bias, dtypes=_checks.FLOAT_DTYPES, shape=(E, N), layout="[E, N]")
    _checks.check_same_device(fn, x_sorted=x_sorted, w=w.data, plan=offsets, bias=bias)
    g = w.group_size or 0
    impl = _backends.select("wna16_grouped_gemm", backend, x_sorted.device, x_sorted, w.data, w.scale, w.zero, w.fmt, g)
    return impl(x_sorted, w.data, w.scale, w.zero, w.fmt, g, offsets, bias, slots)


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, *, activation, gated, w13_bias, w2_bias,
              apply_router_weight_on_input, capacity, expert_map, a13_scale, a2_scale, backend) -> Tensor:
    """``moe_kernels.fused_moe`` with int8 / int4 / mxfp4 QuantizedWeight experts (see there)."""
    fn = "fused_moe"
    f = _checks.FLOAT_DTYPES
    if a13_scale is not None or a2_scale is not None:
        raise ValueError(f"{fn}: a13_scale / a2_scale are for FP8 experts; fmt={w13.fmt!r} is weight-only")
    _checks.check_tensor(fn, "hidden", hidden, ndim=2, dtypes=f, layout="[T, H]")
    T, H = hidden.shape
    _checks.check_choice(fn, "activation", activation, ref.GATED_ACTIVATIONS if gated else ref.PLAIN_ACTIVATIONS)
    _check(fn, "w13", w13, None, H, f"[E, 2I, H={H}]")
    E, I2 = w13.shape[0], w13.shape[1]
    if gated and I2 % 2:
        raise ValueError(f"{fn}: gated w13 must have an even number of rows 2I, got shape {list(w13.shape)}")
    inter = I2 // 2 if gated else I2
    _check(fn, "w2", w2, H, inter, f"[E, H={H}, I={inter}]", fmt=w13.fmt)
    if w2.shape[0] != E:
        raise ValueError(f"{fn}: w2 must have the E={E} experts of w13, got dense shape {list(w2.shape)}")
    k, n_ids = _checks.check_moe_routing(fn, topk_ids, topk_weights, T, E, H, I2, w13_bias, w2_bias, capacity,
                                         "gshard", expert_map, f, ("gshard",))
    _checks.check_same_device(fn, hidden=hidden, w13=w13.data, w2=w2.data, topk_weights=topk_weights, topk_ids=topk_ids,
                              w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map)
    _checks.check_expert_ids(fn, "topk_ids", topk_ids, n_ids)
    g13, g2 = w13.group_size or 0, w2.group_size or 0
    impl = _backends.select("wna16_fused_moe", backend, hidden.device, hidden, w13.data, w13.scale, w13.zero, w2.data,
                            w2.scale, w2.zero, w13.fmt, g13, g2)
    return impl(hidden, w13.data, w13.scale, w13.zero, w2.data, w2.scale, w2.zero, w13.fmt, g13, g2, topk_weights,
                topk_ids, activation, bool(gated), w13_bias, w2_bias, bool(apply_router_weight_on_input), capacity,
                expert_map)


from . import _triton_wna16  # noqa: E402,F401  (registers the triton backend of these ops)
