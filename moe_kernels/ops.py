"""torch.library registration of the reference (``torch`` backend) ops, namespace ``moe_kernels``.

Each op has a schema (inferred from the annotations), a fake implementation for torch.compile, and,
where it is differentiable, an autograd formula written with other ops of this file: the backward of
``permute`` is ``unpermute`` and the other way round, the backward of ``grouped_gemm`` is
``grouped_gemm`` with the weight transposed plus ``grouped_gemm_wgrad``.

The public functions (``moe_kernels.topk_gating``, ...) check arguments and call these; call the ops
directly (``torch.ops.moe_kernels.<name>``) only with checked inputs.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op

from . import reference as ref

# ----- gating ---------------------------------------------------------------------------------------


@custom_op("moe_kernels::topk_gating", mutates_args=())
def topk_gating(
    logits: Tensor, correction_bias: Optional[Tensor], top_k: int, scoring: str, renormalize: bool,
    num_groups: int, topk_groups: int, scaling_factor: float, with_stats: bool, group_n: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    w, ids = ref.topk_gating(logits, top_k, scoring, renormalize, correction_bias, num_groups, topk_groups, scaling_factor,
                             group_n)
    counts, sums = ref.gating_stats(logits, ids, scoring) if with_stats else (ids.new_empty(0), w.new_empty(0))
    return w, ids, counts, sums


def gating_fake(logits, correction_bias, top_k, scoring, renormalize, num_groups, topk_groups, scaling_factor, with_stats,
                group_n):
    T, E = logits.shape
    n = E if with_stats else 0
    f = ref.acc_dtype(logits.dtype)
    return (logits.new_empty(T, top_k, dtype=f), logits.new_empty(T, top_k, dtype=torch.int32),
            logits.new_empty(n, dtype=torch.int32), logits.new_empty(n, dtype=f))


topk_gating.register_fake(gating_fake)


@custom_op("moe_kernels::topk_gating_backward", mutates_args=())
def topk_gating_backward(
    grad_weights: Tensor, grad_score_sums: Optional[Tensor], logits: Tensor, topk_ids: Tensor, scoring: str,
    renormalize: bool, scaling_factor: float,
) -> Tensor:
    return ref.topk_gating_backward(grad_weights, logits, topk_ids, scoring, renormalize, scaling_factor, grad_score_sums)


@topk_gating_backward.register_fake
def _(grad_weights, grad_score_sums, logits, topk_ids, scoring, renormalize, scaling_factor):
    return torch.empty_like(logits)


def gating_autograd(backward_op):
    """``(backward, setup_context)`` of a topk_gating op whose logits gradient ``backward_op`` computes;
    shared by every backend. The op's inputs start ``(logits, bias, top_k, scoring, renormalize,
    num_groups, topk_groups, scaling_factor)``; its outputs are ``(weights, ids)``, optionally followed
    by ``(counts, score_sums)``. Gradients reach the logits through the weights and the score sums."""

    def setup_context(ctx, inputs, output):
        logits, _, _, scoring, renormalize, _, _, scaling = inputs[:8]
        ctx.save_for_backward(logits, output[1])
        ctx.cfg = (scoring, renormalize, scaling)
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_weights, _grad_ids, *grad_stats):
        logits, ids = ctx.saved_tensors
        grad_sums = grad_stats[1] if len(grad_stats) == 2 else None
        if grad_sums is not None and grad_sums.numel() == 0:
            grad_sums = None
        grad = None
        if ctx.needs_input_grad[0] and (grad_weights is not None or grad_sums is not None):
            if grad_weights is None:
                grad_weights = torch.zeros(ids.shape, dtype=ref.acc_dtype(logits.dtype), device=logits.device)
            grad = backward_op(grad_weights, grad_sums, logits, ids, *ctx.cfg)
        return (grad,) + (None,) * (ctx.num_inputs - 1)

    return backward, setup_context


_bwd, _setup = gating_autograd(topk_gating_backward)
topk_gating.register_autograd(_bwd, setup_context=_setup)

@custom_op("moe_kernels::expert_choice_gating", mutates_args=())
def expert_choice_gating(logits: Tensor, capacity: int, scoring: str) -> Tuple[Tensor, Tensor]:
    return ref.expert_choice_gating(logits, capacity, scoring)


def expert_choice_fake(logits, capacity, scoring):
    E = logits.shape[1]
    return (logits.new_empty(E, capacity, dtype=ref.acc_dtype(logits.dtype)),
            logits.new_empty(E, capacity, dtype=torch.int32))


expert_choice_gating.register_fake(expert_choice_fake)


@custom_op("moe_kernels::expert_choice_backward", mutates_args=())
def expert_choice_backward(grad_weights: Tensor, logits: Tensor, token_ids: Tensor, scoring: str) -> Tensor:
    return ref.expert_choice_backward(grad_weights, logits, token_ids, scoring)


@expert_choice_backward.register_fake
def _(grad_weights, logits, token_ids, scoring):
    return torch.empty_like(logits)


def expert_choice_autograd(backward_op):
    """``(backward, setup_context)`` of an expert_choice_gating op, shared by every backend."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])
        ctx.scoring = inputs[2]

    def backward(ctx, grad_weights, _grad_ids):
        logits, token_ids = ctx.saved_tensors
        if grad_weights is None or not ctx.needs_input_grad[0]:
            return None, None, None
        return backward_op(grad_weights, logits, token_ids, ctx.scoring), None, None

    return backward, setup_context


_bwd, _setup = expert_choice_autograd(expert_choice_backward)
expert_choice_gating.register_autograd(_bwd, setup_context=_setup)


@custom_op("moe_kernels::expert_choice_plan", mutates_args=())
def expert_choice_plan(token_ids: Tensor, num_tokens: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return ref.expert_choice_plan(token_ids, num_tokens)


@expert_choice_plan.register_fake
def _(token_ids, num_tokens):
    E, C = token_ids.shape
    i32 = dict(dtype=torch.int32)
    return (token_ids.new_empty(E * C, **i32), token_ids.new_empty(E + 1, **i32), token_ids.new_empty(E, **i32),
            token_ids.new_empty(num_tokens * E, **i32))


# ----- routing ---------------------------------------------------------------------------------------


@custom_op("moe_kernels::expert_counts", mutates_args=())
def expert_counts(topk_ids: Tensor, num_experts: int) -> Tensor:
    return ref.expert_counts(topk_ids, num_experts)


@expert_counts.register_fake
def _(topk_ids, num_experts):
    return topk_ids.new_empty(num_experts, dtype=torch.int32)


@custom_op("moe_kernels::plan_routing", mutates_args=())
def plan_routing(
    topk_ids: Tensor, num_experts: int, block_size: int, capacity: Optional[int], expert_map: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return ref.plan_routing(topk_ids, num_experts, block_size, capacity, expert_map)


@plan_routing.register_fake
def plan_fake(topk_ids, num_experts, block_size, capacity, expert_map):
    S = topk_ids.shape[0] * topk_ids.shape[1]
    i32 = dict(dtype=torch.int32)
    return (
        topk_ids.new_empty(S + num_experts * (block_size - 1), **i32),
        topk_ids.new_empty(num_experts + 1, **i32),
        topk_ids.new_empty(num_experts, **i32),
        topk_ids.new_empty(S, **i32),
    )


@custom_op("moe_kernels::capacity_drop", mutates_args=())
def capacity_drop(
    topk_ids: Tensor, num_experts: int, capacity: int, drop_policy: str, topk_weights: Optional[Tensor],
    expert_map: Optional[Tensor],
) -> Tensor:
    return ref.capacity_drop(topk_ids, num_experts, capacity, drop_policy, topk_weights, expert_map)


@capacity_drop.register_fake
def capacity_drop_fake(topk_ids, num_experts, capacity, drop_policy, topk_weights, expert_map):
    return topk_ids.new_empty(topk_ids.shape, dtype=torch.int32)


@custom_op("moe_kernels::permute", mutates_args=())
def permute(x: Tensor, sorted_slots: Tensor, slot_to_row: Tensor, top_k: int, row_weights: Optional[Tensor]) -> Tensor:
    return ref.permute(x, sorted_slots, top_k, row_weights)


@permute.register_fake
def permute_fake(x, sorted_slots, slot_to_row, top_k, row_weights):
    return x.new_empty(sorted_slots.shape[0], x.shape[1])


@custom_op("moe_kernels::unpermute", mutates_args=())
def unpermute(
    y_sorted: Tensor, sorted_slots: Tensor, slot_to_row: Tensor, top_k: int, topk_weights: Optional[Tensor]
) -> Tensor:
    return ref.unpermute(y_sorted, slot_to_row, top_k, topk_weights)


@unpermute.register_fake
def unpermute_fake(y_sorted, sorted_slots, slot_to_row, top_k, topk_weights):
    return y_sorted.new_empty(slot_to_row.shape[0] // top_k, y_sorted.shape[1])


@custom_op("moe_kernels::slot_dots", mutates_args=())
def slot_dots(rows: Tensor, slot_to_row: Tensor, per_token: Tensor, top_k: int) -> Tensor:
    return ref.slot_dots(rows, slot_to_row, per_token, top_k)


@slot_dots.register_fake
def _(rows, slot_to_row, per_token, top_k):
    return rows.new_empty(slot_to_row.shape[0] // top_k, top_k, dtype=ref.acc_dtype(rows.dtype))


def route_autograd(permute_op, unpermute_op, slot_dots_op):
    """Autograd of one backend's permute and unpermute ops, each the other's backward:
    ``(permute_backward, unpermute_backward, setup_context)``. Both ops take
    ``(data, sorted_slots, slot_to_row, top_k, weights)``."""

    def setup_context(ctx, inputs, output):
        data, sorted_slots, slot_to_row, top_k, weights = inputs
        ctx.save_for_backward(data, sorted_slots, slot_to_row, weights)
        ctx.top_k = top_k

    def permute_backward(ctx, grad):
        x, sorted_slots, slot_to_row, w = ctx.saved_tensors
        gx = unpermute_op(grad, sorted_slots, slot_to_row, ctx.top_k, w) if ctx.needs_input_grad[0] else None
        gw = None
        if w is not None and ctx.needs_input_grad[4]:
            gw = slot_dots_op(grad, slot_to_row, x, ctx.top_k).to(w.dtype).view_as(w)
        return gx, None, None, None, gw

    def unpermute_backward(ctx, grad):
        y, sorted_slots, slot_to_row, w = ctx.saved_tensors
        gy = permute_op(grad, sorted_slots, slot_to_row, ctx.top_k, w) if ctx.needs_input_grad[0] else None
        gw = None
        if w is not None and ctx.needs_input_grad[4]:
            gw = slot_dots_op(y, slot_to_row, grad, ctx.top_k).to(w.dtype)
        return gy, None, None, None, gw

    return permute_backward, unpermute_backward, setup_context


_pbwd, _ubwd, _setup = route_autograd(permute, unpermute, slot_dots)
permute.register_autograd(_pbwd, setup_context=_setup)
unpermute.register_autograd(_ubwd, setup_context=_setup)

# ----- grouped GEMM ----------------------------------------------------------------------------------


@custom_op("moe_kernels::grouped_gemm", mutates_args=())
def grouped_gemm(
    x: Tensor, w: Tensor, expert_offsets: Tensor, bias: Optional[Tensor], sorted_slots: Optional[Tensor], trans_w: bool
) -> Tensor:
    return ref.grouped_gemm(x, w, expert_offsets, bias, sorted_slots, trans_w)


@grouped_gemm.register_fake
def _(x, w, expert_offsets, bias, sorted_slots, trans_w):
    return x.new_empty(x.shape[0], w.shape[1] if trans_w else w.shape[2])


@custom_op("moe_kernels::grouped_gemm_wgrad", mutates_args=())
def grouped_gemm_wgrad(a: Tensor, b: Tensor, expert_offsets: Tensor, sorted_slots: Optional[Tensor]) -> Tensor:
    return ref.grouped_gemm_wgrad(a, b, expert_offsets, sorted_slots)


@grouped_gemm_wgrad.register_fake
def _(a, b, expert_offsets, sorted_slots):
    return a.new_empty(expert_offsets.shape[0] - 1, a.shape[1], b.shape[1])


@custom_op("moe_kernels::segment_sum", mutates_args=())
def segment_sum(y: Tensor, expert_offsets: Tensor, sorted_slots: Optional[Tensor]) -> Tensor:
    return ref.segment_sum(y, expert_offsets, sorted_slots)


@segment_sum.register_fake
def _(y, expert_offsets, sorted_slots):
    return y.new_empty(expert_offsets.shape[0] - 1, y.shape[1])


def gemm_autograd(gemm_op, wgrad_op, segment_sum_op):
    """``(backward, setup_context)`` of one backend's grouped_gemm op
    ``(x, w, expert_offsets, bias, sorted_slots, trans_w)``: dX is the same GEMM with the weight read
    transposed (it zeroes padding and tail rows itself), dW the per-expert ``dY^T X`` (or ``X^T dY``),
    the bias gradient a segment sum; the last two skip padding rows, whose outputs were zeroed."""

    def setup_context(ctx, inputs, output):
        x, w, offsets, bias, sorted_slots, trans_w = inputs
        ctx.save_for_backward(x, w, offsets, sorted_slots)
        ctx.trans_w, ctx.has_bias = trans_w, bias is not None

    def backward(ctx, grad):
        x, w, offsets, sorted_slots = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = gemm_op(grad, w, offsets, None, sorted_slots, not ctx.trans_w) if need[0] else None
        gw = None
        if need[1]:
            gw = wgrad_op(grad, x, offsets, sorted_slots) if ctx.trans_w else wgrad_op(x, grad, offsets, sorted_slots)
        gb = segment_sum_op(grad, offsets, sorted_slots) if ctx.has_bias and need[3] else None
        return gx, gw, None, gb, None, None

    return backward, setup_context


_bwd, _setup = gemm_autograd(grouped_gemm, grouped_gemm_wgrad, segment_sum)
grouped_gemm.register_autograd(_bwd, setup_context=_setup)


def wgrad_autograd(gemm_op):
    """``(backward, setup_context)`` of one backend's grouped_gemm_wgrad op ``(a, b, expert_offsets,
    sorted_slots)`` -> ``[E, A, B]``: ``da[r] = b[r] @ g[e].T`` and ``db[r] = a[r] @ g[e]``, both the
    grouped GEMM (zero on rows outside the segments and on padding rows, which did not count)."""

    def setup_context(ctx, inputs, output):
        a, b, offsets, sorted_slots = inputs
        ctx.save_for_backward(a, b, offsets, sorted_slots)

    def backward(ctx, grad):
        a, b, offsets, sorted_slots = ctx.saved_tensors
        g = grad.to(a.dtype)
        ga = gemm_op(b, g, offsets, None, sorted_slots, True) if ctx.needs_input_grad[0] else None
        gb = gemm_op(a, g, offsets, None, sorted_slots, False) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None

    return backward, setup_context


_bwd, _setup = wgrad_autograd(grouped_gemm)
grouped_gemm_wgrad.register_autograd(_bwd, setup_context=_setup)

# ----- activation ------------------------------------------------------------------------------------


@custom_op("moe_kernels::activation", mutates_args=())
def activation(h: Tensor, kind: str, gated: bool) -> Tensor:
    return ref.activation(h, kind, gated)


@activation.register_fake
def _(h, kind, gated):
    return h.new_empty(h.shape[0], h.shape[1] // 2 if gated else h.shape[1])


@custom_op("moe_kernels::activation_backward", mutates_args=())
def activation_backward(grad: Tensor, h: Tensor, kind: str, gated: bool) -> Tensor:
    return ref.activation_backward(grad, h, kind, gated)


@activation_backward.register_fake
def _(grad, h, kind, gated):
    return torch.empty_like(h)


def _act_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.cfg = inputs[1:]


def _act_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return activation_backward(grad, h, *ctx.cfg), None, None


activation.register_autograd(_act_backward, setup_context=_act_setup)

# ----- fused MoE -------------------------------------------------------------------------------------


@custom_op("moe_kernels::fused_moe", mutates_args=())
def fused_moe(
    hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, activation: str, gated: bool,
    w13_bias: Optional[Tensor], w2_bias: Optional[Tensor], apply_router_weight_on_input: bool,
    capacity: Optional[int], expert_map: Optional[Tensor], gate_up_interleaved: bool = False,
) -> Tensor:
    return ref.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                         apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved)


@fused_moe.register_fake
def _(hidden, w13, w2, topk_weights, topk_ids, *args):
    return torch.empty_like(hidden)


@custom_op("moe_kernels::fused_moe_backward", mutates_args=())
def fused_moe_backward(
    grad_out: Tensor, hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
    activation: str, gated: bool, w13_bias: Optional[Tensor], w2_bias: Optional[Tensor],
    apply_router_weight_on_input: bool, capacity: Optional[int], expert_map: Optional[Tensor],
    gate_up_interleaved: bool = False,
) -> List[Tensor]:
    grads = ref.fused_moe_backward(grad_out, hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias,
                                   w2_bias, apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved)
    return [g if g is not None else hidden.new_empty(0) for g in grads]


@fused_moe_backward.register_fake
def _(grad_out, hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias, *args):
    return [
        torch.empty_like(hidden), torch.empty_like(w13), torch.empty_like(w2), torch.empty_like(topk_weights),
        torch.empty_like(w13_bias) if w13_bias is not None else hidden.new_empty(0),
        torch.empty_like(w2_bias) if w2_bias is not None else hidden.new_empty(0),
    ]


def moe_autograd(backward_op):
    """``(backward, setup_context)`` of one backend's fused_moe op; ``backward_op`` (same arguments as
    ``fused_moe_backward``) recomputes what it needs from the inputs, so only those are saved. A trailing
    ``gate_up_interleaved`` input, when true, is handed on to ``backward_op`` as its last argument."""

    def setup_context(ctx, inputs, output):
        hidden, w13, w2, topk_weights, topk_ids, act, gated, b13, b2, on_input, capacity, expert_map = inputs[:12]
        ctx.save_for_backward(hidden, w13, w2, topk_weights, topk_ids, b13, b2, expert_map)
        ctx.cfg = (act, gated, on_input, capacity)
        ctx.extra = (True,) if len(inputs) > 12 and inputs[12] else ()
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad):
        hidden, w13, w2, topk_weights, topk_ids, b13, b2, expert_map = ctx.saved_tensors
        act, gated, on_input, capacity = ctx.cfg
        g = backward_op(grad, hidden, w13, w2, topk_weights, topk_ids, act, gated, b13, b2, on_input, capacity, expert_map,
                        *ctx.extra)
        need = ctx.needs_input_grad
        gb13 = g[4] if b13 is not None and need[7] else None
        gb2 = g[5] if b2 is not None and need[8] else None
        return (g[0] if need[0] else None, g[1] if need[1] else None, g[2] if need[2] else None,
                g[3] if need[3] else None, None, None, None, gb13, gb2, None, None, None) + (None,) * (ctx.num_inputs - 12)

    return backward, setup_context


_bwd, _setup = moe_autograd(fused_moe_backward)
fused_moe.register_autograd(_bwd, setup_context=_setup)

# ----- expert balancing ------------------------------------------------------------------------------


@custom_op("moe_kernels::update_correction_bias", mutates_args=("bias",))
def update_correction_bias(bias: Tensor, tokens_per_expert: Tensor, rate: float) -> None:
    load = tokens_per_expert.to(torch.float64)  # exact counts, whatever the bias dtype
    bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))


@update_correction_bias.register_fake
def _(bias, tokens_per_expert, rate):
    return None
