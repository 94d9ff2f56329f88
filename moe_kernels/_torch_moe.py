"""The ``torch`` backend of ``fused_moe``: the reference's math with less glue, and a backward that reuses
the forward's intermediates instead of recomputing them.

Eager calls on CPU tensors take :mod:`moe_kernels._cpu_moe` (host-read plan, only kept rows); the registered op
below serves torch.compile, tensor subclasses and other devices: one stable sort of the slots gives the rows
of every expert (no padding, dropped slots at the tail), ``F.grouped_mm`` runs both GEMMs (a per-expert loop
where it cannot serve the dtype or alignment), and the k slots are combined per token in a fixed order j = 0..k-1 in fp32, as ``unpermute``
does. Under autograd the op also returns the permuted input, the pre-activation and the expert outputs, so
the backward is two grouped GEMMs for dX, two for dW and the activation's backward (no recomputed GEMM).

Checked against :mod:`moe_kernels.reference` (``tests/test_torch_moe.py``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from . import _cpu_moe
from . import reference as ref


def _plan(topk_ids: Tensor, E: int, capacity: Optional[int], expert_map: Optional[Tensor]):
    """``(order [S], row_expert [S], offsets [E] int32 (segment ends), slot_row [S], kept [S])`` (int64 but
    offsets): row r holds slot ``order[r]`` of expert ``row_expert[r]``; rows from ``offsets[-1]`` on hold
    the dropped slots (expert E)."""
    S = topk_ids.numel()
    device = topk_ids.device
    if capacity is None and expert_map is None:
        flat = topk_ids.reshape(-1).long()
        key = flat.masked_fill((flat < 0) | (flat >= E), E)  # [S]; E = dropped
    else:  # the reference plan decides which slots are kept; its kept slots keep their expert
        _, offsets, _, slot_to_row = ref.plan_routing(topk_ids, E, 1, capacity, expert_map)
        rows_e = ref.row_experts(offsets, S)
        key = torch.where(slot_to_row >= 0, rows_e.index_select(0, slot_to_row.clamp(min=0).long()), E)
    row_expert, order = torch.sort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.cumsum(counts[:E], 0).to(torch.int32)
    slot_row = torch.empty_like(order).scatter_(0, order, torch.arange(S, device=device))
    return order, row_expert, offsets, slot_row, key < E


def _segments(offsets: Tensor) -> list[tuple[int, int, int]] | None:
    """On CPU, when few experts have rows, ``[(e, lo, hi)]`` of the non-empty segments: a loop over them beats
    ``F.grouped_mm``, whose CPU kernel visits every expert. None otherwise (on a GPU this would sync)."""
    if offsets.device.type != "cpu":
        return None
    ends = offsets.tolist()
    segs = [(e, lo, hi) for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)) if hi > lo]
    return segs if 3 * len(segs) < len(ends) else None


def _gmm(x: Tensor, w: Tensor, offsets: Tensor, trans_w: bool, segs=None) -> Tensor:
    """Rows of segment e (ends ``offsets``) times ``w[e].T`` (``trans_w``, w ``[E, N, K]``) or ``w[e]``
    (w ``[E, K, N]``); rows past the last segment are left unwritten."""
    wt = w.transpose(1, 2) if trans_w else w  # [E, K, N]
    if segs is None and ref._grouped_mm_ok(x, w):
        return F.grouped_mm(x.contiguous(), wt, offs=offsets)
    y = torch.empty(x.shape[0], wt.shape[2], dtype=x.dtype, device=x.device)
    if segs is None:  # the fallback (fp64, unaligned): offsets on the host
        ends = offsets.tolist()
        segs = [(e, lo, hi) for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)) if hi > lo]
    for e, lo, hi in segs:
        torch.mm(x[lo:hi], wt[e], out=y[lo:hi])
    return y


def _wgrad_ok(a: Tensor, b: Tensor) -> bool:
    """``F.grouped_mm`` serves ``a.T @ b`` per segment (the conditions of the forward GEMMs on ``[A]``, ``[B]``)."""
    return a.shape[0] > 0 and a.is_contiguous() and ref._grouped_mm_ok(a, b.new_empty(1, b.shape[1], a.shape[1]))


def _wgrad(a: Tensor, b: Tensor, offsets: Tensor, segs=None) -> Tensor:
    """Per segment ``a_e^T @ b_e``: ``[E, A, B]``, zeros for empty segments, rows past the last one ignored."""
    if segs is None and _wgrad_ok(a, b):
        return F.grouped_mm(a.t(), b.contiguous(), offs=offsets)
    out = torch.zeros(offsets.shape[0], a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
    if segs is None:
        ends = offsets.tolist()
        segs = [(e, lo, hi) for e, (lo, hi) in enumerate(zip([0] + ends[:-1], ends)) if hi > lo]
    for e, lo, hi in segs:
        torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
    return out


def _weight_grad(g_out: Tensor, x: Tensor, offsets: Tensor, segs, w: Tensor) -> Tensor:
    """The gradient of ``w [E, N, K]`` (rows: ``g_out [S, N]``, ``x [S, K]``), laid out as ``w`` is: a transposed
    view (transformers' ``is_transposed`` weights) gets a transposed view, so accumulating it into the
    parameter's ``.grad`` is a contiguous add."""
    if w.dim() == 3 and not w.is_contiguous() and w.transpose(1, 2).is_contiguous():
        return _wgrad(x, g_out, offsets, segs).transpose(1, 2)
    return _wgrad(g_out, x, offsets, segs)


def _segment_sum(y: Tensor, row_expert: Tensor, E: int) -> Tensor:
    acc = ref.acc_dtype(y.dtype)
    out = torch.zeros(E + 1, y.shape[1], dtype=acc, device=y.device).index_add_(0, row_expert, y.to(acc))
    return out[:E].to(y.dtype)


def _by_token(rows: Tensor, slot_row: Tensor, kept: Tensor, T: int, k: int) -> Tensor:
    """``[T, k, N]``: the row of every slot, zero for dropped slots."""
    picked = rows.index_select(0, slot_row).view(T, k, rows.shape[1])
    return torch.where(kept.view(T, k, 1), picked, torch.zeros((), dtype=rows.dtype, device=rows.device))


def _combine(per_slot: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``sum_j w[:, j] * per_slot[:, j]`` in fp32 (fp64 for fp64), j ascending: deterministic, batch-invariant."""
    acc = ref.acc_dtype(per_slot.dtype)
    T, k, N = per_slot.shape
    w = weights.to(acc) if weights is not None else None
    out = None
    for j in range(k):
        v = per_slot[:, j].to(acc)
        if w is not None:
            v = v * w[:, j : j + 1]
        out = v if out is None else out + v
    if out is None:
        out = torch.zeros(T, N, dtype=acc, device=per_slot.device)
    return out.to(per_slot.dtype)


def _forward(hidden, w13, w2, topk_weights, topk_ids, kind, gated, b13, b2, on_input, capacity, expert_map,
             interleaved):
    T, k = topk_ids.shape
    E = w13.shape[0]
    order, row_expert, offsets, slot_row, kept = _plan(topk_ids, E, capacity, expert_map)
    xs = hidden.index_select(0, order // k)  # [S, H]
    if on_input:
        w_row = topk_weights.reshape(-1).index_select(0, order).to(ref.acc_dtype(hidden.dtype))
        xs = (xs.to(w_row.dtype) * w_row[:, None]).to(hidden.dtype)
    segs = _segments(offsets)
    h = _gmm(xs, w13, offsets, True, segs)  # [S, 2I]
    row_e = row_expert.clamp(max=E - 1)
    if b13 is not None:
        h = h + b13.index_select(0, row_e).to(h.dtype)
    a = ref.activation(h, kind, gated, interleaved)  # [S, I]
    ys = _gmm(a, w2, offsets, True, segs)  # [S, H]
    if b2 is not None:
        ys = ys + b2.index_select(0, row_e).to(ys.dtype)
    y_tok = _by_token(ys, slot_row, kept, T, k)  # [T, k, H]
    out = _combine(y_tok, None if on_input else topk_weights)
    return out, xs, h, y_tok


@custom_op("moe_kernels::fused_moe_torch", mutates_args=())
def fused_moe_torch(
    hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor, activation: str, gated: bool,
    w13_bias: Optional[Tensor], w2_bias: Optional[Tensor], apply_router_weight_on_input: bool,
    capacity: Optional[int], expert_map: Optional[Tensor], gate_up_interleaved: bool, save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out [T, H], xs [S, H], h [S, 2I], y_tok [T, k, H])``; the last three (for the backward) are empty
    unless ``save``."""
    out, xs, h, y_tok = _forward(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                                 apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved)
    if not save:
        e = hidden.new_empty(0)
        return out, e, e.clone(), e.clone()
    return out, xs, h, y_tok


@fused_moe_torch.register_fake
def _(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias, on_input, capacity, expert_map,
      interleaved, save):
    T, k = topk_ids.shape
    S, H = T * k, hidden.shape[1]
    if not save:
        return torch.empty_like(hidden), hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return torch.empty_like(hidden), hidden.new_empty(S, H), hidden.new_empty(S, w13.shape[1]), hidden.new_empty(T, k, H)


@custom_op("moe_kernels::fused_moe_torch_backward", mutates_args=())
def fused_moe_torch_backward(
    grad_out: Tensor, hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
    xs: Tensor, h: Tensor, y_tok: Tensor, activation: str, gated: bool, has_b13: bool, has_b2: bool,
    apply_router_weight_on_input: bool, capacity: Optional[int], expert_map: Optional[Tensor],
    gate_up_interleaved: bool,
) -> List[Tensor]:
    """Gradients ``[hidden, w13, w2, topk_weights, w13_bias, w2_bias]`` (empty for absent biases)."""
    T, k = topk_ids.shape
    E = w13.shape[0]
    on_input = apply_router_weight_on_input
    order, row_expert, offsets, slot_row, kept = _plan(topk_ids, E, capacity, expert_map)
    acc = ref.acc_dtype(hidden.dtype)
    w_row = topk_weights.reshape(-1).index_select(0, order).to(acc)  # [S]
    g_ys = grad_out.index_select(0, order // k)  # [S, H]
    if not on_input:
        g_ys = (g_ys.to(acc) * w_row[:, None]).to(hidden.dtype)
    segs = _segments(offsets)
    g_a = _gmm(g_ys, w2, offsets, False, segs)  # [S, I]
    g_h = ref.activation_backward(g_a, h, activation, gated, gate_up_interleaved)  # [S, 2I]
    g_xs = _gmm(g_h, w13, offsets, False, segs)  # [S, H]
    if on_input:
        x_tok = hidden.index_select(0, order // k).to(acc)
        g_w_row = (g_xs.to(acc) * x_tok).sum(-1)  # [S]
        g_w = torch.where(kept.view(T, k), g_w_row.index_select(0, slot_row).view(T, k), 0.0)
        g_hidden = _combine(_by_token(g_xs, slot_row, kept, T, k), topk_weights)
    else:
        g_w = torch.einsum("tjn,tn->tj", y_tok.to(acc), grad_out.to(acc))
        g_hidden = _combine(_by_token(g_xs, slot_row, kept, T, k), None)
    a = ref.activation(h, activation, gated, gate_up_interleaved)  # recomputed: elementwise, cheap
    g_w13 = _weight_grad(g_h, xs, offsets, segs, w13)
    g_w2 = _weight_grad(g_ys, a, offsets, segs, w2)
    empty = hidden.new_empty(0)
    g_b13 = _segment_sum(g_h, row_expert, E) if has_b13 else empty
    g_b2 = _segment_sum(g_ys, row_expert, E) if has_b2 else empty.clone()
    return [g_hidden, g_w13, g_w2, g_w.to(topk_weights.dtype), g_b13, g_b2]


@fused_moe_torch_backward.register_fake
def _(grad_out, hidden, w13, w2, topk_weights, topk_ids, xs, h, y_tok, activation, gated, has_b13, has_b2, *args):
    E = w13.shape[0]
    return [torch.empty_like(hidden), torch.empty_like(w13), torch.empty_like(w2), torch.empty_like(topk_weights),
            hidden.new_empty(E, w13.shape[1]) if has_b13 else hidden.new_empty(0),
            hidden.new_empty(E, w2.shape[1]) if has_b2 else hidden.new_empty(0)]


def _setup_context(ctx, inputs, output):
    hidden, w13, w2, topk_weights, topk_ids, act, gated, b13, b2, on_input, capacity, expert_map, interleaved, _ = inputs
    _, xs, h, y_tok = output
    ctx.save_for_backward(hidden, w13, w2, topk_weights, topk_ids, expert_map, xs, h, y_tok)
    ctx.cfg = (act, gated, b13 is not None, b2 is not None, on_input, capacity, interleaved)


def _backward(ctx, grad, *_unused):
    hidden, w13, w2, topk_weights, topk_ids, expert_map, xs, h, y_tok = ctx.saved_tensors
    act, gated, has_b13, has_b2, on_input, capacity, interleaved = ctx.cfg
    if xs.numel() == 0 and hidden.numel() and topk_ids.numel():
        raise RuntimeError("fused_moe (torch backend): backward of a call made without autograd saving")
    g = fused_moe_torch_backward(grad.contiguous(), hidden, w13, w2, topk_weights, topk_ids, xs, h, y_tok, act, gated,
                                 has_b13, has_b2, on_input, capacity, expert_map, interleaved)
    need = ctx.needs_input_grad
    return (g[0] if need[0] else None, g[1] if need[1] else None, g[2] if need[2] else None,
            g[3] if need[3] else None, None, None, None, g[4] if has_b13 and need[7] else None,
            g[5] if has_b2 and need[8] else None, None, None, None, None, None)


fused_moe_torch.register_autograd(_backward, setup_context=_setup_context)
_OP = torch.ops.moe_kernels.fused_moe_torch.default


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
              apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved=False):
    """The torch backend's ``fused_moe`` (arguments of ``moe_kernels::fused_moe``); saves what the backward
    needs only when a gradient will be asked for. Eager CPU calls take :mod:`moe_kernels._cpu_moe`."""
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, w13, w2, topk_weights, w13_bias, w2_bias))
    if _cpu_moe.serves(hidden, w13, w2):
        return _cpu_moe.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                                  apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved, save)
    return _OP(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
               apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved, save)[0]
