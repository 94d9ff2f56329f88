"""The ``triton`` backend of the weight-only quantized ops (``wna16_grouped_gemm``, ``wna16_fused_moe``), as
``triton_op``s: int8 / int4 / mxfp4 weight tiles are dequantized in the GEMM main loop (``triton_kernels.wna16_gemm``).
Inference-only, as the reference ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _alloc, _backends
from ._quant_ops import inference_only

try:
    from torch.library import triton_op, wrap_triton

    from .triton_kernels import permute as _permute
    from .triton_kernels._launch import Launcher
    from .triton_kernels import plan as _plan
    from .triton_kernels import wna16_gemm as _wq
except Exception:  # triton missing or broken: the triton backend reports why
    _wq = None


def _empty(shape, dtype, device):
    return _alloc.empty(*shape, dtype=dtype, device=device)


if _wq is not None:
    _LAUNCH = Launcher(wrap_triton)  # the one launch path (device guard, recorder hooks)

    @triton_op("moe_kernels::wna16_grouped_gemm_triton", mutates_args=())
    def wna16_grouped_gemm_triton(
        x: Tensor, w_data: Tensor, w_scale: Tensor, w_zero: Optional[Tensor], fmt: str, group_size: int,
        expert_offsets: Tensor, bias: Optional[Tensor], sorted_slots: Optional[Tensor],
    ) -> Tensor:
        return _wq.wna16_grouped_gemm(x, w_data, w_scale, w_zero, fmt, group_size, expert_offsets, bias, sorted_slots,
                                      launch=_LAUNCH, empty=_empty)

    @triton_op("moe_kernels::wna16_fused_moe_triton", mutates_args=())
    def wna16_fused_moe_triton(
        hidden: Tensor, w13_data: Tensor, w13_scale: Tensor, w13_zero: Optional[Tensor], w2_data: Tensor,
        w2_scale: Tensor, w2_zero: Optional[Tensor], fmt: str, w13_group: int, w2_group: int, topk_weights: Tensor,
        topk_ids: Tensor, activation: str, gated: bool, w13_bias: Optional[Tensor], w2_bias: Optional[Tensor],
        apply_router_weight_on_input: bool, capacity: Optional[int], expert_map: Optional[Tensor],
    ) -> Tensor:
        """plan -> GEMM1 (gather, dequantize in the loop, bias, activation) -> GEMM2 (routing weights, scatter to
        slots) -> sum over the k slots."""
        return wna16_fused_moe_impl(hidden, w13_data, w13_scale, w13_zero, w2_data, w2_scale, w2_zero, fmt, w13_group,
                                    w2_group, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                                    apply_router_weight_on_input, capacity, expert_map, launch=_LAUNCH,
                                    empty=_empty)

    def wna16_fused_moe_impl(hidden, w13_data, w13_scale, w13_zero, w2_data, w2_scale, w2_zero, fmt, w13_group,
                             w2_group, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias, on_input, capacity,
                             expert_map, *, launch, empty):
        kw = dict(launch=launch, empty=empty)
        k = topk_ids.shape[1]
        slots, offsets, _, slot_to_row = _plan.plan_routing(topk_ids, w13_data.shape[0], 1, capacity, expert_map, **kw)
        w_flat = topk_weights.reshape(-1).float().contiguous()
        if on_input:  # the routed rows scaled by their weight are the first GEMM's input
            xs = _permute.permute(hidden, slots, slot_to_row, k, topk_weights, **kw)  # [P, H]
            h = _wq.wna16_grouped_gemm(xs, w13_data, w13_scale, w13_zero, fmt, w13_group, offsets, w13_bias, slots,
                                       activation=activation, gated=gated, **kw)
        else:
            h = _wq.wna16_grouped_gemm(hidden, w13_data, w13_scale, w13_zero, fmt, w13_group, offsets, w13_bias, slots,
                                       gather_top_k=k, activation=activation, gated=gated, **kw)  # [P, I]
        y_slots = _wq.wna16_grouped_gemm(h, w2_data, w2_scale, w2_zero, fmt, w2_group, offsets, w2_bias, slots,
                                         row_weights=None if on_input else w_flat, scatter_slots=slot_to_row.shape[0],
                                         **kw)  # [T*k, H], token order
        kept = torch.where(slot_to_row >= 0, torch.arange(slot_to_row.shape[0], device=hidden.device), -1)
        return _permute.unpermute(y_slots, slots, kept.to(torch.int32), k, None, **kw)

    _bwd, _setup = inference_only("grouped_gemm", "w")
    wna16_grouped_gemm_triton.register_autograd(_bwd, setup_context=_setup)
    _bwd, _setup = inference_only("fused_moe", "w13 / w2")
    wna16_fused_moe_triton.register_autograd(_bwd, setup_context=_setup)

    def _moe_supports(hidden, w13_data, w13_scale, w13_zero, w2_data, w2_scale, w2_zero, fmt, g13, g2, *args, **kw):
        why = _wq.supports(hidden, w13_data, w13_scale, w13_zero, fmt, g13) or _wq.supports(hidden, w2_data, w2_scale,
                                                                                            w2_zero, fmt, g2)
        if why is None and w13_data.shape[0] > 2047:
            why = f"the triton plan kernel serves E <= 2047, got {w13_data.shape[0]}"
        return why

    _backends.register("wna16_grouped_gemm", "triton", _wq.supports)(
        torch.ops.moe_kernels.wna16_grouped_gemm_triton.default)
    _backends.register("wna16_fused_moe", "triton", _moe_supports)(torch.ops.moe_kernels.wna16_fused_moe_triton.default)
