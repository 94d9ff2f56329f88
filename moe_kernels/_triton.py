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

    from . import _triton_moe  # noqa: F401  (the fused MoE ops register themselves)

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
