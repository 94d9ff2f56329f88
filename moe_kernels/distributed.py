"""Expert parallelism over ``torch.distributed``: send every (token, slot) row to the rank that owns its
expert, run the local experts, send the results back and combine them.

Rank ``r`` of a group of ``W`` ranks owns the contiguous block of experts ``[r*E/W, (r+1)*E/W)``.
:class:`ExpertParallel` moves rows with ``all_to_all_single`` (NCCL on GPUs, gloo on CPU); both
directions are differentiable (the backward of an all-to-all is the reverse all-to-all), and
the routing plans of :mod:`moe_kernels.routing` do every reordering, so the permutation kernels serve
here too. See ``docs/expert_parallel.md`` for the traffic and its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _alloc, _checks
from .gemm import grouped_gemm
from .routing import RoutingPlan, permute, plan_routing, unpermute

__all__ = ["EPHandle", "EPTraffic", "ExpertParallel"]


def _all_to_all(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group) -> torch.Tensor:
    """Rows ``[sum in_splits, ...]`` -> ``[sum out_splits, ...]``; equal splits when both are None."""
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = _alloc.empty(rows, *x.shape[1:], dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all of rows: the backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


@dataclass(frozen=True)
class EPHandle:
    """What :meth:`ExpertParallel.combine` needs to send results back: returned by ``dispatch``.

    ============== =========== ===================================================================
    field          shape       meaning
    ============== =========== ===================================================================
    plan           RoutingPlan the local rows grouped by local expert (for ``grouped_gemm``)
    send_plan      RoutingPlan this rank's (token, slot) pairs in send order (grouped by rank)
    topk_weights   [T, k]      routing weights applied by ``combine`` (None: 1)
    send_splits    list[int]   rows sent to each rank (None on the fixed-capacity path)
    recv_splits    list[int]   rows received from each rank (None on the fixed-capacity path)
    dropped        [] int64    rows this rank could not send: over capacity (0 without one)
    ============== =========== ===================================================================
    """

    plan: RoutingPlan
    send_plan: RoutingPlan
    topk_weights: torch.Tensor | None
    send_splits: list[int] | None
    recv_splits: list[int] | None
    dropped: torch.Tensor


@dataclass(frozen=True)
class EPTraffic:
    """What one rank sent in the forward of :meth:`ExpertParallel.experts` (host ints, known without a further sync).

    ``rows_sent``: activation rows sent (to itself included); ``rows_off_rank``: those sent to other ranks;
    ``weight_elements_sent``: expert weight elements this rank broadcast to the others (shadowing: one copy per
    receiving rank); ``shadowed``: the global ids of the experts shadowed in that step, most loaded first.
    Bytes off the rank: ``rows_off_rank * H * activation bytes + weight_elements_sent * weight bytes``; the
    backward moves the same again (shadowed gradients are reduced to their owners).
    """

    rows_sent: int
    rows_off_rank: int
    weight_elements_sent: int
    shadowed: tuple[int, ...]


def _comm_device(group) -> torch.device:
    """Where this group's collectives want their tensors: the current GPU for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ExpertParallel:
    """Dispatch of token rows to the ranks that own their experts, and the combine back.

    ``ExpertParallel(group, num_experts, capacity=None)``; ``group`` is a process group (None: the
    default one) of ``W`` ranks, ``num_experts`` the global E (divisible by W, equal on every rank) and
    ``capacity`` equal on every rank: checked with one all-gather, so construct it on every rank of the
    group. Rank r owns experts
    ``first_expert + [0, num_local_experts)`` = ``[r*E/W, (r+1)*E/W)``.

    Exchange: the per-expert row counts first (one all-to-all of ``E`` int64 per rank), then the rows
    (one all-to-all with uneven splits). The uneven split sizes must be on the host, so ``dispatch``
    synchronises once with the device to read them (``.tolist()``); this is its only host sync.

    ``capacity`` (an int) is the sync-free path: every rank sends exactly ``capacity`` rows to every
    rank (zero rows pad the rest), so the rows all-to-all has equal splits and the counts never leave
    the device; receivers read the counts to tell rows from padding. Rows past ``capacity`` for one
    destination are dropped (in send order: by expert, then token) and contribute 0 to ``combine``;
    ``handle.dropped`` counts them (read it when a sync is cheap). ``capacity = max_tokens * top_k``
    (``max_tokens``: the most tokens any rank passes) never drops; with distinct experts per token
    ``max_tokens * min(top_k, E/W)`` suffices.

    FasterMoE (He et al., PPoPP 2022; :mod:`moe_kernels.fastermoe`), for :meth:`experts` on the exact path:
    ``shadow=n`` broadcasts the ``n`` most loaded experts of each step (from the counts exchanged anyway, with one
    all-gather instead of the counts all-to-all) to every rank, computes every rank's tokens for them locally and
    sums their weight gradients back to the owner; ``shadow_policy="bytes"`` keeps only those whose rows from
    other ranks outweigh their weights. ``chunks=c`` pipelines the dispatch all-to-all, the expert GEMMs and the
    combine all-to-all over ``c`` chunks of tokens with asynchronous collectives. ``last_traffic``
    (:class:`EPTraffic`) says what the last :meth:`experts` call sent. ``shadow``, ``chunks`` and ``shadow_policy``
    must be equal on every rank (checked with the same all-gather).

    Every rank must call ``dispatch`` and ``combine`` (and their backward) in the same order, as with
    any collective; a rank with no tokens passes ``T = 0`` tensors.

    Example::

        >>> ep = ExpertParallel(None, num_experts=8)                     # on every rank
        >>> rows, handle = ep.dispatch(x, topk_ids, topk_weights)          # [P, H], local experts
        >>> y = grouped_gemm(rows, w_local, handle.plan)                  # w_local [E/W, H, H]
        >>> out = ep.combine(y, handle)                                    # [T, H]
    """

    def __init__(self, group, num_experts: int, *, capacity: int | None = None, shadow: int = 0, chunks: int = 1,
                 shadow_policy: str = "load", backend: str = "auto"):
        fn = "ExpertParallel"
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{fn}: torch.distributed is not initialised; call torch.distributed.init_process_group first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = _comm_device(group)
        # Every rank takes part in the all-gather before any rank may raise, so a bad argument never hangs a
        # peer; -2 stands for an invalid value, -1 for no capacity.
        def is_int(v, lo):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        ok_e, ok_s, ok_k = is_int(num_experts, 1), is_int(shadow, 0), is_int(chunks, 1)
        ok_c = capacity is None or is_int(capacity, 0)
        policies = ("load", "bytes")
        policy = policies.index(shadow_policy) if shadow_policy in policies else -2
        mine = torch.tensor([num_experts if ok_e else -2, (-1 if capacity is None else capacity) if ok_c else -2,
                             shadow if ok_s else -2, chunks if ok_k else -2, policy], dtype=torch.int64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=group)
        _checks.check_int(fn, "num_experts", num_experts, lo=1)
        if capacity is not None:
            _checks.check_int(fn, "capacity", capacity, lo=0)
        _checks.check_int(fn, "shadow", shadow, lo=0, hi=num_experts)
        _checks.check_int(fn, "chunks", chunks, lo=1)
        _checks.check_choice(fn, "shadow_policy", shadow_policy, policies)
        seen_e, seen_c, seen_s, seen_k, seen_p = torch.stack(everyone).t().tolist()
        for name, seen in (("shadow", seen_s), ("chunks", seen_k), ("shadow_policy", seen_p)):
            if len(set(seen)) > 1:
                raise ValueError(f"{fn}: ranks disagree on {name} (rank i passed the i-th of {seen}, -2: invalid); "
                                 "every rank must pass the same one")
        if capacity is not None and (shadow or chunks > 1):
            raise ValueError(f"{fn}: shadow={shadow} and chunks={chunks} need the exact path (capacity=None), "
                             f"got capacity={capacity}")
        if len(set(seen_e)) > 1:
            raise ValueError(f"{fn}: ranks disagree on num_experts (rank i passed the i-th of {seen_e}, -2: invalid); "
                             "every rank must pass the same E")
        if len(set(seen_c)) > 1:
            raise ValueError(f"{fn}: ranks disagree on capacity (rank i passed the i-th of {seen_c}, -1: None, "
                             "-2: invalid); every rank must pass the same one")
        if num_experts % self.world_size:
            raise ValueError(f"{fn}: num_experts={num_experts} is not divisible by the world size {self.world_size}; "
                             "every rank must own the same number of experts")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size
        self.first_expert = self.rank * self.num_local_experts
        self.capacity = capacity
        self.shadow, self.chunks, self.shadow_policy = shadow, chunks, shadow_policy
        self.last_traffic = None  # EPTraffic of the last experts() call
        self.backend = backend
        local = torch.arange(num_experts, dtype=torch.int32, device=self.device) - self.first_expert
        expert_map = torch.where((local >= 0) & (local < self.num_local_experts), local, -1)  # [E] global -> local
        self._expert_maps = {self.device: expert_map}  # per device: copied once, not on every dispatch

    @classmethod
    def of(cls, group_or_ep, num_experts: int, *, shadow: int = 0) -> ExpertParallel:
        """``group_or_ep`` itself when it is an :class:`ExpertParallel` for ``num_experts`` (and ``shadow``, unless 0),
        else a new one on that group."""
        if isinstance(group_or_ep, cls):
            if group_or_ep.num_experts != num_experts:
                raise ValueError(f"ExpertParallel: built for num_experts={group_or_ep.num_experts}, used with {num_experts}")
            if shadow and shadow != group_or_ep.shadow:
                raise ValueError(f"ExpertParallel: built with shadow={group_or_ep.shadow}, used with shadow={shadow}; "
                                 "pass shadow to the ExpertParallel")
            return group_or_ep
        return cls(group_or_ep, num_experts, shadow=shadow)

    def expert_map(self, device: torch.device | None = None) -> torch.Tensor:
        """``[E]`` int32: the local index of each global expert, -1 for experts of other ranks."""
        device = torch.device(device or self.device)
        if device not in self._expert_maps:
            self._expert_maps[device] = self._expert_maps[self.device].to(device)
        return self._expert_maps[device]

    def __repr__(self) -> str:
        return (f"ExpertParallel(rank={self.rank}/{self.world_size}, experts=[{self.first_expert}, "
                f"{self.first_expert + self.num_local_experts}) of {self.num_experts}, capacity={self.capacity}, "
                f"shadow={self.shadow}, chunks={self.chunks})")

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor | None = None, *,
                 backend: str | None = None):
        """Send every kept (token, slot) row to its expert's rank: ``(local_rows, handle)``.

        ============= ======= ==================================================================
        argument      shape   meaning
        ============= ======= ==================================================================
        hidden        [T, H]  this rank's tokens (any float dtype); T may differ between ranks, or be 0
        topk_ids      [T, k]  global expert ids in [0, E), -1 = dropped (int32/int64)
        topk_weights  [T, k]  routing weights, kept in the handle for ``combine`` (optional)
        local_rows    [P, H]  rows for this rank's experts, grouped by local expert: rows of
                              ``handle.plan``; P = rows received (capacity path: ``W * capacity``,
                              unused rows at the end are zero)
        ============= ======= ==================================================================

        Within one local expert, rows come by source rank, then token, then slot (deterministic).
        Differentiable in ``hidden``. ``backend`` (default: the constructor's) runs the plans and permutations.
        """
        fn = "ExpertParallel.dispatch"
        f = _checks.FLOAT_DTYPES
        _checks.check_tensor(fn, "hidden", hidden, ndim=2, dtypes=f, layout="[T, H]")
        T = hidden.shape[0]
        _checks.check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=_checks.ID_DTYPES, shape=(T, None), layout="[T, k]")
        k = _checks.check_top_k(fn, "topk_ids", topk_ids)
        if topk_weights is not None:
            _checks.check_tensor(fn, "topk_weights", topk_weights, dtypes=f, shape=(T, k), layout="[T, k]")
        device = _checks.check_same_device(fn, hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights)
        if self.device.type == "cuda" and device.type != "cuda":
            raise ValueError(f"{fn}: the group's backend {dist.get_backend(self.group)} exchanges {self.device.type} "
                             f"tensors, got hidden on {device}")
        _checks.check_expert_ids(fn, "topk_ids", topk_ids, self.num_experts)
        # Sending order: grouped by global expert, hence by destination rank (stable: token, then slot).
        be = backend or self.backend
        plan = plan_routing(topk_ids, self.num_experts, backend=be)
        counts = plan.tokens_per_expert.to(torch.int64)  # [E]
        if self.capacity is None:
            return self._dispatch_exact(hidden, topk_weights, plan, counts, be)
        return self._dispatch_capacity(hidden, topk_ids, topk_weights, plan, counts, be)

    def _dispatch_exact(self, hidden, topk_weights, plan, counts, be):
        W, El = self.world_size, self.num_local_experts
        recv_counts = _all_to_all(counts, None, None, self.group).view(W, El)  # [W sources, El experts]
        sizes = torch.stack([counts.view(W, El).sum(1), recv_counts.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = sizes
        rows = permute(hidden, plan, backend=be)  # [T*k, H]; kept rows first
        recv = _AllToAll.apply(rows[: sum(send_splits)], recv_splits, send_splits, self.group)  # [R, H]
        experts = torch.arange(El, device=hidden.device).repeat(W) + self.first_expert  # [W*El] global ids
        recv_ids = torch.repeat_interleave(experts, recv_counts.reshape(-1), output_size=recv.shape[0])
        return self._group_local(recv, recv_ids, plan, topk_weights, send_splits, recv_splits, counts.new_zeros(()), be)

    def _dispatch_capacity(self, hidden, topk_ids, topk_weights, plan, counts, be):
        W, El, C = self.world_size, self.num_local_experts, self.capacity
        device = hidden.device
        offsets = plan.expert_offsets.to(torch.int64)  # [E+1]
        base = offsets[: self.num_experts : El]  # [W] first sorted row of each destination
        sent = (offsets[El::El] - base).clamp(max=C)  # [W] rows kept per destination
        # Kept rows per expert: the first C rows of each destination's block.
        before = offsets[:-1] - base.repeat_interleave(El)  # [E] rows ahead of expert e in its block
        kept = (C - before).clamp(min=0).minimum(counts)  # [E]
        recv_counts = _all_to_all(kept, None, None, self.group).view(W, El)
        # Padded send layout: destination r owns rows [r*C, (r+1)*C), its kept rows first.
        pos = torch.arange(W * C, device=device)
        r, p = pos // C, pos % C
        valid = p < sent[r]
        src = (base[r] + p).clamp(max=max(plan.num_rows - 1, 0))
        slots = plan.sorted_slots.index_select(0, src) if plan.num_rows else pos.new_full((W * C,), -1)
        slots = torch.where(valid, slots.to(torch.int64), -1)
        row = plan.slot_to_row.to(torch.int64)  # [T*k]
        dest = topk_ids.reshape(-1).to(torch.int64).clamp(0, self.num_experts - 1) // El  # dropped ids: row -1 below
        p_slot = row - base[dest]
        slot_to_row = torch.where((row >= 0) & (p_slot < C), dest * C + p_slot, -1)
        send_plan = RoutingPlan(slots.to(torch.int32), (torch.arange(W + 1, device=device) * C).to(torch.int32),
                                sent.to(torch.int32), slot_to_row.to(torch.int32), plan.num_tokens, plan.top_k, W)
        recv = _AllToAll.apply(permute(hidden, send_plan, backend=be), None, None, self.group)  # [W*C, H]
        # Received row p of source s belongs to local expert e when cum[s, e-1] <= p < cum[s, e].
        cum = recv_counts.cumsum(1)  # [W, El]
        e = torch.searchsorted(cum, torch.arange(C, device=device).expand(W, C).contiguous(), right=True)  # [W, C]
        recv_ids = torch.where(e < El, e + self.first_expert, -1).reshape(-1)
        dropped = (counts.sum() - kept.sum()).reshape(())
        return self._group_local(recv, recv_ids, send_plan, topk_weights, None, None, dropped, be)

    def _group_local(self, recv, recv_ids, send_plan, topk_weights, send_splits, recv_splits, dropped, be):
        """Group received rows (global expert ids ``recv_ids``, -1 = padding) by local expert."""
        local_plan = plan_routing(recv_ids[:, None], self.num_local_experts, expert_map=self.expert_map(recv.device),
                                  backend=be)
        rows = permute(recv, local_plan, backend=be)
        return rows, EPHandle(local_plan, send_plan, topk_weights, send_splits, recv_splits, dropped)

    def combine(self, local_out: torch.Tensor, handle: EPHandle, *, backend: str | None = None) -> torch.Tensor:
        """Send expert outputs back and sum each token's k slots with its routing weights: ``out [T, N]``.

        ``local_out`` [P, N]: one row per row of ``dispatch``'s ``local_rows`` (``handle.plan``'s rows).
        ``out[t] = sum_j w[t, j] * local_out[row of (t, j)]`` over kept slots, accumulated in fp32 in
        order j = 0..k-1 (deterministic, batch-invariant), in ``local_out``'s dtype. Differentiable in
        ``local_out`` and the routing weights. ``backend`` (default: the constructor's) runs the permutations.
        """
        fn = "ExpertParallel.combine"
        if not isinstance(handle, EPHandle):
            raise TypeError(f"{fn}: handle must be the EPHandle returned by dispatch, got {type(handle).__name__}")
        _checks.check_tensor(fn, "local_out", local_out, ndim=2, dtypes=_checks.FLOAT_DTYPES,
                             shape=(handle.plan.num_rows, None), layout="[P, N] (one row per dispatched row)")
        be = backend or self.backend
        back = unpermute(local_out, handle.plan, backend=be)  # [R, N] in receive order
        back = _AllToAll.apply(back, handle.send_splits, handle.recv_splits, self.group)  # [sent rows, N]
        missing = handle.send_plan.num_rows - back.shape[0]  # exact path: rows of dropped slots were not sent
        if missing:
            back = torch.cat([back, back.new_zeros(missing, back.shape[1])])
        return unpermute(back, handle.send_plan, handle.topk_weights, backend=be)

    def experts(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str = "silu",
        gated: bool = True,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        capacity: None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """``fused_moe`` across ranks: the same result, with this rank holding only its local experts.

        ``w13`` [E/W, 2I, H] (``[E/W, I, H]`` not gated), ``w2`` [E/W, H, I], biases [E/W, 2I] / [E/W, H];
        ``topk_ids`` are global. Differentiable in hidden, the local weights and biases and topk_weights.
        ``capacity`` (GShard token dropping, over global token counts) is not supported: pass None.
        ``backend`` (default: the constructor's) runs the GEMMs, plans and permutations.
        """
        fn = "ExpertParallel.experts"
        if capacity is not None:
            raise ValueError(f"{fn}: capacity (per-expert token dropping) is not supported with expert parallelism; "
                             "ExpertParallel(capacity=...) bounds the rows exchanged between ranks instead")
        El = self.num_local_experts
        _checks.check_tensor(fn, "w13", w13, ndim=3, layout="[E/W, 2I, H]")
        if w13.shape[0] != El or w2.shape[0] != El:
            raise ValueError(f"{fn}: w13 and w2 must hold the {El} local experts of this rank, got shapes "
                             f"{tuple(w13.shape)} and {tuple(w2.shape)}")
        be = backend or self.backend
        if self.shadow or self.chunks > 1:
            from .fastermoe import faster_experts

            out, self.last_traffic = faster_experts(self, hidden, w13, w2, topk_weights, topk_ids, activation, gated,
                                                    w13_bias, w2_bias, be)
            return out
        rows, handle = self.dispatch(hidden, topk_ids, topk_weights, backend=be)
        h = grouped_gemm(rows, w13, handle.plan, bias=w13_bias, backend=be)
        a = torch.ops.moe_kernels.activation(h, activation, gated)
        y = grouped_gemm(a, w2, handle.plan, bias=w2_bias, backend=be)
        if handle.send_splits is not None:
            sent = handle.send_splits
            self.last_traffic = EPTraffic(sum(sent), sum(sent) - sent[self.rank], 0, ())
        return self.combine(y, handle, backend=be)
