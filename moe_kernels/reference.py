"""Pure-PyTorch reference of every moe_kernels op.

This is the ``torch`` backend: what CPU users run, what GPU users fall back to, and what every fast
kernel is checked against. It is vectorised over tokens (loops run over experts or over the k
slots only) and keeps to plain tensor ops so that it reads in a minute.

Conventions shared by all functions here:
- ``T`` tokens, ``k`` slots per token, ``E`` experts, ``S = T*k`` slots; slot ``t*k + j`` is the
  j-th choice of token t. ``P`` permuted rows (padding included).
- Arithmetic that the contract puts in fp32 runs in ``promote(dtype, float32)``: fp32 for 16/32-bit
  inputs and fp64 for fp64 inputs, so a float64 run of the reference is a float64 reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._alloc import empty

GATED_ACTIVATIONS = ("silu", "gelu", "relu", "swiglu_oai")
PLAIN_ACTIVATIONS = ("silu", "gelu", "relu")
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ----- gating ---------------------------------------------------------------------------------------


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    x = logits.to(acc_dtype(logits.dtype))
    return torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)


NAN_MONO = -(2**31) + 1  # the order key of a NaN: below -inf
KEY_EXCLUDED = -(2**63) + 1  # the order key of an entry outside the allowed set


def stable_topk_indices(values: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k largest entries per row, best first, ties to the lower index.

    NaN ranks below every number (-inf included), and entries where ``allowed`` is False rank below
    every allowed one. fp32 values become unique int64 keys (the fp32 bits mapped to a monotone int32,
    then the reversed column), so one ``topk`` gives that exact order, as the kernels do; other dtypes
    take two stable sorts (lexicographic: allowed, not NaN, value, index).
    """
    nan = torch.isnan(values)
    n = values.shape[-1]
    if values.dtype == torch.float32 and n < 2**32:
        bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ties with +0.0
        mono = torch.where(nan, NAN_MONO, bits ^ ((bits >> 31) & 0x7FFFFFFF))
        key = (mono << 32) | (n - 1 - torch.arange(n, device=values.device))
        if allowed is not None:
            key = torch.where(allowed, key, KEY_EXCLUDED)
        return key.topk(k, dim=-1).indices
    order = torch.sort(torch.where(nan, float("-inf"), values), dim=-1, descending=True, stable=True).indices
    rank_class = (~nan).to(torch.int8) + (2 * allowed.to(torch.int8) if allowed is not None else 0)
    first = torch.sort(rank_class.gather(-1, order), dim=-1, descending=True, stable=True).indices
    return order.gather(-1, first)[..., :k]


SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORES = ("max", "top2_sum", "topk_sum")
RENORM_EPS = 1e-20  # sigmoid / sqrtsoftplus renormalisation: w / (sum + eps), as Megatron and TE


def safe_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim under the non-finite rule: a NaN weighs 0 and is left out of the
    normaliser; when a row has +inf entries they share the mass equally (the limit of softmax) and
    the rest weigh 0; a row with neither a finite nor a +inf entry weighs 0 everywhere. Never 0/0.
    Rows of finite numbers get ``torch.softmax`` itself, bit for bit (what transformers and vLLM use)."""
    x = torch.where(torch.isnan(x), float("-inf"), x)
    m = x.amax(-1, keepdim=True)
    inf = x == float("inf")
    limit = inf.to(x.dtype) / inf.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)  # +inf rows; 0 on all -inf rows
    return torch.where(torch.isfinite(m), torch.softmax(x, -1), limit)


def scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Top-k gating scores in ``acc_dtype``: :func:`safe_softmax`, ``sigmoid`` or ``sqrt(softplus)``
    (DeepSeek-V4, Megatron/TE ``sqrtsoftplus``). Always finite: NaN logits score 0, +-inf logits are
    clamped to the largest finite fp32 value first (sigmoid 1 / 0, sqrtsoftplus ``sqrt(3.4e38)``), in
    every dtype, so that the float64 reference and the fp32 kernels agree."""
    x = logits.to(acc_dtype(logits.dtype))
    if scoring == "softmax":
        return safe_softmax(x)
    big = torch.finfo(torch.float32).max
    xc = x.clamp(-big, big)
    s = torch.sigmoid(xc) if scoring == "sigmoid" else F.softplus(xc).sqrt()
    return torch.where(torch.isnan(x), 0.0, s)


def group_top_n(group_score: str | None, has_bias: bool, top_k: int, topk_groups: int, group_size: int) -> int:
    """How many of a group's best selection scores its group score sums: ``"max"`` 1 (DeepSeek-V2),
    ``"top2_sum"`` 2 (DeepSeek-V3), ``"topk_sum"`` ``top_k // topk_groups`` (TE/Megatron). ``None``:
    ``"top2_sum"`` with a correction bias, else ``"max"``. Never more than the group holds."""
    if group_score is None:
        group_score = "top2_sum" if has_bias else "max"
    n = {"max": 1, "top2_sum": 2, "topk_sum": top_k // topk_groups}[group_score]
    return max(1, min(n, group_size))


def topk_gating(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    scaling_factor: float = 1.0,
    group_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing. Returns ``(topk_weights [T, k] fp32, topk_ids [T, k] int32)``.

    Selection by ``scores + bias``; NaN logits rank below every number (-inf included), so a NaN row
    still yields valid ids. A group's score is the sum of its ``group_n`` best selection scores
    (default :func:`group_top_n` ``(None, ...)``). Renormalised softmax weights are the softmax of
    the selected logits; sigmoid and sqrtsoftplus weights are divided by their sum plus 1e-20.
    """
    T, E = logits.shape
    x = logits.to(acc_dtype(logits.dtype))
    s = scores(logits, scoring)  # [T, E]
    sel = s if correction_bias is None else s + correction_bias.to(s.dtype)
    sel = torch.where(torch.isnan(x), float("nan"), sel)
    allowed = None
    if num_groups > 1:
        gs = E // num_groups
        n = group_n if group_n is not None else group_top_n(None, correction_bias is not None, top_k, topk_groups, gs)
        clean = torch.where(torch.isnan(sel), float("-inf"), sel)  # a group's score counts NaN as -inf
        group_score = clean.view(T, num_groups, gs).topk(n, dim=-1).values.sum(-1)  # [T, G]
        best_groups = stable_topk_indices(group_score, topk_groups)
        group_ok = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
        allowed = group_ok.repeat_interleave(gs, dim=1)  # [T, E]
    ids = stable_topk_indices(sel, top_k, allowed)  # [T, k]
    if renormalize and scoring == "softmax":
        w = safe_softmax(x.gather(1, ids))  # softmax of the selected logits: never 0/0
    else:
        w = s.gather(1, ids)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + RENORM_EPS)
    return w * scaling_factor, ids.to(torch.int32)


def balance_scores(s: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-token expert probabilities that the load-balancing loss averages: softmax scores as they
    are, sigmoid and sqrtsoftplus scores normalised per token."""
    return s if scoring == "softmax" else s / (s.sum(-1, keepdim=True) + RENORM_EPS)


def gating_stats(logits: torch.Tensor, topk_ids: torch.Tensor, scoring: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens_per_expert [E] int32, score_sums [E])``: slots per expert and the per-expert sum over
    tokens of :func:`balance_scores`, the two statistics of the load-balancing loss."""
    E = logits.shape[1]
    return expert_counts(topk_ids, E), balance_scores(scores(logits, scoring), scoring).sum(0)


def _softmax_backward(x: torch.Tensor, s: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """Backward of :func:`safe_softmax`: 0 on rows with a +inf entry (the scores are constant there)."""
    flat = (torch.where(torch.isnan(x), float("-inf"), x).amax(-1, keepdim=True) == float("inf"))
    return torch.where(flat, 0.0, s * (ds - (ds * s).sum(-1, keepdim=True)))


def _gating_score_backward(x: torch.Tensor, s: torch.Tensor, ds: torch.Tensor, scoring: str) -> torch.Tensor:
    """d loss / d logits from d loss / d :func:`scores`; 0 on non-finite logits."""
    if scoring == "softmax":
        return _softmax_backward(x, s, ds)
    if scoring == "sigmoid":
        return ds * s * (1 - s)
    dsp = torch.sigmoid(x) / (2 * torch.where(s > 0, s, 1.0))  # d sqrt(softplus(x)) / dx
    return torch.where(torch.isfinite(x) & (s > 0), ds * dsp, 0.0)


def _score_backward(s: torch.Tensor, ds: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return s * (ds - (ds * s).sum(-1, keepdim=True))
    return ds * s * (1 - s)


def topk_gating_backward(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    scoring: str,
    renormalize: bool,
    scaling_factor: float,
    grad_score_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """d loss / d logits from d loss / d topk_weights and, optionally, d loss / d score_sums of
    :func:`gating_stats` (the correction bias only selects, so it gets no gradient). A renormalised
    weight of k=1 is the constant 1: its gradient is exactly 0."""
    x = logits.to(acc_dtype(logits.dtype))
    s = scores(logits, scoring)
    ids = topk_ids.long()
    dw = grad_weights.to(s.dtype) * scaling_factor
    dx = torch.zeros_like(s)
    ds = torch.zeros_like(s)
    if renormalize and scoring == "softmax":  # w = softmax(x[ids])
        xs = x.gather(1, ids)
        w = safe_softmax(xs)
        dxs = _softmax_backward(xs, w, dw)
        dx = dx.scatter_add(1, ids, dxs)
    else:
        g = s.gather(1, ids)  # [T, k] unnormalised weights
        if renormalize:
            denom = g.sum(-1, keepdim=True) + RENORM_EPS
            dg = (dw - (dw * (g / denom)).sum(-1, keepdim=True)) / denom
        else:
            dg = dw
        ds = ds.scatter_add(1, ids, dg)
    if grad_score_sums is not None:
        dq = grad_score_sums.to(s.dtype)[None, :].expand_as(s)
        if scoring == "softmax":
            ds = ds + dq
        else:
            z = s.sum(-1, keepdim=True) + RENORM_EPS
            ds = ds + dq / z - (dq * s).sum(-1, keepdim=True) / z**2
    return (dx + _gating_score_backward(x, s, ds, scoring)).to(logits.dtype)


def expert_choice_gating(logits: torch.Tensor, capacity: int, scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing (Zhou et al., 2022): every expert takes its ``capacity`` best tokens.

    Returns ``(weights [E, C] fp32, token_ids [E, C] int32)``, best first, ties to the lower token;
    ``weights[e, c] = s[token, e]`` with ``s`` the per-token softmax (or sigmoid) scores. When C > T the
    extra entries hold token -1 and weight 0. NaN scores rank below every number.
    """
    T, E = logits.shape
    s = _scores(logits, scoring)  # [T, E]
    c_eff = min(capacity, T)
    tokens = stable_topk_indices(s.t(), c_eff)  # [E, c_eff]
    w = s.t().gather(1, tokens)
    pad = capacity - c_eff
    w = torch.cat([w, w.new_zeros(E, pad)], 1)
    tokens = torch.cat([tokens, tokens.new_full((E, pad), -1)], 1)
    return w, tokens.to(torch.int32)


def expert_choice_backward(grad_weights: torch.Tensor, logits: torch.Tensor, token_ids: torch.Tensor, scoring: str) -> torch.Tensor:
    """d loss / d logits from d loss / d weights of :func:`expert_choice_gating`."""
    T, E = logits.shape
    s = _scores(logits, scoring)
    valid = token_ids >= 0
    flat = torch.where(valid, token_ids.long() * E + torch.arange(E, device=logits.device)[:, None], T * E)
    ds = torch.zeros(T * E + 1, dtype=s.dtype, device=s.device)
    ds.index_add_(0, flat.reshape(-1), grad_weights.reshape(-1).to(s.dtype))
    return _score_backward(s, ds[: T * E].view(T, E), scoring).to(logits.dtype)


def expert_choice_plan(token_ids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing plan of an expert-choice decision, in :func:`plan_routing`'s format with ``k = E``.

    Slot ``t*E + e`` is (token t, expert e); expert e owns rows ``[e*C, (e+1)*C)`` in its own order;
    rows whose token is -1 are padding. Returns ``(sorted_slots [E*C], expert_offsets [E+1],
    tokens_per_expert [E], slot_to_row [T*E])``, all int32.
    """
    E, C = token_ids.shape
    T = num_tokens
    device = token_ids.device
    valid = token_ids >= 0
    experts = torch.arange(E, device=device)[:, None]
    slots = torch.where(valid, token_ids.long() * E + experts, -1).reshape(-1)  # [E*C]
    rows = torch.arange(E * C, device=device)
    slot_to_row = torch.full((T * E + 1,), -1, dtype=torch.int64, device=device)
    slot_to_row.scatter_(0, torch.where(slots >= 0, slots, T * E), torch.where(slots >= 0, rows, -1))
    offsets = torch.arange(E + 1, device=device) * C
    return slots.to(torch.int32), offsets.to(torch.int32), valid.sum(1).to(torch.int32), slot_to_row[: T * E].to(torch.int32)


# ----- routing plan, permute, unpermute --------------------------------------------------------------


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert ``[E]`` int32; ids outside [0, E) (such as -1) are not counted."""
    flat = topk_ids.reshape(-1).long()
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    return _bucket_counts(flat, num_experts + 1)[:num_experts].to(torch.int32)


def _bucket_counts(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Histogram of int64 keys in [0, n) without a data-dependent shape (unlike bincount)."""
    return torch.zeros(n, dtype=torch.int64, device=keys.device).scatter_add_(0, keys, torch.ones_like(keys))


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])


def plan_routing(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int = 1,
    capacity: int | None = None,
    expert_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable grouping of slots by expert.

    Returns ``(sorted_slots [P], expert_offsets [E+1], tokens_per_expert [E], slot_to_row [S])``, all
    int32, with ``P = S + E*(block_size-1)``. Dropped slots (id -1, unmapped by ``expert_map``, or
    over ``capacity``) get row -1; unused rows hold slot -1.
    """
    T, k = topk_ids.shape
    S, E = T * k, num_experts
    P = S + E * (block_size - 1)
    device = topk_ids.device
    ids = topk_ids.long()
    if expert_map is not None:
        n_global = expert_map.shape[0]
        if n_global == 0:
            ids = torch.full_like(ids, -1)
        else:
            inside = (ids >= 0) & (ids < n_global)
            ids = torch.where(inside, expert_map.long()[ids.clamp(0, n_global - 1)], -1)
    key = torch.where((ids >= 0) & (ids < E), ids, E)  # [T, k]; E = dropped
    if capacity is not None:
        # GShard: all first choices before all second choices, earlier tokens first.
        gshard = torch.arange(S, device=device).view(T, k).t().reshape(-1)  # pass position -> slot
        key = torch.where(capacity_ranks(key.reshape(-1), gshard, E).view(T, k) < capacity, key, E)
    flat = key.reshape(-1)  # [S]
    order = torch.sort(flat, stable=True).indices  # slot indices grouped by expert, by slot index
    counts = _bucket_counts(flat, E + 1)
    tokens = counts[:E]
    offsets = _exclusive_cumsum((tokens + block_size - 1) // block_size * block_size)  # [E+1]
    raw_starts = _exclusive_cumsum(counts)  # [E+2]
    expert_sorted = flat[order]
    kept = expert_sorted < E
    row = offsets[expert_sorted.clamp(max=E - 1)] + torch.arange(S, device=device) - raw_starts[expert_sorted]
    row = torch.where(kept, row, -1)
    slot_to_row = torch.empty(S, dtype=torch.int64, device=device).scatter_(0, order, row)
    sorted_slots = torch.full((P + 1,), -1, dtype=torch.int64, device=device)
    sorted_slots.scatter_(0, torch.where(kept, row, P), torch.where(kept, order, -1))
    return (
        sorted_slots[:P].to(torch.int32),
        offsets.to(torch.int32),
        tokens.to(torch.int32),
        slot_to_row.to(torch.int32),
    )


def capacity_ranks(key: torch.Tensor, order: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rank of every slot within its expert when the slots are taken in the pass order ``order``
    (``order[p]`` is the slot taken p-th): ``[S]`` int64; ``key [S]`` holds experts in [0, E], E = dropped."""
    S = key.shape[0]
    in_order = key[order]  # [S] expert of the p-th slot taken
    by_expert = torch.sort(in_order, stable=True).indices
    starts = _exclusive_cumsum(_bucket_counts(in_order, num_experts + 1))
    rank_in_order = torch.empty_like(in_order)
    rank_in_order[by_expert] = torch.arange(S, device=key.device) - starts[in_order[by_expert]]
    return torch.empty_like(rank_in_order).scatter_(0, order, rank_in_order)


DROP_POLICIES = ("gshard", "position", "probs")


def drop_order(drop_policy: str, top_k: int, topk_weights: torch.Tensor | None, num_slots: int, device) -> torch.Tensor:
    """The order in which experts fill their capacity, as slots ``[S]``: ``gshard`` all first choices,
    then all second choices (earlier tokens first); ``position`` slot order (token order);
    ``probs`` highest routing weight first (NaN as -inf; ties to the lower slot)."""
    if drop_policy == "position":
        return torch.arange(num_slots, device=device)
    if drop_policy == "gshard":
        return torch.arange(num_slots, device=device).view(-1, top_k).t().reshape(-1)
    w = topk_weights.reshape(-1)
    w = torch.where(torch.isnan(w), float("-inf"), w)
    return torch.sort(w, descending=True, stable=True).indices


def capacity_drop(
    topk_ids: torch.Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str,
    topk_weights: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """``topk_ids`` as int32 with -1 for every slot its expert has no room for: each (local) expert keeps
    its first ``capacity`` slots in :func:`drop_order`. Ids that are dropped anyway (outside ``[0, E)``, or
    unmapped) are returned as they are."""
    T, k = topk_ids.shape
    S, E = T * k, num_experts
    ids = topk_ids.long()
    local = ids
    if expert_map is not None:
        n_global = expert_map.shape[0]
        inside = (ids >= 0) & (ids < n_global)
        local = torch.where(inside, expert_map.long()[ids.clamp(0, max(n_global - 1, 0))], -1) if n_global else -torch.ones_like(ids)
    key = torch.where((local >= 0) & (local < E), local, E).reshape(-1)  # [S]
    rank = capacity_ranks(key, drop_order(drop_policy, k, topk_weights, S, ids.device), E)
    kept = (key == E) | (rank < capacity)
    return torch.where(kept.view(T, k), ids, -1).to(torch.int32)


def permute(
    x: torch.Tensor, sorted_slots: torch.Tensor, top_k: int, row_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Row r = ``w[slot] * x[slot // k]`` for ``slot = sorted_slots[r]`` (w = 1 if not given); zero where slot = -1."""
    valid = (sorted_slots >= 0)[:, None]
    if x.shape[0] == 0:
        return x.new_zeros(sorted_slots.shape[0], x.shape[1])
    rows = x.index_select(0, (sorted_slots.clamp(min=0) // top_k).long())
    if row_weights is not None:
        w = row_weights.reshape(-1).index_select(0, sorted_slots.clamp(min=0).long())
        rows = (rows.to(acc_dtype(x.dtype)) * w[:, None].to(acc_dtype(x.dtype))).to(x.dtype)
    return torch.where(valid, rows, torch.zeros((), dtype=x.dtype, device=x.device))


def unpermute(
    y_sorted: torch.Tensor, slot_to_row: torch.Tensor, top_k: int, topk_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``y[t] = sum_j w[t, j] * y_sorted[slot_to_row[t*k + j]]`` over kept slots, in fp32, j ascending."""
    T, N = slot_to_row.shape[0] // top_k, y_sorted.shape[1]
    acc = acc_dtype(y_sorted.dtype)
    out = torch.zeros(T, N, dtype=acc, device=y_sorted.device)
    if y_sorted.shape[0] == 0:
        return out.to(y_sorted.dtype)
    rows = slot_to_row.view(T, top_k).long()
    for j in range(top_k):
        v = y_sorted.index_select(0, rows[:, j].clamp(min=0)).to(acc)
        if topk_weights is not None:
            v = v * topk_weights[:, j, None].to(acc)
        out = out + torch.where((rows[:, j] >= 0)[:, None], v, 0.0)
    return out.to(y_sorted.dtype)


def slot_dots(rows: torch.Tensor, slot_to_row: torch.Tensor, per_token: torch.Tensor, top_k: int) -> torch.Tensor:
    """``d[t, j] = <rows[slot_to_row[t*k+j]], per_token[t]>`` in fp32 (0 for dropped slots); the
    gradient of a routing weight."""
    T = slot_to_row.shape[0] // top_k
    acc = acc_dtype(rows.dtype)
    if rows.shape[0] == 0 or T == 0:
        return torch.zeros(T, top_k, dtype=acc, device=rows.device)
    r = slot_to_row.view(T, top_k).long()
    picked = rows.index_select(0, r.clamp(min=0).reshape(-1)).view(T, top_k, -1).to(acc)
    d = torch.einsum("tjn,tn->tj", picked, per_token.to(acc))
    return torch.where(r >= 0, d, 0.0)


# ----- grouped GEMM ----------------------------------------------------------------------------------


def row_experts(expert_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert of every row ``[P]`` int64 (E for rows past the last segment)."""
    rows = torch.arange(num_rows, device=expert_offsets.device, dtype=expert_offsets.dtype)
    return torch.searchsorted(expert_offsets[1:].contiguous(), rows, right=True)


def row_mask(expert_offsets: torch.Tensor, num_rows: int, sorted_slots: torch.Tensor | None) -> torch.Tensor:
    """True for rows that hold a real slot: inside a segment and, given a plan, not padding."""
    rows = torch.arange(num_rows, device=expert_offsets.device)
    valid = rows < expert_offsets[-1].to(rows.dtype)
    return valid if sorted_slots is None else valid & (sorted_slots >= 0)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped_mm serves this call (no fp64; 16-byte aligned rows; bf16 on Hopper+ for CUDA)."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or x.shape[0] == 0:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    es = x.element_size()
    return all(d * es % 16 == 0 for d in (x.shape[1], w.shape[1], w.shape[2]))


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    sorted_slots: torch.Tensor | None = None,
    trans_w: bool = True,
) -> torch.Tensor:
    """Row r of segment e: ``x[r] @ w[e].T`` (``trans_w``, w ``[E, N, K]``) or ``x[r] @ w[e]`` (w ``[E, K, N]``),
    plus ``bias[e]``; rows outside every segment or of padding are zero."""
    P, E = x.shape[0], w.shape[0]
    wt = w.transpose(1, 2) if trans_w else w  # [E, K, N]
    if _grouped_mm_ok(x, w):
        y = F.grouped_mm(x.contiguous(), wt, offs=expert_offsets[1:].to(torch.int32))
    else:
        # Loop over experts: needs the offsets on the host (a sync on GPU; this is the fallback).
        y = empty(P, wt.shape[2], dtype=x.dtype, device=x.device)  # rows outside segments are masked below
        bounds = expert_offsets.tolist()
        for e in range(E):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                y[lo:hi] = x[lo:hi] @ wt[e]
    if bias is not None:
        rows_e = row_experts(expert_offsets, P).clamp(max=E - 1)
        y = y + bias.index_select(0, rows_e).to(y.dtype)
    return torch.where(row_mask(expert_offsets, P, sorted_slots)[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


def grouped_gemm_wgrad(
    a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor, sorted_slots: torch.Tensor | None = None
) -> torch.Tensor:
    """Per expert ``a_e^T @ b_e`` over the rows of its segment: ``[E, A, B]`` (0 for empty experts);
    with a plan's ``sorted_slots``, padding rows do not count (whatever either operand holds there)."""
    E = expert_offsets.shape[0] - 1
    if sorted_slots is not None:
        b = torch.where((sorted_slots >= 0)[:, None], b, torch.zeros((), dtype=b.dtype, device=b.device))
    out = empty(E, a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
    bounds = expert_offsets.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        out[e] = a[lo:hi].t() @ b[lo:hi]  # an empty segment gives zeros
    return out


def segment_sum(y: torch.Tensor, expert_offsets: torch.Tensor, sorted_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert sum of its segment's rows ``[E, N]``, accumulated in fp32 (padding rows excluded)."""
    E = expert_offsets.shape[0] - 1
    acc = acc_dtype(y.dtype)
    rows_e = row_experts(expert_offsets, y.shape[0])  # rows past the end go to bucket E
    if sorted_slots is not None:
        rows_e = torch.where(sorted_slots >= 0, rows_e, E)
    out = torch.zeros(E + 1, y.shape[1], dtype=acc, device=y.device).index_add_(0, rows_e, y.to(acc))
    return out[:E].to(y.dtype)


# ----- activation ------------------------------------------------------------------------------------


def _split(h: torch.Tensor, gated: bool, interleaved: bool = False):
    if not gated:
        return h.to(acc_dtype(h.dtype)), None
    if interleaved:  # columns (g0, u0, g1, u1, ...), gpt-oss
        return h[..., 0::2].to(acc_dtype(h.dtype)), h[..., 1::2].to(acc_dtype(h.dtype))
    inter = h.shape[-1] // 2
    return h[..., :inter].to(acc_dtype(h.dtype)), h[..., inter:].to(acc_dtype(h.dtype))


def _join(dg: torch.Tensor, du: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The inverse of :func:`_split` for gradients: ``[dg | du]``, or the two interleaved."""
    return torch.stack([dg, du], -1).flatten(-2) if interleaved else torch.cat([dg, du], -1)


def activation(h: torch.Tensor, kind: str, gated: bool = True, interleaved: bool = False) -> torch.Tensor:
    """``act(gate) * up`` on ``h = [gate | up]`` (gated; ``interleaved``: gate and up alternate in columns)
    or ``act(h)``; computed in fp32."""
    g, u = _split(h, gated, interleaved)
    if kind == "swiglu_oai":
        g, u = g.clamp(max=OAI_LIMIT), u.clamp(-OAI_LIMIT, OAI_LIMIT)
        return ((u + 1) * g * torch.sigmoid(OAI_ALPHA * g)).to(h.dtype)
    a = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[kind](g)
    return (a if u is None else a * u).to(h.dtype)


def activation_backward(
    grad: torch.Tensor, h: torch.Tensor, kind: str, gated: bool = True, interleaved: bool = False
) -> torch.Tensor:
    """d loss / d h from d loss / d activation(h)."""
    g, u = _split(h, gated, interleaved)
    da = grad.to(g.dtype)
    if kind == "swiglu_oai":
        gc, uc = g.clamp(max=OAI_LIMIT), u.clamp(-OAI_LIMIT, OAI_LIMIT)
        sg = torch.sigmoid(OAI_ALPHA * gc)
        dg = da * (uc + 1) * (sg + OAI_ALPHA * gc * sg * (1 - sg)) * (g <= OAI_LIMIT)
        du = da * gc * sg * ((u >= -OAI_LIMIT) & (u <= OAI_LIMIT))
        return _join(dg, du, interleaved).to(h.dtype)
    if kind == "silu":
        sg = torch.sigmoid(g)
        act, dact = g * sg, sg * (1 + g * (1 - sg))
    elif kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        act, dact = g * cdf, cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    else:
        act, dact = F.relu(g), (g > 0).to(g.dtype)
    if u is None:
        return (da * dact).to(h.dtype)
    return _join(da * u * dact, da * act, interleaved).to(h.dtype)


# ----- fused MoE -------------------------------------------------------------------------------------


def _moe_forward_parts(hidden, w13, w2, topk_weights, topk_ids, activation_kind, gated, w13_bias, w2_bias, on_input, capacity,
                       expert_map, interleaved=False):
    k = topk_ids.shape[1]
    slots, offsets, _, slot_to_row = plan_routing(topk_ids, w13.shape[0], 1, capacity, expert_map)
    xs = permute(hidden, slots, k, topk_weights if on_input else None)  # [P, H]
    h = grouped_gemm(xs, w13, offsets, w13_bias, slots)  # [P, 2I]
    a = activation(h, activation_kind, gated, interleaved)  # [P, I]
    ys = grouped_gemm(a, w2, offsets, w2_bias, slots)  # [P, H]
    return slots, offsets, slot_to_row, xs, h, a, ys


def fused_moe(
    hidden, w13, w2, topk_weights, topk_ids, activation_kind="silu", gated=True,
    w13_bias=None, w2_bias=None, apply_router_weight_on_input=False, capacity=None, expert_map=None,
    gate_up_interleaved=False,
):
    """The MoE layer's experts: plan, permute, two grouped GEMMs around the activation, weighted combine.
    ``gate_up_interleaved``: the rows of ``w13`` (and of its bias) alternate gate, up (gpt-oss)."""
    parts = _moe_forward_parts(hidden, w13, w2, topk_weights, topk_ids, activation_kind, gated,
                               w13_bias, w2_bias, apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved)
    slot_to_row, ys = parts[2], parts[6]
    return unpermute(ys, slot_to_row, topk_ids.shape[1], None if apply_router_weight_on_input else topk_weights)


def fused_moe_backward(
    grad_out, hidden, w13, w2, topk_weights, topk_ids, activation_kind="silu", gated=True,
    w13_bias=None, w2_bias=None, apply_router_weight_on_input=False, capacity=None, expert_map=None,
    gate_up_interleaved=False,
):
    """Gradients ``(hidden, w13, w2, topk_weights, w13_bias, w2_bias)``; the forward is recomputed, so only
    the inputs need to be kept between forward and backward."""
    on_input = apply_router_weight_on_input
    k = topk_ids.shape[1]
    slots, offsets, slot_to_row, xs, h, a, ys = _moe_forward_parts(
        hidden, w13, w2, topk_weights, topk_ids, activation_kind, gated, w13_bias, w2_bias, on_input, capacity, expert_map,
        gate_up_interleaved)
    g_ys = permute(grad_out, slots, k, None if on_input else topk_weights)  # [P, H]
    g_a = grouped_gemm(g_ys, w2, offsets, None, slots, trans_w=False)  # [P, I]
    g_h = activation_backward(g_a, h, activation_kind, gated, gate_up_interleaved)  # [P, 2I]
    g_xs = grouped_gemm(g_h, w13, offsets, None, slots, trans_w=False)  # [P, H]
    g_hidden = unpermute(g_xs, slot_to_row, k, topk_weights if on_input else None)
    if on_input:
        g_w = slot_dots(g_xs, slot_to_row, hidden, k)
    else:
        g_w = slot_dots(ys, slot_to_row, grad_out, k)
    g_w13 = grouped_gemm_wgrad(g_h, xs, offsets)
    g_w2 = grouped_gemm_wgrad(g_ys, a, offsets)
    g_b13 = segment_sum(g_h, offsets) if w13_bias is not None else None
    g_b2 = segment_sum(g_ys, offsets) if w2_bias is not None else None
    return g_hidden, g_w13, g_w2, g_w.to(topk_weights.dtype), g_b13, g_b2
