"""Routing plan, permute and unpermute."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _backends, _checks
from . import ops  # noqa: F401

_OPS = torch.ops.moe_kernels
_backends.register("plan_routing", "torch")(_OPS.plan_routing.default)
_backends.register("permute", "torch")(_OPS.permute.default)
_backends.register("unpermute", "torch")(_OPS.unpermute.default)
_backends.register("expert_choice_plan", "torch")(_OPS.expert_choice_plan.default)


@dataclass(frozen=True)
class RoutingPlan:
    """Where every (token, slot) pair goes: the (token, slot) pairs grouped by expert.

    ================= ======= ===== ===========================================================
    field             shape   dtype meaning
    ================= ======= ===== ===========================================================
    sorted_slots      [P]     int32 flat slot ``t*k + j`` of each permuted row; -1 for padding
    expert_offsets    [E+1]   int32 expert e owns rows ``[offsets[e], offsets[e+1])``
    tokens_per_expert [E]     int32 real (kept) rows per expert
    slot_to_row       [T*k]   int32 permuted row of each slot; -1 if dropped
    ================= ======= ===== ===========================================================

    ``P = T*k + E*(block_size-1)`` depends on shapes only; rows from ``expert_offsets[E]`` to ``P``
    are unused padding.
    """

    sorted_slots: torch.Tensor
    expert_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    slot_to_row: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int
    block_size: int = 1

    @property
    def num_rows(self) -> int:
        """P, the number of permuted rows (padding included)."""
        return self.sorted_slots.shape[0]

    def vllm_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan in the layout of vLLM's ``moe_align_block_size``, for block-aligned kernels:

        ``sorted_token_ids`` [P] int32: flat slot of each row, ``T*k`` (vLLM's pad value) for padding;
        ``expert_ids`` [P / block_size] int32: the expert of each block of rows, -1 past the last segment;
        ``num_tokens_post_padded`` [1] int32: rows in use (all segments, padded to ``block_size``).
        The ``P // block_size`` blocks cover every row in use, since ``expert_offsets[E] <= P``.
        """
        S = self.num_tokens * self.top_k
        sorted_token_ids = torch.where(self.sorted_slots >= 0, self.sorted_slots, S)
        num_blocks = self.num_rows // self.block_size
        starts = torch.arange(num_blocks, device=self.sorted_slots.device, dtype=torch.int32) * self.block_size
        experts = torch.searchsorted(self.expert_offsets[1:].contiguous(), starts, right=True).to(torch.int32)
        expert_ids = torch.where(starts < self.expert_offsets[-1], experts, -1)
        return sorted_token_ids, expert_ids, self.expert_offsets[-1:].clone()


def plan_routing(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    block_size: int = 1,
    capacity: int | None = None,
    expert_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> RoutingPlan:
    """Group the T*k (token, slot) pairs by expert, stably (by flat slot index within an expert).

    ``topk_ids`` [T, k] int32/int64 in ``[0, E)`` or -1 (dropped). ``block_size`` pads every segment to
    a multiple of it. ``capacity``: an expert keeps at most that many slots, first choices of all
    tokens before second choices, earlier tokens first (GShard). ``expert_map`` [E_global] int32 maps
    global ids to local ones (-1: not on this rank); ``num_experts`` is then the local count.

    Example::

        >>> plan = plan_routing(torch.tensor([[1, 0], [1, 1]]), 2)
        >>> plan.sorted_slots.tolist(), plan.expert_offsets.tolist()
        ([1, 0, 2, 3], [0, 1, 4])
    """
    fn = "plan_routing"
    _checks.check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=_checks.INDEX_DTYPES, layout="[T, k]")
    _checks.check_int(fn, "num_experts", num_experts, lo=1)
    _checks.check_int(fn, "block_size", block_size, lo=1)
    if capacity is not None:
        _checks.check_int(fn, "capacity", capacity, lo=0)
    n_ids = num_experts
    if expert_map is not None:
        _checks.check_tensor(fn, "expert_map", expert_map, ndim=1, dtypes=_checks.INDEX_DTYPES, layout="[E_global]")
        _checks.check_same_device(fn, topk_ids=topk_ids, expert_map=expert_map)
        _checks.check_ids_in_range(fn, "expert_map", expert_map, num_experts)
        n_ids = expert_map.shape[0]
    _checks.check_ids_in_range(fn, "topk_ids", topk_ids, n_ids)
    T, k = topk_ids.shape
    if T * k + num_experts * (block_size - 1) >= 2**31:
        raise ValueError(f"{fn}: T*k + E*(block_size-1) = {T * k + num_experts * (block_size - 1)} rows overflow int32 row indices")
    impl = _backends.select(fn, backend, topk_ids.device, topk_ids, num_experts)
    slots, offsets, tokens, slot_to_row = impl(topk_ids, num_experts, block_size, capacity, expert_map)
    return RoutingPlan(slots, offsets, tokens, slot_to_row, T, k, num_experts, block_size)


def expert_choice_plan(
    token_ids: torch.Tensor, weights: torch.Tensor, num_tokens: int, *, backend: str = "auto"
) -> tuple[RoutingPlan, torch.Tensor]:
    """Turn an expert-choice decision into a :class:`RoutingPlan` and per-slot weights.

    ``token_ids``/``weights`` [E, C] from :func:`expert_choice_gating`. The plan has ``top_k = E``
    (slot ``t*E + e`` is token t at expert e), ``P = E*C`` rows, expert e owning rows
    ``[e*C, (e+1)*C)`` (rows of token -1 are padding). The returned ``slot_weights`` [T, E] hold the
    weight of each (token, expert) pair, 0 where the expert did not take the token, and are
    differentiable in ``weights``. Then::

        y = unpermute(expert_fn(permute(x, plan)), plan, slot_weights)
    """
    fn = "expert_choice_plan"
    _checks.check_tensor(fn, "token_ids", token_ids, ndim=2, dtypes=_checks.INDEX_DTYPES, layout="[E, C]")
    _checks.check_tensor(fn, "weights", weights, dtypes=_checks.FLOAT_DTYPES, shape=tuple(token_ids.shape), layout="[E, C]")
    _checks.check_int(fn, "num_tokens", num_tokens, lo=0)
    _checks.check_same_device(fn, token_ids=token_ids, weights=weights)
    _checks.check_ids_in_range(fn, "token_ids", token_ids, num_tokens)
    E = token_ids.shape[0]
    impl = _backends.select(fn, backend, token_ids.device, token_ids)
    slots, offsets, tokens, slot_to_row = impl(token_ids, num_tokens)
    plan = RoutingPlan(slots, offsets, tokens, slot_to_row, num_tokens, E, E, 1)
    return plan, _gather_or_zero(weights.reshape(-1), slot_to_row).view(num_tokens, E)


def _gather_or_zero(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` where ``index >= 0``, else 0; differentiable in ``values``."""
    if values.numel() == 0:
        return values.new_zeros(index.shape)
    return torch.where(index >= 0, values.index_select(0, index.clamp(min=0).long()), 0.0)


def _check_plan(fn: str, plan) -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"{fn}: plan must be a RoutingPlan (from plan_routing), got {type(plan).__name__}")


def permute(x: torch.Tensor, plan: RoutingPlan, *, topk_weights: torch.Tensor | None = None, backend: str = "auto"):
    """Gather token rows into expert order: ``x_sorted[r] = x[sorted_slots[r] // k]``, padding rows zero.

    ``x`` [T, H] (any float dtype) -> ``x_sorted`` [P, H]. Differentiable in ``x``.
    With ``topk_weights`` [T, k] it returns ``(x_sorted, row_weights [P])``: the routing weight of each
    row's slot (0 for padding), for callers that apply the weights in expert order.
    """
    fn = "permute"
    _check_plan(fn, plan)
    _checks.check_tensor(fn, "x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES, shape=(plan.num_tokens, None), layout="[T, H]")
    if topk_weights is not None:
        _checks.check_tensor(fn, "topk_weights", topk_weights, dtypes=_checks.FLOAT_DTYPES,
                             shape=(plan.num_tokens, plan.top_k), layout="[T, k]")
    _checks.check_same_device(fn, x=x, plan=plan.sorted_slots, topk_weights=topk_weights)
    impl = _backends.select(fn, backend, x.device, x, plan)
    x_sorted = impl(x, plan.sorted_slots, plan.slot_to_row, plan.top_k, None)
    if topk_weights is None:
        return x_sorted
    return x_sorted, _gather_or_zero(topk_weights.reshape(-1), plan.sorted_slots)


def unpermute(
    y_sorted: torch.Tensor, plan: RoutingPlan, topk_weights: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Weighted combine back to token order: ``y[t] = sum_j w[t, j] * y_sorted[slot_to_row[t*k + j]]``.

    Kept slots only, accumulated in fp32 in order j = 0..k-1 (deterministic, no atomics).
    ``y_sorted`` [P, N] -> ``y`` [T, N] in ``y_sorted``'s dtype; ``topk_weights`` [T, k] (w = 1 if None).
    Differentiable in ``y_sorted`` and ``topk_weights``.
    """
    fn = "unpermute"
    _check_plan(fn, plan)
    _checks.check_tensor(fn, "y_sorted", y_sorted, ndim=2, dtypes=_checks.FLOAT_DTYPES, shape=(plan.num_rows, None), layout="[P, N]")
    if topk_weights is not None:
        _checks.check_tensor(fn, "topk_weights", topk_weights, dtypes=_checks.FLOAT_DTYPES,
                             shape=(plan.num_tokens, plan.top_k), layout="[T, k]")
    _checks.check_same_device(fn, y_sorted=y_sorted, plan=plan.slot_to_row, topk_weights=topk_weights)
    impl = _backends.select(fn, backend, y_sorted.device, y_sorted, plan)
    return impl(y_sorted, plan.sorted_slots, plan.slot_to_row, plan.top_k, topk_weights)
