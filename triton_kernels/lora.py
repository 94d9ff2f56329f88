"""Mixture of LoRA experts on the grouped GEMM kernel: shrink, expand, fixed-order combine.

Forward, for ``x [T, K]``, ``A [E, r, K]``, ``B [E, N, r]`` and a routing plan of the ``S = T*k`` slots:
1. shrink: ``h = grouped_gemm(x, A)`` reading the rows of ``x`` through the plan (``GATHER``): ``[S, r]``
   in expert order, no permuted copy of ``x``;
2. expand: ``d = grouped_gemm(h, B)`` times each slot's ``scaling * w`` (``OUT_SCALE``), written at
   its slot (``SCATTER``): ``[S, N]`` in token order;
3. ``add_slot_sums_kernel``: ``y[t] = base[t] + sum_j d[t*k + j]`` in fp32, j ascending, with
   ``base = x @ W0.T + b0`` from torch (a dense GEMM). No atomics: deterministic. The tiles of the
   grouped GEMM and cuBLAS's kernel for the base depend on T; in the batch-invariant mode
   (``moe_kernels.batch_invariant``) the tiles are fixed and the base is the grouped GEMM with one
   expert (``_dense``), so a token's output is bitwise independent of the batch.

Backward reuses the same kernels with the weights read transposed (``trans_w=False``): the output
gradient is gathered through the plan for ``g @ B[e]``, dX is scattered to slots and summed the same
way, dA and dB are ``grouped_wgrad`` over permuted rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import grouped_gemm as _gg
from . import permute as _permute
from . import plan as _plan
from ..batch_invariance import is_batch_invariant
from ._utils import identity_launch, next_pow2

MAX_EXPERTS = 2047  # the plan kernel's limit


@triton.jit
def add_slot_sums_kernel(
    base_ptr, rows_ptr, slot_to_row_ptr, out_ptr, T, N, stride_base, stride_rows, top_k,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t] = base[t] + sum_j rows[t*k + j] over kept slots (slot_to_row >= 0), fp32, j ascending."""
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask, cmask = toks < T, cols < N
    m = tmask[:, None] & cmask[None, :]
    acc = tl.load(base_ptr + toks[:, None] * stride_base + cols[None, :], mask=m, other=0.0).to(tl.float32)
    for j in range(top_k):
        slot = toks * top_k + j
        live = tl.load(slot_to_row_ptr + slot, mask=tmask, other=-1) >= 0
        acc += tl.load(rows_ptr + slot[:, None] * stride_rows + cols[None, :], mask=live[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + toks[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


def supports(x: torch.Tensor, lora_a: torch.Tensor, *args, **kwargs) -> str | None:
    if x.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if lora_a.shape[0] > MAX_EXPERTS:
        return f"the triton plan kernel serves E <= {MAX_EXPERTS}, got {lora_a.shape[0]}"
    return None


def add_slot_sums(base, rows, slot_to_row, top_k, *, launch=identity_launch, empty):
    """Launcher: ``base [T, N]`` plus the sum of each token's k kept slot rows of ``rows [T*k, N]``."""
    base = base if base.stride(-1) == 1 else base.contiguous()
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    T, N = base.shape
    out = empty((T, N), dtype=base.dtype, device=base.device)
    if T == 0 or N == 0:
        return out
    block_n = min(max(next_pow2(N), 16), 1024)
    block_t = max(1, min(64, 4096 // block_n))
    launch(add_slot_sums_kernel)[(triton.cdiv(T, block_t), triton.cdiv(N, block_n))](
        base, rows, slot_to_row, out, T, N, base.stride(0), rows.stride(0), top_k, BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return out


def _dense(x, weight, bias, trans_w, kw):
    """``x @ W.T + b`` (``trans_w``, W [N, K]) or ``x @ W`` (W [K, N]): cuBLAS by default, in the
    batch-invariant mode the grouped GEMM with one expert and fixed tiles (cuBLAS's choice depends on T)."""
    if not is_batch_invariant():
        return F.linear(x, weight, bias) if trans_w else x @ weight
    offsets = torch.stack([x.new_zeros((), dtype=torch.int32), x.new_full((), x.shape[0], dtype=torch.int32)])
    return _gg.grouped_gemm(x, weight[None], offsets, bias[None] if bias is not None else None, None, trans_w, **kw)


def _plan_of(topk_ids, num_experts, kw):
    return _plan.plan_routing(topk_ids, num_experts, 1, None, None, **kw)


def lora_moe(x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling, *,
             launch=identity_launch, empty):
    """Launcher of the forward: ``[T, N]`` in x's dtype."""
    kw = dict(launch=launch, empty=empty)
    T, k = topk_ids.shape
    slots, offsets, _, slot_to_row = _plan_of(topk_ids, lora_a.shape[0], kw)
    w_slots = (topk_weights.float() * scaling).reshape(-1).contiguous()  # [S]
    h = _gg.grouped_gemm(x, lora_a, offsets, None, slots, True, gather_top_k=k, **kw)  # [S, r] expert order
    d = _gg.grouped_gemm(h, lora_b, offsets, None, slots, True, row_weights=w_slots, scatter_slots=T * k, **kw)  # [S, N]
    return add_slot_sums(_dense(x, base_weight, base_bias, True, kw), d, slot_to_row, k, **kw)


def lora_moe_backward(grad, x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling, needs, *,
                      launch=identity_launch, empty):
    """Launcher of the backward: ``[dx, dW0, db0, dA, dB, dw]``, an empty tensor where ``needs`` is False.

    ``g_hu = g[t] @ B[e]`` per slot (gathered, unweighted) serves dw (``<g_hu, h>``, a dot over r) and,
    scaled by ``scaling * w``, dx and dA.
    """
    kw = dict(launch=launch, empty=empty)
    T, k = topk_ids.shape
    slots, offsets, _, slot_to_row = _plan_of(topk_ids, lora_a.shape[0], kw)
    h = _gg.grouped_gemm(x, lora_a, offsets, None, slots, True, gather_top_k=k, **kw)  # [S, r] recomputed shrink
    g_hu = _gg.grouped_gemm(grad, lora_b, offsets, None, slots, False, gather_top_k=k, **kw)  # [S, r]
    picked = topk_weights.reshape(-1).float().index_select(0, slots.clamp(min=0).long())
    row_w = torch.where(slots >= 0, picked, 0.0) * scaling  # [S] scaling * w of each row's slot
    g_h = (g_hu.float() * row_w[:, None]).to(x.dtype)  # [S, r]
    out = [x.new_empty(0) for _ in range(6)]  # distinct tensors: outputs of an op may not alias
    if needs[0]:
        g_xs = _gg.grouped_gemm(g_h, lora_a, offsets, None, slots, False, scatter_slots=T * k, **kw)  # [S, K] slot order
        out[0] = add_slot_sums(_dense(grad, base_weight, None, False, kw), g_xs, slot_to_row, k, **kw)
    if needs[1]:
        out[1] = grad.t() @ x
    if needs[2]:
        out[2] = grad.float().sum(0).to(base_bias.dtype)
    if needs[3]:
        xs = _permute.permute(x, slots, slot_to_row, k, None, **kw)  # [S, K]
        out[3] = _gg.grouped_wgrad(g_h, xs, offsets, **kw)
    if needs[4]:
        gs = _permute.permute(grad, slots, slot_to_row, k, None, **kw)  # [S, N]
        out[4] = _gg.grouped_wgrad(gs, (h.float() * row_w[:, None]).to(x.dtype), offsets, **kw)
    if needs[5]:
        dots = (g_hu.float() * h.float()).sum(1).index_select(0, slot_to_row.clamp(min=0).long())  # [S] slot order
        out[5] = (torch.where(slot_to_row >= 0, dots, 0.0) * scaling).view(T, k).to(topk_weights.dtype)
    return out
