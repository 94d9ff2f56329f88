"""The ``triton`` backend of the FP8 ops (``fp8_grouped_gemm``, ``fp8_fused_moe``), as ``triton_op``s.

On GPUs with fp8 tensor cores (sm_89+) both GEMMs run fp8 x fp8 ``tl.dot`` with fp32 accumulation (wgmma on
sm_90a); on sm_80/sm_86 the same kernel dequantizes weight tiles to bf16 in registers (weight-only, w8a16;
the op's ``act_mode`` is then ``none``). Inference-only, as the reference ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _alloc, _backends
from ._quant_ops import inference_only

try:
    from torch.library import triton_op, wrap_triton

    from .triton_kernels import fp8_gemm as _fp8
    from .triton_kernels._launch import Launcher
    from .triton_kernels import permute as _permute
    from .triton_kernels import plan as _plan
except Exception:  # triton missing or broken: the triton backend reports why
    _fp8 = None


def _empty(shape, dtype, device):
    return _alloc.empty(*shape, dtype=dtype, device=device)


if _fp8 is not None:
    _LAUNCH = Launcher(wrap_triton)  # the one launch path (device guard, recorder hooks)

    @triton_op("moe_kernels::fp8_grouped_gemm_triton", mutates_args=())
    def fp8_grouped_gemm_triton(
        x: Tensor, w_data: Tensor, w_scale: Tensor, block_n: int, block_k: int, expert_offsets: Tensor,
        bias: Optional[Tensor], sorted_slots: Optional[Tensor], act_mode: str, act_scale: Optional[Tensor],
    ) -> Tensor:
        return _fp8.fp8_grouped_gemm(x, w_data, w_scale, block_n, block_k, expert_offsets, bias, sorted_slots, act_mode,
                                     act_scale, launch=_LAUNCH, empty=_empty)[0]

    @triton_op("moe_kernels::fp8_fused_moe_triton", mutates_args=())
    def fp8_fused_moe_triton(
        hidden: Tensor, w13_data: Tensor, w13_scale: Tensor, w13_bn: int, w13_bk: int, w2_data: Tensor,
        w2_scale: Tensor, w2_bn: int, w2_bk: int, topk_weights: Tensor, topk_ids: Tensor, activation: str, gated: bool,
        w13_bias: Optional[Tensor], w2_bias: Optional[Tensor], apply_router_weight_on_input: bool,
        capacity: Optional[int], expert_map: Optional[Tensor], act_mode13: str, a13_scale: Optional[Tensor],
        act_mode2: str, a2_scale: Optional[Tensor],
    ) -> Tensor:
        """plan -> GEMM1 (gather, quantize on load, activation; the next GEMM's per-token/per-tensor scales in
        its epilogue) -> GEMM2 (quantize on load, routing weights, scatter to slots) -> sum over the k slots."""
        return fp8_fused_moe_impl(hidden, w13_data, w13_scale, w13_bn, w13_bk, w2_data, w2_scale, w2_bn, w2_bk,
                                  topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                                  apply_router_weight_on_input, capacity, expert_map, act_mode13, a13_scale, act_mode2,
                                  a2_scale, launch=_LAUNCH, empty=_empty)

    def fp8_fused_moe_impl(hidden, w13_data, w13_scale, w13_bn, w13_bk, w2_data, w2_scale, w2_bn, w2_bk, topk_weights,
                           topk_ids, activation, gated, w13_bias, w2_bias, on_input, capacity, expert_map, act_mode13,
                           a13_scale, act_mode2, a2_scale, *, launch, empty):
        kw = dict(launch=launch, empty=empty)
        k = topk_ids.shape[1]
        slots, offsets, _, slot_to_row = _plan.plan_routing(topk_ids, w13_data.shape[0], 1, capacity, expert_map, **kw)
        w_flat = topk_weights.reshape(-1).float().contiguous()
        inter = w2_data.shape[2]
        mode2 = "token" if act_mode2 == "group" and w2_bk >= inter else act_mode2
        out_amax = mode2 if mode2 in ("token", "tensor") else ""
        if on_input:  # the routed rows scaled by their weight are the first GEMM's input (and its scale's)
            xs = _permute.permute(hidden, slots, slot_to_row, k, topk_weights, **kw)  # [P, H]
            h, a2 = _fp8.fp8_grouped_gemm(xs, w13_data, w13_scale, w13_bn, w13_bk, offsets, w13_bias, slots, act_mode13,
                                          a13_scale, activation=activation, gated=gated, out_amax=out_amax, **kw)
        else:
            h, a2 = _fp8.fp8_grouped_gemm(hidden, w13_data, w13_scale, w13_bn, w13_bk, offsets, w13_bias, slots,
                                          act_mode13, a13_scale, gather_top_k=k, activation=activation, gated=gated,
                                          out_amax=out_amax, **kw)  # [P, I]
        y_slots, _ = _fp8.fp8_grouped_gemm(h, w2_data, w2_scale, w2_bn, w2_bk, offsets, w2_bias, slots, mode2,
                                           a2_scale if a2_scale is not None else a2,
                                           row_weights=None if on_input else w_flat,
                                           scatter_slots=slot_to_row.shape[0], **kw)  # [T*k, H], token order
        kept = torch.where(slot_to_row >= 0, torch.arange(slot_to_row.shape[0], device=hidden.device), -1)
        return _permute.unpermute(y_slots, slots, kept.to(torch.int32), k, None, **kw)

    _bwd, _setup = inference_only("grouped_gemm", "w")
    fp8_grouped_gemm_triton.register_autograd(_bwd, setup_context=_setup)
    _bwd, _setup = inference_only("fused_moe", "w13 / w2")
    fp8_fused_moe_triton.register_autograd(_bwd, setup_context=_setup)

    def _moe_supports(hidden, w13_data, w13_scale, w13_bn, w13_bk, w2_data, w2_scale, w2_bn, w2_bk, *args, **kwargs):
        why = _fp8.supports(hidden, w13_data, w13_scale, w13_bn, w13_bk) or _fp8.supports(hidden, w2_data, w2_scale,
                                                                                            w2_bn, w2_bk)
        if why is None and w13_data.shape[0] > 2047:
            why = f"the triton plan kernel serves E <= 2047, got {w13_data.shape[0]}"
        return why

    _backends.register("fp8_grouped_gemm", "triton", _fp8.supports)(
        torch.ops.moe_kernels.fp8_grouped_gemm_triton.default)
    _backends.register("fp8_fused_moe", "triton", _moe_supports)(torch.ops.moe_kernels.fp8_fused_moe_triton.default)
