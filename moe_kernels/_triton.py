"""The ``triton`` backend: Triton kernels registered with ``torch.library.triton_op``.

``triton_op`` + ``wrap_triton`` let torch.compile see inside the ops. On CPU tensors (the
interpreter, ``TRITON_INTERPRET=1``) the ops run eagerly; torch.compile and opcheck of these ops
need a GPU (FakeTensor cannot trace an interpreted launch).
Importing this module is a no-op when triton cannot be imported.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _alloc, _backends
from . import reference as ref
from . import ops
from .ops import gating_autograd

try:
    from torch.library import triton_op, wrap_triton

    from .triton_kernels import expert_choice as _expert_choice
    from .triton_kernels import gating as _gating
    from .triton_kernels import grouped_gemm as _gg
    from .triton_kernels import permute as _permute
    from .triton_kernels import plan as _plan
    from .triton_kernels._launch import Launcher

    _LAUNCH = Launcher(wrap_triton)  # every launch below goes through the one launch path
    IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: the backend reports why
    _gating = None
    IMPORT_ERROR = f"{exc.__class__.__name__}: {exc}"


def _empty(shape, dtype, device):
    return _alloc.empty(*shape, dtype=dtype, device=device)


def _no_fp64(tensor: torch.Tensor, *args, **kwargs) -> Optional[str]:
    """Refuse float64: the Triton kernels compute in fp32, the float64 reference is the torch backend."""
    if tensor.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    return None


if _gating is not None:

    @triton_op("moe_kernels::topk_gating_triton", mutates_args=())
    def topk_gating_triton(
        logits: Tensor, correction_bias: Optional[Tensor], top_k: int, scoring: str, renormalize: bool,
        num_groups: int, topk_groups: int, scaling_factor: float, with_stats: bool, group_n: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _gating.topk_gating(logits, correction_bias, top_k, scoring, renormalize, num_groups, topk_groups,
                                   scaling_factor, with_stats, group_n, launch=_LAUNCH, empty=_empty)

    @triton_op("moe_kernels::topk_gating_backward_triton", mutates_args=())
    def topk_gating_backward_triton(
        grad_weights: Tensor, grad_score_sums: Optional[Tensor], logits: Tensor, topk_ids: Tensor, scoring: str,
        renormalize: bool, scaling_factor: float,
    ) -> Tensor:
        return _gating.topk_gating_backward(grad_weights, grad_score_sums, logits, topk_ids, scoring, renormalize,
                                            scaling_factor, launch=_LAUNCH, empty=_empty)

    _bwd, _setup = gating_autograd(topk_gating_backward_triton)
    topk_gating_triton.register_autograd(_bwd, setup_context=_setup)
    _backends.register("topk_gating", "triton", _no_fp64)(torch.ops.moe_kernels.topk_gating_triton.default)

    @triton_op("moe_kernels::expert_choice_gating_triton", mutates_args=())
    def expert_choice_gating_triton(logits: Tensor, capacity: int, scoring: str) -> Tuple[Tensor, Tensor]:
        return _expert_choice.expert_choice_gating(logits, capacity, scoring, launch=_LAUNCH, empty=_empty)

    # The backward is a scatter and a softmax backward: the reference op serves it on every device.
    _bwd, _setup = ops.expert_choice_autograd(ops.expert_choice_backward)
    expert_choice_gating_triton.register_autograd(_bwd, setup_context=_setup)
    _backends.register("expert_choice_gating", "triton", _expert_choice.supports)(
        torch.ops.moe_kernels.expert_choice_gating_triton.default)

    @triton_op("moe_kernels::permute_triton", mutates_args=())
    def permute_triton(x: Tensor, sorted_slots: Tensor, slot_to_row: Tensor, top_k: int,
                       row_weights: Optional[Tensor]) -> Tensor:
        return _permute.permute(x, sorted_slots, slot_to_row, top_k, row_weights, launch=_LAUNCH, empty=_empty)

    @triton_op("moe_kernels::unpermute_triton", mutates_args=())
    def unpermute_triton(y_sorted: Tensor, sorted_slots: Tensor, slot_to_row: Tensor, top_k: int,
                         topk_weights: Optional[Tensor]) -> Tensor:
        return _permute.unpermute(y_sorted, sorted_slots, slot_to_row, top_k, topk_weights, launch=_LAUNCH,
                                  empty=_empty)

    @triton_op("moe_kernels::slot_dots_triton", mutates_args=())
    def slot_dots_triton(rows: Tensor, slot_to_row: Tensor, per_token: Tensor, top_k: int) -> Tensor:
        return _permute.slot_dots(rows, slot_to_row, per_token, top_k, launch=_LAUNCH, empty=_empty)

    _pbwd, _ubwd, _setup = ops.route_autograd(permute_triton, unpermute_triton, slot_dots_triton)
    permute_triton.register_autograd(_pbwd, setup_context=_setup)
    unpermute_triton.register_autograd(_ubwd, setup_context=_setup)
    _backends.register("permute", "triton", _no_fp64)(torch.ops.moe_kernels.permute_triton.default)
    _backends.register("unpermute", "triton", _no_fp64)(torch.ops.moe_kernels.unpermute_triton.default)

    @triton_op("moe_kernels::plan_routing_triton", mutates_args=())
    def plan_routing_triton(topk_ids: Tensor, num_experts: int, block_size: int, capacity: Optional[int],
                            expert_map: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _plan.plan_routing(topk_ids, num_experts, block_size, capacity, expert_map, launch=_LAUNCH, empty=_empty)

    def _plan_supports(topk_ids, num_experts, *args, **kwargs):
        if num_experts > 2047:
            return f"the triton plan kernel serves E <= 2047, got {num_experts}"
        return None

    _backends.register("plan_routing", "triton", _plan_supports)(torch.ops.moe_kernels.plan_routing_triton.default)

    @triton_op("moe_kernels::capacity_drop_triton", mutates_args=())
    def capacity_drop_triton(topk_ids: Tensor, num_experts: int, capacity: int, drop_policy: str,
                             topk_weights: Optional[Tensor], expert_map: Optional[Tensor]) -> Tensor:
        return _plan.capacity_drop(topk_ids, num_experts, capacity, drop_policy, topk_weights, expert_map,
                                   launch=wrap_triton, empty=_empty)

    _backends.register("capacity_drop", "triton", _plan_supports)(torch.ops.moe_kernels.capacity_drop_triton.default)

    @triton_op("moe_kernels::grouped_gemm_triton", mutates_args=())
    def grouped_gemm_triton(x: Tensor, w: Tensor, expert_offsets: Tensor, bias: Optional[Tensor],
                            sorted_slots: Optional[Tensor], trans_w: bool) -> Tensor:
        return _gg.grouped_gemm(x, w, expert_offsets, bias, sorted_slots, trans_w, launch=_LAUNCH, empty=_empty)

    @triton_op("moe_kernels::grouped_gemm_wgrad_triton", mutates_args=())
    def grouped_gemm_wgrad_triton(a: Tensor, b: Tensor, expert_offsets: Tensor, sorted_slots: Optional[Tensor]) -> Tensor:
        return _gg.grouped_wgrad(a, b, expert_offsets, sorted_slots, launch=_LAUNCH, empty=_empty)

    def _segment_sum(y: Tensor, expert_offsets: Tensor, sorted_slots: Optional[Tensor]) -> Tensor:
        """Per-expert row sums as a wgrad against a column of ones: deterministic, no atomics."""
        ones = torch.ones(y.shape[0], 1, dtype=y.dtype, device=y.device)
        return grouped_gemm_wgrad_triton(ones, y, expert_offsets, sorted_slots)[:, 0, :]

    _bwd, _setup = ops.gemm_autograd(grouped_gemm_triton, grouped_gemm_wgrad_triton, _segment_sum)
    grouped_gemm_triton.register_autograd(_bwd, setup_context=_setup)

    def _gemm_supports(x, w, *args, **kwargs):
        return _no_fp64(x)

    _backends.register("grouped_gemm", "triton", _gemm_supports)(torch.ops.moe_kernels.grouped_gemm_triton.default)
    _bwd, _setup = ops.wgrad_autograd(grouped_gemm_triton)
    grouped_gemm_wgrad_triton.register_autograd(_bwd, setup_context=_setup)
    _backends.register("grouped_gemm_wgrad", "triton", _gemm_supports)(
        torch.ops.moe_kernels.grouped_gemm_wgrad_triton.default)

    def _moe_plan(topk_ids, num_experts, capacity, expert_map, kw):
        return _plan.plan_routing(topk_ids, num_experts, 1, capacity, expert_map, **kw)

    @triton_op("moe_kernels::fused_moe_triton", mutates_args=())
    def fused_moe_triton(
        hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, activation: str, gated: bool,
        w13_bias: Optional[Tensor], w2_bias: Optional[Tensor], apply_router_weight_on_input: bool,
        capacity: Optional[int], expert_map: Optional[Tensor], gate_up_interleaved: bool = False,
    ) -> Tensor:
        """plan -> GEMM1 (gather, activation) -> GEMM2 (weights, scatter to slots) -> sum over the k slots.
        Neither a permuted copy of ``hidden`` nor the pre-activation is written."""
        kw = dict(launch=_LAUNCH, empty=_empty)
        k, on_input = topk_ids.shape[1], apply_router_weight_on_input
        slots, offsets, _, slot_to_row = _moe_plan(topk_ids, w13.shape[0], capacity, expert_map, kw)
        w_flat = topk_weights.reshape(-1).float().contiguous()
        h = _gg.grouped_gemm(hidden, w13, offsets, w13_bias, slots, True, gather_top_k=k, activation=activation,
                             gated=gated, interleaved=gate_up_interleaved, row_weights=w_flat if on_input else None,
                             scale_input=True, **kw)  # [P, I]
        y_slots = _gg.grouped_gemm(h, w2, offsets, w2_bias, slots, True, row_weights=None if on_input else w_flat,
                                   scatter_slots=slot_to_row.shape[0], **kw)  # [T*k, H], token order
        kept = torch.where(slot_to_row >= 0, torch.arange(slot_to_row.shape[0], device=hidden.device), -1)
        return _permute.unpermute(y_slots, slots, kept.to(torch.int32), k, None, **kw)

    @triton_op("moe_kernels::fused_moe_backward_triton", mutates_args=())
    def fused_moe_backward_triton(
        grad_out: Tensor, hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
        activation: str, gated: bool, w13_bias: Optional[Tensor], w2_bias: Optional[Tensor],
        apply_router_weight_on_input: bool, capacity: Optional[int], expert_map: Optional[Tensor],
        gate_up_interleaved: bool = False,
    ) -> List[Tensor]:
        """Gradients ``(hidden, w13, w2, topk_weights, w13_bias, w2_bias)``; the first GEMM and the
        activation are recomputed (only the inputs are kept from forward)."""
        kw = dict(launch=_LAUNCH, empty=_empty)
        k, on_input = topk_ids.shape[1], apply_router_weight_on_input
        slots, offsets, _, slot_to_row = _moe_plan(topk_ids, w13.shape[0], capacity, expert_map, kw)
        w_in = topk_weights if on_input else None
        w_out = None if on_input else topk_weights
        xs = _permute.permute(hidden, slots, slot_to_row, k, w_in, **kw)  # [P, H]
        h = _gg.grouped_gemm(xs, w13, offsets, w13_bias, slots, True, **kw)  # [P, 2I] pre-activation
        a = ref.activation(h, activation, gated, gate_up_interleaved)  # [P, I]
        g_ys = _permute.permute(grad_out, slots, slot_to_row, k, w_out, **kw)  # [P, H]
        g_a = _gg.grouped_gemm(g_ys, w2, offsets, None, slots, False, **kw)  # [P, I]
        g_h = ref.activation_backward(g_a, h, activation, gated, gate_up_interleaved)  # [P, 2I]
        g_xs = _gg.grouped_gemm(g_h, w13, offsets, None, slots, False, **kw)  # [P, H]
        g_hidden = _permute.unpermute(g_xs, slots, slot_to_row, k, w_in, **kw)
        if on_input:
            g_w = _permute.slot_dots(g_xs, slot_to_row, hidden, k, **kw)
        else:
            ys = _gg.grouped_gemm(a, w2, offsets, w2_bias, slots, True, **kw)  # [P, H]
            g_w = _permute.slot_dots(ys, slot_to_row, grad_out, k, **kw)
        g_w13 = _gg.grouped_wgrad(g_h, xs, offsets, **kw)
        g_w2 = _gg.grouped_wgrad(g_ys, a, offsets, **kw)
        ones = torch.ones(slots.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        g_b13 = _gg.grouped_wgrad(ones, g_h, offsets, **kw)[:, 0, :] if w13_bias is not None else hidden.new_empty(0)
        g_b2 = _gg.grouped_wgrad(ones, g_ys, offsets, **kw)[:, 0, :] if w2_bias is not None else hidden.new_empty(0)
        return [g_hidden, g_w13, g_w2, g_w.to(topk_weights.dtype), g_b13, g_b2]

    _bwd, _setup = ops.moe_autograd(fused_moe_backward_triton)
    fused_moe_triton.register_autograd(_bwd, setup_context=_setup)

    def _moe_supports(hidden, w13, *args, **kwargs):
        return _no_fp64(hidden) or (f"the triton plan kernel serves E <= 2047, got {w13.shape[0]}" if w13.shape[0] > 2047 else None)

    _backends.register("fused_moe", "triton", _moe_supports)(torch.ops.moe_kernels.fused_moe_triton.default)

    from . import lora as _lora
    from .triton_kernels import lora as _lora_kernels

    @triton_op("moe_kernels::lora_moe_triton", mutates_args=())
    def lora_moe_triton(x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                        topk_weights: Tensor, topk_ids: Tensor, scaling: float) -> Tensor:
        """Shrink (gather through the plan) -> expand (weighted, scattered to slots) -> fixed-order sum into x @ W0.T."""
        return _lora_kernels.lora_moe(x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling,
                                      launch=_LAUNCH, empty=_empty)

    @triton_op("moe_kernels::lora_moe_backward_triton", mutates_args=())
    def lora_moe_backward_triton(grad: Tensor, x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor], lora_a: Tensor,
                                 lora_b: Tensor, topk_weights: Tensor, topk_ids: Tensor, scaling: float,
                                 needs: List[bool]) -> List[Tensor]:
        return _lora_kernels.lora_moe_backward(grad, x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids,
                                               scaling, needs, launch=_LAUNCH, empty=_empty)

    _bwd, _setup = _lora.lora_autograd(lora_moe_backward_triton)
    lora_moe_triton.register_autograd(_bwd, setup_context=_setup)
    _backends.register("lora_moe", "triton", _lora_kernels.supports)(torch.ops.moe_kernels.lora_moe_triton.default)
