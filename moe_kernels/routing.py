"""Routing plan, permute and unpermute."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import _backends, _checks
from . import ops  # noqa: F401
from . import reference as ref

_OPS = torch.ops.moe_kernels
_backends.register("plan_routing", "torch")(_OPS.plan_routing.default)
_backends.register("permute", "torch")(_OPS.permute.default)
_backends.register("unpermute", "torch")(_OPS.unpermute.default)
_backends.register("expert_choice_plan", "torch")(_OPS.expert_choice_plan.default)
_backends.register("capacity_drop", "torch")(_OPS.capacity_drop.default)


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

    def vllm_view(
        self, *, pad_sorted_ids: bool = False, num_experts: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plan in the layout of vLLM's ``moe_align_block_size(topk_ids, block_size, num_experts,
        pad_sorted_ids=...)``, for block-aligned kernels (no copy of rows, no host synchronisation):

        ``sorted_token_ids`` [M] int32: flat slot of each row, ``T*k`` (vLLM's pad value) for padding and
        past the last segment, with vLLM's length ``M = T*k + E*(block_size-1)``, rounded up to
        ``block_size`` with ``pad_sorted_ids``, and at most ``T*k*block_size`` when ``T*k < E``;
        ``expert_ids`` [ceil(M / block_size)] int32: the expert of each block of rows, -1 past the last
        segment (vLLM's inactive blocks); ``num_tokens_post_padded`` [1] int32: rows in use.

        ``num_experts`` (default: the plan's) is the E of vLLM's sizes: give the global expert count
        for a plan made with ``expert_map``, whose blocks carry local experts (vLLM's
        ``ignore_invalid_experts=True``: slots of other ranks, and ids outside ``[0, E)``, are left out).
        Within an expert, rows come in slot order (vLLM's order there is unspecified).
        """
        E = self.num_experts if num_experts is None else num_experts
        bs, S = self.block_size, self.num_tokens * self.top_k
        M = S + E * (bs - 1)
        if pad_sorted_ids:
            M = (M + bs - 1) // bs * bs
        M = torch.sym_min(S * bs, M)  # vLLM's shrink when T*k < E; no-op otherwise (then S*bs >= M)
        # Rows past M are unused (M covers every row in use); rows missing up to M are padding.
        rows = torch.cat([self.sorted_slots, self.sorted_slots.new_full((M,), -1)])[:M]
        sorted_token_ids = torch.where(rows >= 0, rows, S)
        num_blocks = (M + bs - 1) // bs
        starts = torch.arange(num_blocks, device=rows.device, dtype=torch.int32) * bs
        experts = torch.searchsorted(self.expert_offsets[1:].contiguous(), starts, right=True).to(torch.int32)
        expert_ids = torch.where(starts < self.expert_offsets[-1], experts, -1)
        return sorted_token_ids, expert_ids, self.expert_offsets[-1:].clone()

    def vllm_permute_view(self, topk_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The index maps of vLLM's ``moe_permute``: ``(expert_first_token_offset [E+1] int64,
        inv_permuted_idx [T*k] int32, permuted_idx [P] int32)``.

        ``inv_permuted_idx[t*k + j]`` is the row of slot (t, j); a slot outside the plan (another rank's
        expert, a sentinel id, dropped) gets a row at or past ``expert_first_token_offset[E]``, as vLLM
        writes them: the dropped slots in order of their id in ``topk_ids`` (when given; vLLM sorts the
        other ranks' slots after the local ones by global expert), then by slot. ``permuted_idx[r]`` is
        the slot of row r, ``T*k`` for unused rows.
        """
        S = self.slot_to_row.shape[0]
        dropped = self.slot_to_row < 0
        if topk_ids is not None:
            _checks.check_tensor("vllm_permute_view", "topk_ids", topk_ids, ndim=2, dtypes=_checks.ID_DTYPES,
                                 shape=(self.num_tokens, self.top_k), layout="[T, k]")
            key = topk_ids.reshape(-1).long()
        else:
            key = torch.zeros(S, dtype=torch.int64, device=dropped.device)
        order = torch.sort(torch.where(dropped, key, torch.iinfo(torch.int64).max), stable=True).indices
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(S, device=order.device))
        end = self.expert_offsets[-1].to(torch.int64)
        inv = torch.where(dropped, end + rank, self.slot_to_row.to(torch.int64)).to(torch.int32)
        permuted_idx = torch.where(self.sorted_slots >= 0, self.sorted_slots, S)
        return self.expert_offsets.to(torch.int64), inv, permuted_idx


def plan_routing(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    block_size: int = 1,
    capacity: int | None = None,
    drop_policy: str = "gshard",
    topk_weights: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    backend: str = "auto",
) -> RoutingPlan:
    """Group the T*k (token, slot) pairs by expert, stably (by flat slot index within an expert).

    ``topk_ids`` [T, k] of any integer dtype (int8/int16/int32/int64/uint8). Ids outside ``[0, E)`` — -1,
    the sentinels ``>= E`` that vLLM and Hugging Face give other ranks' slots — are dropped slots on every
    backend (``MOE_KERNELS_CHECK_VALUES=1`` makes them an error instead). Or a routing map (TransformerEngine,
    Megatron): ``topk_ids`` a ``[T, E]`` bool mask, taken as ``k = E`` slots per token, slot ``t*E + e``
    being (token t, expert e); rows then come by expert and, within one, by token, as TE's ``moe_permute``,
    and a ``[T, E]`` probability tensor is the plan's ``topk_weights`` as it is (for ``permute``/``unpermute``).

    ``block_size`` pads every segment to a multiple of it. ``capacity``: an expert keeps at most that many
    slots, chosen by ``drop_policy``: ``"gshard"`` (first choices of all tokens before second choices,
    earlier tokens first), ``"position"`` (its slots in token order: MegaBlocks, Megatron ``position``) or
    ``"probs"`` (its highest-weight slots, from ``topk_weights`` [T, k]; NaN as -inf, ties to the lower slot:
    Megatron ``probs``). ``expert_map`` [E_global] maps global ids to local ones (-1: not on this rank);
    ``num_experts`` is then the local count. ``num_out_tokens`` fixes the number of permuted rows ``P``
    (TE's ``moe_permute``): rows past it are dropped, missing ones are padding; by default
    ``P = T*k + E*(block_size-1)``.

    Example::

        >>> plan = plan_routing(torch.tensor([[1, 0], [1, 1]]), 2)
        >>> plan.sorted_slots.tolist(), plan.expert_offsets.tolist()
        ([1, 0, 2, 3], [0, 1, 4])
    """
    fn = "plan_routing"
    if isinstance(topk_ids, torch.Tensor) and topk_ids.dtype == torch.bool:
        topk_ids = _ids_of_routing_map(fn, topk_ids, num_experts, expert_map)
    _checks.check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=_checks.ID_DTYPES + (torch.bool,), layout="[T, k] (or a [T, E] bool routing map)")
    _checks.check_top_k(fn, "topk_ids", topk_ids)
    _checks.check_int(fn, "num_experts", num_experts, lo=1)
    _checks.check_int(fn, "block_size", block_size, lo=1)
    _checks.check_choice(fn, "drop_policy", drop_policy, ref.DROP_POLICIES)
    if capacity is not None:
        _checks.check_int(fn, "capacity", capacity, lo=0)
    if num_out_tokens is not None:
        _checks.check_int(fn, "num_out_tokens", num_out_tokens, lo=0)
    T, k = topk_ids.shape
    if topk_weights is not None:
        _checks.check_tensor(fn, "topk_weights", topk_weights, dtypes=_checks.FLOAT_DTYPES, shape=(T, k), layout="[T, k]")
        _checks.check_same_device(fn, topk_ids=topk_ids, topk_weights=topk_weights)
    if capacity is not None and drop_policy == "probs" and topk_weights is None:
        raise ValueError(f"{fn}: drop_policy='probs' ranks slots by their routing weight: give topk_weights [T, k]")
    n_ids = num_experts
    if expert_map is not None:
        _checks.check_tensor(fn, "expert_map", expert_map, ndim=1, dtypes=_checks.ID_DTYPES, layout="[E_global]")
        _checks.check_same_device(fn, topk_ids=topk_ids, expert_map=expert_map)
        _checks.check_expert_ids(fn, "expert_map", expert_map, num_experts)
        n_ids = expert_map.shape[0]
    _checks.check_expert_ids(fn, "topk_ids", topk_ids, n_ids)
    rows = T * k + num_experts * (block_size - 1)
    if _checks.known_true(rows >= 2**31):
        raise ValueError(f"{fn}: T*k + E*(block_size-1) = {rows} rows overflow int32 row indices")
    _checks.check_symbolic(rows < 2**31, f"{fn}: T*k + E*(block_size-1) rows overflow int32 row indices")
    if capacity is not None and drop_policy != "gshard":
        topk_ids = _capacity_drop(fn, topk_ids, num_experts, capacity, drop_policy, topk_weights, expert_map, backend)
        capacity = None
    impl = _backends.select(fn, backend, topk_ids.device, topk_ids, num_experts)
    slots, offsets, tokens, slot_to_row = impl(topk_ids, num_experts, block_size, capacity, expert_map)
    plan = RoutingPlan(slots, offsets, tokens, slot_to_row, T, k, num_experts, block_size)
    return plan if num_out_tokens is None else _with_num_rows(plan, num_out_tokens)


def _ids_of_routing_map(fn: str, routing_map: torch.Tensor, num_experts: int, expert_map) -> torch.Tensor:
    """A ``[T, E]`` bool routing map as ``[T, E]`` ids: e where the map is True, else -1."""
    n = expert_map.shape[0] if isinstance(expert_map, torch.Tensor) and expert_map.dim() == 1 else num_experts
    _checks.check_tensor(fn, "topk_ids", routing_map, ndim=2, shape=(None, n),
                         layout=f"[T, E={n}] bool routing map ({'E_global of expert_map' if expert_map is not None else 'num_experts'} columns)")
    experts = torch.arange(routing_map.shape[1], dtype=torch.int32, device=routing_map.device)
    return torch.where(routing_map, experts, -1)


def _capacity_drop(fn, topk_ids, num_experts, capacity, drop_policy, topk_weights, expert_map, backend):
    """``topk_ids`` (int32) with -1 for the slots over capacity under ``drop_policy``, on ``backend``."""
    try:
        impl = _backends.select("capacity_drop", backend, topk_ids.device, topk_ids, num_experts)
    except ValueError as exc:
        raise ValueError(f"{fn}: drop_policy={drop_policy!r} cannot be served by backend {backend!r} "
                         f"(only 'gshard' is part of its plan kernel): {exc}") from None
    return impl(topk_ids, num_experts, capacity, drop_policy, topk_weights, expert_map)


def _with_num_rows(plan: RoutingPlan, n: int) -> RoutingPlan:
    """``plan`` with exactly ``n`` permuted rows: rows from ``n`` on are dropped (their slots leave the plan),
    missing rows are padding (TE's ``num_out_tokens``)."""
    slots = torch.cat([plan.sorted_slots, plan.sorted_slots.new_full((n,), -1)])[:n]  # no branch on P
    offsets = plan.expert_offsets.clamp(max=n)
    ends = torch.minimum(plan.expert_offsets[:-1] + plan.tokens_per_expert, offsets[1:])
    tokens = (ends - offsets[:-1]).clamp(min=0)
    slot_to_row = torch.where(plan.slot_to_row < n, plan.slot_to_row, -1)
    return dataclasses.replace(plan, sorted_slots=slots, expert_offsets=offsets, tokens_per_expert=tokens,
                               slot_to_row=slot_to_row)


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
    """``values[index]`` where ``index >= 0``, else 0; differentiable in ``values`` (connected even when
    ``values`` is empty), without a branch on the sizes."""
    padded = torch.cat([values, values.new_zeros(1)])  # index -1 reads the appended zero
    return padded.index_select(0, torch.where(index >= 0, index.long(), values.shape[0]))


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
