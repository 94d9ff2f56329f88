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

from . import _backends
from . import reference as ref
from ._quant_ops import check_gemm_call, check_moe_routing, check_moe_weights, check_qweight, dispatch, inference_only
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


def _check(fn: str, name: str, w, N, K, layout: str, like=None) -> QuantizedWeight:
    err = "w13 and w2 must share a format" if like is not None else f"expected one of {INT_FORMATS}"
    return check_qweight(fn, name, w, N, K, layout, INT_FORMATS if like is None else (like.fmt,), err)


def grouped_gemm(x_sorted, w: QuantizedWeight, plan_or_offsets, *, bias=None, weight_layout="nk",
                 activation_scale=None, backend="auto") -> Tensor:
    """``moe_kernels.grouped_gemm`` with an int8 / int4 / mxfp4 QuantizedWeight (see there)."""
    fn = "grouped_gemm"
    if weight_layout != "nk":
        raise ValueError(f"{fn}: a QuantizedWeight is [E, N, K] (weight_layout='nk'), got weight_layout={weight_layout!r}")
    if activation_scale is not None:
        raise ValueError(f"{fn}: activation_scale is for FP8 weights; fmt={w.fmt!r} is weight-only (activations stay "
                         "in their dtype)")
    offsets, slots = check_gemm_call(fn, x_sorted, w, plan_or_offsets, bias, weight_layout, _check)
    g = w.group_size or 0
    return dispatch("wna16_grouped_gemm", backend, x_sorted.device, x_sorted, w.data, w.scale, w.zero, w.fmt, g, offsets,
                    bias, slots)


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, *, activation, gated, w13_bias, w2_bias,
              apply_router_weight_on_input, capacity, expert_map, a13_scale, a2_scale, backend) -> Tensor:
    """``moe_kernels.fused_moe`` with int8 / int4 / mxfp4 QuantizedWeight experts (see there)."""
    fn = "fused_moe"
    if a13_scale is not None or a2_scale is not None:
        raise ValueError(f"{fn}: a13_scale / a2_scale are for FP8 experts; fmt={w13.fmt!r} is weight-only")
    T, H, E, I2 = check_moe_weights(fn, hidden, w13, w2, activation, gated, _check)
    check_moe_routing(fn, hidden, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, capacity, "gshard", expert_map,
                      ("gshard",), T, E, H, I2)
    g13, g2 = w13.group_size or 0, w2.group_size or 0
    return dispatch("wna16_fused_moe", backend, hidden.device, hidden, w13.data, w13.scale, w13.zero, w2.data, w2.scale,
                    w2.zero, w13.fmt, g13, g2, topk_weights, topk_ids, activation, bool(gated), w13_bias, w2_bias,
                    bool(apply_router_weight_on_input), capacity, expert_map)


from . import _triton_wna16  # noqa: E402,F401  (registers the triton backend of these ops)
from . import _cuda_quant  # noqa: E402,F401  (registers the cuda decode backend of the quantized fused MoE ops)
