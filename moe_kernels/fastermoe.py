"""FasterMoE (He et al., PPoPP 2022) on :class:`~moe_kernels.distributed.ExpertParallel`: dynamic shadowing and
smart scheduling of the expert-parallel layer.

- **Shadowing** (``ExpertParallel(group, E, shadow=n)``): the per-(rank, chunk, expert) row counts are exchanged
  once, with one all-gather that replaces the dispatch's all-to-all of counts, so every rank knows the global load.
  The ``n`` most loaded experts (ties to the lower id; experts with no rows are never shadowed) have their weights
  broadcast from their owner to every rank, and every rank computes its own tokens for them locally; only the
  other slots cross the links. ``shadow_policy="bytes"`` shadows only experts whose rows from other ranks move more
  bytes than their weights (:func:`shadow_pays`), FasterMoE's rule of shadowing where it pays. In the backward, each shadowed expert's weight gradients are summed back to its
  owner (one reduce per expert). Worth it when an expert's rows outweigh its weights: a hot expert.
- **Smart scheduling** (``chunks=c``): this rank's tokens are split into ``c`` contiguous chunks; all dispatch
  all-to-alls are issued asynchronously, then for each chunk in turn the rank waits for its rows, runs the
  grouped GEMMs and issues its combine all-to-all asynchronously, so the exchange of one chunk overlaps the
  GEMMs of another. The backward runs the same pipeline in reverse. Every rank uses the same ``c``.

Both keep the one host synchronisation of the exact path (the split sizes and the shadowed set are read in
one ``.tolist()``) and give the plain path's result up to summation order: the shadowed slots' part and the
exchanged part are summed once more at the end (in the activations' dtype). Deterministic: every order is fixed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _alloc
from .gating import expert_counts
from .gemm import grouped_gemm
from .moe import fused_moe
from .routing import permute, plan_routing, unpermute

__all__ = ["faster_experts", "shadow_choice", "shadow_pays"]


def shadow_choice(load: torch.Tensor, n: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """The ``n`` most loaded experts of a global load ``[E]``: ``[n]`` int64 ids, most loaded first, ties to the
    lower id, -1 where fewer than ``n`` experts have any load (or are ``eligible [E]``). On the device (no sync)."""
    load = load.to(torch.int64)
    if eligible is not None:
        load = torch.where(eligible, load, 0)
    order = torch.sort(-load, stable=True).indices[:n]  # [n]
    return torch.where(load.index_select(0, order) > 0, order, -1)


def shadow_pays(gathered: torch.Tensor, num_local: int, row_bytes: int, expert_bytes: int) -> torch.Tensor:
    """``[E]`` bool: experts whose rows from other ranks (``gathered [W, c, E]`` counts) move more bytes than
    broadcasting the expert: ``2 * rows * row_bytes > (W-1) * expert_bytes`` (dispatch and combine saved against the
    broadcast; the backward doubles both sides). FasterMoE's cost model, with bytes for time."""
    W, E = gathered.shape[0], gathered.shape[2]
    owner = torch.arange(E, device=gathered.device) // num_local  # [E]
    per_rank = gathered.sum(1)  # [W, E]
    remote = per_rank.sum(0) - per_rank.gather(0, owner[None]).squeeze(0)  # [E] rows from non-owners
    return 2 * remote * row_bytes > (W - 1) * expert_bytes


def _global_rank(group, r: int) -> int:
    return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)


class _Shadow(torch.autograd.Function):
    """Broadcast the shadowed experts' weights from their owners; backward: reduce their gradients to the owners.

    ``info = (ep, shadowed)`` with at least one shadowed expert; ``params``: this rank's local expert tensors ``[E/W, ...]`` (w13, w2, biases); returns one ``[n, ...]`` stack per
    tensor. Every rank takes part (the local tensors are inputs everywhere), so every rank runs the backward."""

    @staticmethod
    def forward(ctx, info, *params):
        ep, shadowed = info
        ctx.info = info
        sizes = [p[0].numel() for p in params]
        out = []
        for e in shadowed:
            owner, local = divmod(e, ep.num_local_experts)
            if owner == ep.rank:
                flat = torch.cat([p[local].reshape(-1) for p in params])
            else:
                flat = _alloc.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
            dist.broadcast(flat, _global_rank(ep.group, owner), group=ep.group)
            out.append(flat)
        flat = torch.stack(out)  # [n, sum sizes]
        return tuple(t.reshape(len(shadowed), *p.shape[1:]).clone() for t, p in zip(flat.split(sizes, 1), params))

    @staticmethod
    def backward(ctx, *grads):
        ep, shadowed = ctx.info
        flat = torch.cat([g.reshape(len(shadowed), -1) for g in grads], 1)  # [n, sum sizes]
        sizes = [g[0].numel() for g in grads]
        out = [g.new_zeros(ep.num_local_experts, *g.shape[1:]) for g in grads]
        for i, e in enumerate(shadowed):
            owner, local = divmod(e, ep.num_local_experts)
            g = flat[i].contiguous()
            dist.reduce(g, _global_rank(ep.group, owner), op=dist.ReduceOp.SUM, group=ep.group)
            if owner == ep.rank:
                for o, part in zip(out, g.split(sizes)):
                    o[local] = part.view(o.shape[1:])
        return (None, *out)


def _local_experts(ep, recv, recv_counts, params, activation, gated, has_b13, has_b2, be):
    """The local experts on rows received source-major (counts ``[W, E/W]``), back in receive order."""
    W, El = ep.world_size, ep.num_local_experts
    w13, w2, rest = params[0], params[1], list(params[2:])
    b13 = rest.pop(0) if has_b13 else None
    b2 = rest.pop(0) if has_b2 else None
    experts = torch.arange(El, device=recv.device).repeat(W) + ep.first_expert  # [W*El] global ids
    ids = torch.repeat_interleave(experts, recv_counts.reshape(-1), output_size=recv.shape[0])
    plan = plan_routing(ids[:, None], El, expert_map=ep.expert_map(recv.device), backend=be)
    h = grouped_gemm(permute(recv, plan, backend=be), w13, plan, bias=b13, backend=be)
    a = torch.ops.moe_kernels.activation(h, activation, gated)
    y = grouped_gemm(a, w2, plan, bias=b2, backend=be)
    return unpermute(y, plan, backend=be)  # [R, N]


def _a2a_async(x, out_splits, in_splits, group):
    out = _alloc.empty(sum(out_splits), *x.shape[1:], dtype=x.dtype, device=x.device)
    return out, dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)


class _Pipeline(torch.autograd.Function):
    """Dispatch, local experts and combine of ``c`` chunks, pipelined with asynchronous all-to-alls.

    ``send_rows`` [sum of rows sent, H]: the chunks' rows in send order, chunk after chunk; returns the expert
    outputs of those rows ``[same, N]``, in the same order. The expert graph of each chunk is built in the forward
    and differentiated in the backward (no recompute)."""

    @staticmethod
    def forward(ctx, info, send_rows, *params):
        ep, send, recv, recv_counts, cfg = info
        group = ep.group
        grad = any(ctx.needs_input_grad)
        chunks = send_rows.split([sum(s) for s in send])
        inbox = [_a2a_async(c, r, s, group) for c, r, s in zip(chunks, recv, send)]  # every dispatch in flight
        graphs, outbox = [], []
        for i, (rows, work) in enumerate(inbox):
            work.wait()
            with torch.enable_grad():
                r = rows.detach().requires_grad_(grad)
                ps = [p.detach().requires_grad_(grad) for p in params]
                y = _local_experts(ep, r, recv_counts[i], ps, *cfg)
            graphs.append((r, ps, y))
            outbox.append(_a2a_async(y.detach(), send[i], recv[i], group))  # combine of chunk i, while i+1 computes
        for _, work in outbox:
            work.wait()
        ctx.info, ctx.graphs = info, graphs
        return torch.cat([o for o, _ in outbox])

    @staticmethod
    def backward(ctx, grad_out):
        ep, send, recv, _, _ = ctx.info
        group = ep.group
        chunks = grad_out.split([sum(s) for s in send])
        inbox = [_a2a_async(g, r, s, group) for g, r, s in zip(chunks, recv, send)]  # output grads to the experts
        param_grads = [torch.zeros_like(p) for p in ctx.graphs[0][1]]
        outbox = []
        for (g, work), (r, ps, y) in zip(inbox, ctx.graphs):
            work.wait()
            grads = torch.autograd.grad(y, [r, *ps], g, allow_unused=True)
            for acc, d in zip(param_grads, grads[1:]):
                if d is not None:
                    acc += d
            gx = grads[0] if grads[0] is not None else torch.zeros_like(r)
            outbox.append(_a2a_async(gx, send[len(outbox)], recv[len(outbox)], group))  # input grads back home
        for _, work in outbox:
            work.wait()
        ctx.graphs = None
        return (None, torch.cat([o for o, _ in outbox]), *param_grads)


def faster_experts(ep, hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias, be):
    """:meth:`ExpertParallel.experts` with shadowing and/or chunked pipelining: ``(out [T, H], EPTraffic)``."""
    from .distributed import EPTraffic

    W, El, E, c = ep.world_size, ep.num_local_experts, ep.num_experts, ep.chunks
    T = hidden.shape[0]
    device = hidden.device
    bounds = [T * i // c for i in range(c + 1)]  # chunk i holds tokens [bounds[i], bounds[i+1])
    ids = [topk_ids[bounds[i]:bounds[i + 1]] for i in range(c)]
    counts = torch.stack([expert_counts(i, E, backend=be) for i in ids]).to(torch.int64)  # [c, E]
    # One exchange of the counts: every rank learns every (rank, chunk, expert) count.
    everyone = [torch.empty_like(counts) for _ in range(W)]
    dist.all_gather(everyone, counts.contiguous(), group=ep.group)
    gathered = torch.stack(everyone)  # [W, c, E]
    params = [w13, w2] + [b for b in (w13_bias, w2_bias) if b is not None]
    eligible = None
    if ep.shadow_policy == "bytes":
        eligible = shadow_pays(gathered, El, hidden.shape[1] * hidden.element_size(),
                               sum(p[0].numel() for p in params) * w13.element_size())
    shadowed = shadow_choice(gathered.sum((0, 1)), ep.shadow, eligible) if ep.shadow else counts.new_zeros(0)
    is_shadow = torch.zeros(E + 1, dtype=torch.bool, device=device)
    is_shadow[torch.where(shadowed >= 0, shadowed, E)] = True  # -1 (no expert) lands on the extra entry
    is_shadow = is_shadow[:E]
    sent = torch.where(is_shadow, 0, gathered)  # [W, c, E] rows that cross the exchange
    send = sent[ep.rank].view(c, W, El).sum(-1)  # [c, W] rows this rank sends per chunk and destination
    mine = sent[:, :, ep.first_expert:ep.first_expert + El]  # [W, c, El] rows this rank receives
    host = torch.cat([shadowed, send.reshape(-1), mine.sum(-1).t().reshape(-1)]).tolist()  # the one host sync
    n = shadowed.shape[0]
    chosen = tuple(e for e in host[:n] if e >= 0)
    send_splits = [host[n + i * W:n + (i + 1) * W] for i in range(c)]
    recv_splits = [host[n + (c + i) * W:n + (c + i + 1) * W] for i in range(c)]
    recv_counts = mine.transpose(0, 1)  # [c, W, El]

    out = None
    weight_elems = 0
    if chosen:
        shadow_params = _Shadow.apply((ep, chosen), *params)
        slot = torch.full((E,), -1, dtype=torch.int64, device=device)
        slot[torch.tensor(chosen, device=device)] = torch.arange(len(chosen), device=device)
        local_ids = slot.index_select(0, topk_ids.reshape(-1).to(torch.int64).clamp(min=0)).view(topk_ids.shape)
        local_ids = torch.where(topk_ids >= 0, local_ids, -1)
        rest = list(shadow_params[2:])
        out = fused_moe(hidden, shadow_params[0], shadow_params[1], topk_weights, local_ids, activation=activation,
                        gated=gated, w13_bias=rest.pop(0) if w13_bias is not None else None,
                        w2_bias=rest.pop(0) if w2_bias is not None else None, backend=be)
        owned = sum(1 for e in chosen if e // El == ep.rank)
        weight_elems = owned * (W - 1) * sum(p[0].numel() for p in params)

    # The exchanged slots, chunk by chunk, in send order (by expert, hence by destination).
    ids_ep = [torch.where(is_shadow.index_select(0, i.reshape(-1).to(torch.int64).clamp(min=0)).view(i.shape), -1, i)
              for i in ids]
    plans = [plan_routing(i, E, backend=be) for i in ids_ep]
    rows = [permute(hidden[bounds[i]:bounds[i + 1]], p, backend=be)[: sum(send_splits[i])] for i, p in enumerate(plans)]
    cfg = (activation, gated, w13_bias is not None, w2_bias is not None, be)
    back = _Pipeline.apply((ep, send_splits, recv_splits, recv_counts, cfg), torch.cat(rows), *params)
    parts = back.split([sum(s) for s in send_splits])
    outs = []
    for i, (p, b) in enumerate(zip(plans, parts)):
        missing = p.num_rows - b.shape[0]  # rows of dropped and shadowed slots were not sent
        if missing:
            b = torch.cat([b, b.new_zeros(missing, b.shape[1])])
        w = topk_weights[bounds[i]:bounds[i + 1]]
        outs.append(unpermute(b, p, w, backend=be))
    routed = torch.cat(outs) if outs else hidden.new_zeros(0, w2.shape[1])
    out = routed if out is None else routed + out
    total = sum(sum(s) for s in send_splits)
    traffic = EPTraffic(total, total - sum(s[ep.rank] for s in send_splits), weight_elems, chosen)
    return out, traffic
