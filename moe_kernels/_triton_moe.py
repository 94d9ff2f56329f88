"""The ``triton`` backend's fused MoE: forward, training backward and their autograd.

Forward (4 + plan launches: plan hist/scan/rank with the tile schedule, GEMM1, GEMM2, combine):
plan -> GEMM1 (gather ``hidden`` through the plan, activation; optionally keep the pre-activation)
-> GEMM2 (routing weights, scatter to slot order) -> fixed-order sum over each token's k slots.

Backward (no torch op on ``[P, *]`` tensors; ``F1`` = FLOPs of GEMM1):

====================== ===================================================== =========
launch                 computes                                               FLOPs
====================== ===================================================== =========
plan (3)               plan and tile schedule again (int32, tiny)
GEMM1 (recompute)      ``h = x . W13^T + b13`` (skipped with a saved h)        1.0 F1
dA                     ``dY . W2`` -> epilogue: ``dH = act'(h)``, ``act(h)``,   0.5 F1
                       d(routing weight) partial ``<act(h), dY . W2>``
dX                     ``dH . W13``, scaled by the input weight, to slot order  1.0 F1
combine                ``dx[t] = sum_j``; d(routing weights) = sum of partials
dW13 (+ db13)          ``dH_e^T . x_e``, x rows gathered through the plan       1.0 F1
dW2 (+ db2)            ``(w dY)_e^T . act(h)_e``, dY rows gathered              0.5 F1
====================== ===================================================== =========

4.0 F1 with the recompute (only the inputs kept), 3.0 F1 with ``save_preactivation`` (h kept,
``[T*k, 2I]``). Deterministic: every sum in a fixed order, no atomics.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import _alloc, _backends
from .triton_kernels import combine as _combine
from .triton_kernels import grouped_gemm as _gg
from .triton_kernels import plan as _plan
from .triton_kernels._launch import Launcher
from .triton_kernels.tiles import fused_block_m


def _empty(shape, dtype, device):
    return _alloc.empty(*shape, dtype=dtype, device=device)


_KW = dict(launch=Launcher(wrap_triton), empty=_empty)  # the one launch path


def _plan_and_schedule(hidden, w13, topk_ids, gated, capacity, expert_map):
    """The plan and the tile schedule shared by every GEMM of the layer (one row tile for all)."""
    T, H = hidden.shape
    inter = w13.shape[1] // 2 if gated else w13.shape[1]
    bm = fused_block_m(T * topk_ids.shape[1], w13.shape[0], hidden.dtype, hidden.device, inter, H)
    return _plan.plan_schedule(topk_ids, w13.shape[0], 1, capacity, expert_map, bm, **_KW)


@triton_op("moe_kernels::fused_moe_triton", mutates_args=())
def fused_moe_triton(
    hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, activation: str, gated: bool,
    w13_bias: Optional[Tensor], w2_bias: Optional[Tensor], apply_router_weight_on_input: bool,
    capacity: Optional[int], expert_map: Optional[Tensor], gate_up_interleaved: bool, save_preactivation: bool,
) -> Tuple[Tensor, Tensor]:
    """``(out [T, H], pre)``: ``pre`` is the pre-activation ``[T*k, 2I]`` (expert order) with
    ``save_preactivation`` (columns in w13's row order: gate then up, or interleaved), else empty. Neither a permuted copy of ``hidden`` nor (by default) the
    pre-activation is written."""
    k, on_input = topk_ids.shape[1], apply_router_weight_on_input
    slots, offsets, _, slot_to_row, sched = _plan_and_schedule(hidden, w13, topk_ids, gated, capacity, expert_map)
    w_flat = topk_weights.reshape(-1).float().contiguous()
    h = _gg.grouped_gemm(hidden, w13, offsets, w13_bias, slots, True, gather_top_k=k, activation=activation,
                         gated=gated, interleaved=gate_up_interleaved, row_weights=w_flat if on_input else None,
                         scale_input=True, schedule=sched, store_pre=save_preactivation, **_KW)  # [P, I] (and [P, 2I] pre-activation)
    a, pre = h if save_preactivation else (h, hidden.new_empty(0))
    y_slots = _gg.grouped_gemm(a, w2, offsets, w2_bias, slots, True, row_weights=None if on_input else w_flat,
                               scatter_slots=slot_to_row.shape[0], schedule=sched, **_KW)  # [T*k, H], slot order
    return _combine.combine(y_slots, slot_to_row, k, **_KW), pre


@triton_op("moe_kernels::fused_moe_backward_triton", mutates_args=())
def fused_moe_backward_triton(
    grad_out: Tensor, hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
    activation: str, gated: bool, w13_bias: Optional[Tensor], w2_bias: Optional[Tensor],
    apply_router_weight_on_input: bool, capacity: Optional[int], expert_map: Optional[Tensor],
    gate_up_interleaved: bool, preactivation: Optional[Tensor],
) -> List[Tensor]:
    """Gradients ``(hidden, w13, w2, topk_weights, w13_bias, w2_bias)`` (empty where there is no bias);
    GEMM1 is recomputed unless ``preactivation`` (the forward's ``pre``) is given."""
    k, on_input = topk_ids.shape[1], apply_router_weight_on_input
    T, S = hidden.shape[0], topk_ids.shape[0] * topk_ids.shape[1]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    slots, offsets, _, slot_to_row, sched = _plan_and_schedule(hidden, w13, topk_ids, gated, capacity, expert_map)
    w_flat = topk_weights.reshape(-1).float().contiguous()
    h = preactivation
    if h is None:  # recompute the pre-activation: GEMM1 without the activation epilogue
        h = _gg.grouped_gemm(hidden, w13, offsets, w13_bias, slots, True, gather_top_k=k,
                             row_weights=w_flat if on_input else None, scale_input=True, schedule=sched, **_KW)
    # dA = (w dY) . W2 -> dH [P, 2I], act(h) [P, I], d(routing weight) partials (weight after the experts)
    dh, a, *parts = _gg.grouped_gemm(
        grad_out, w2, offsets, None, slots, False, gather_top_k=k, activation=activation, gated=gated,
        interleaved=gate_up_interleaved, row_weights=None if on_input else w_flat, schedule=sched, act_grad_of=h, row_dots=not on_input,
        bias_dot=w2_bias if not on_input else None, **_KW)
    # dX rows = dH . W13, scaled by the input weight, scattered to slot order (partials: weight on the input)
    dx = _gg.grouped_gemm(
        dh, w13, offsets, None, slots, False, slot_top_k=k, row_weights=w_flat if on_input else None,
        scatter_slots=S, schedule=sched, row_dots=on_input, dot_tokens=hidden if on_input else None, **_KW)
    g_slots, parts = dx if on_input else (dx, parts[0])
    g_hidden, g_w = _combine.combine(g_slots, slot_to_row, k, parts, **_KW)
    wg = dict(gather_top_k=k, row_weights=w_flat, **_KW)
    g_w13 = _gg.grouped_wgrad(dh, hidden, offsets, slots, gather_b=True, scale_b=on_input,
                              bias_a=w13_bias is not None, **wg)
    g_w2 = _gg.grouped_wgrad(grad_out, a, offsets, slots, gather_a=True, scale_a=not on_input,
                             bias_a=w2_bias is not None, **wg)
    g_w13, g_b13 = g_w13 if w13_bias is not None else (g_w13, hidden.new_empty(0))
    g_w2, g_b2 = g_w2 if w2_bias is not None else (g_w2, hidden.new_empty(0))
    return [g_hidden, g_w13, g_w2, g_w.view(T, k).to(topk_weights.dtype), g_b13, g_b2]


def _setup(ctx, inputs, output):
    hidden, w13, w2, topk_weights, topk_ids, act, gated, b13, b2, on_input, capacity, expert_map, inter, save = inputs
    ctx.save_for_backward(hidden, w13, w2, topk_weights, topk_ids, b13, b2, expert_map, output[1] if save else None)
    ctx.cfg = (act, gated, on_input, capacity, inter)
    ctx.set_materialize_grads(False)  # no zeros for the unused gradient of ``pre``


def _backward(ctx, grad, _grad_pre):
    hidden, w13, w2, topk_weights, topk_ids, b13, b2, expert_map, pre = ctx.saved_tensors
    act, gated, on_input, capacity, inter = ctx.cfg
    if grad is None:
        return (None,) * 14
    g = fused_moe_backward_triton(grad, hidden, w13, w2, topk_weights, topk_ids, act, gated, b13, b2, on_input,
                                  capacity, expert_map, inter, pre)
    need = ctx.needs_input_grad
    return (g[0] if need[0] else None, g[1] if need[1] else None, g[2] if need[2] else None,
            g[3] if need[3] else None, None, None, None, g[4] if b13 is not None and need[7] else None,
            g[5] if b2 is not None and need[8] else None, None, None, None, None, None)


fused_moe_triton.register_autograd(_backward, setup_context=_setup)
_FWD = torch.ops.moe_kernels.fused_moe_triton.default


def _supports(hidden, w13, *args, **kwargs):
    if hidden.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if w13.shape[0] > 2047:
        return f"the triton plan kernel serves E <= 2047, got {w13.shape[0]}"
    return None


@_backends.register("fused_moe", "triton", _supports)
def fused_moe(*args):
    """The op's 12 arguments, then optionally ``gate_up_interleaved`` (as every backend takes it)."""
    return _FWD(*args[:12], bool(args[12]) if len(args) > 12 else False, False)[0]


@_backends.register("fused_moe_saved", "triton", _supports)
def fused_moe_saved(*args):
    """fused_moe keeping the pre-activation for the backward (``save_preactivation=True``)."""
    return _FWD(*args[:12], bool(args[12]) if len(args) > 12 else False, True)[0]
