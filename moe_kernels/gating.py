"""Top-k gating, load-balancing losses and routing statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _backends, _checks
from . import ops  # noqa: F401  (registers torch.ops.moe_kernels.*)
from . import reference as ref

_FN = "topk_gating"
_OPS = torch.ops.moe_kernels
_backends.register("topk_gating", "torch")(_OPS.topk_gating.default)
_backends.register("expert_counts", "torch")(_OPS.expert_counts.default)
_backends.register("expert_choice_gating", "torch")(_OPS.expert_choice_gating.default)


def _check_gating(logits, top_k, scoring, correction_bias, num_groups, topk_groups, scaling_factor, group_score):
    _checks.check_tensor(_FN, "logits", logits, dtypes=_checks.FLOAT_DTYPES, layout="[..., E]")
    if logits.dim() < 1:
        raise ValueError(f"{_FN}: logits must be [..., E] with at least one dim, got a 0-d tensor")
    E = logits.shape[-1]
    if E < 1:
        raise ValueError(f"{_FN}: logits must have at least one expert column, got shape {tuple(logits.shape)}")
    _checks.check_int(_FN, "top_k", top_k, lo=1, hi=E)
    _checks.check_choice(_FN, "scoring", scoring, ref.SCORINGS)
    if correction_bias is not None:
        _checks.check_tensor(_FN, "correction_bias", correction_bias, dtypes=_checks.FLOAT_DTYPES, shape=(E,), layout="[E]")
        _checks.check_same_device(_FN, logits=logits, correction_bias=correction_bias)
    _checks.check_int(_FN, "num_groups", num_groups, lo=1, hi=E)
    if E % num_groups:
        raise ValueError(f"{_FN}: num_groups={num_groups} must divide the number of experts E={E}")
    _checks.check_int(_FN, "topk_groups", topk_groups, lo=1, hi=num_groups)
    if topk_groups * (E // num_groups) < top_k:
        raise ValueError(
            f"{_FN}: topk_groups * E/num_groups = {topk_groups} * {E // num_groups} must be >= top_k={top_k} "
            "(the chosen groups must hold k experts)"
        )
    if group_score is not None:
        _checks.check_choice(_FN, "group_score", group_score, ref.GROUP_SCORES)
        if group_score == "topk_sum" and top_k < topk_groups:
            raise ValueError(f'{_FN}: group_score="topk_sum" sums the top top_k // topk_groups scores of a group: '
                             f"needs top_k >= topk_groups, got top_k={top_k}, topk_groups={topk_groups}")
    if not isinstance(scaling_factor, (int, float)) or isinstance(scaling_factor, bool):
        raise TypeError(f"{_FN}: scaling_factor must be a float, got {type(scaling_factor).__name__}")


def topk_gating(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str | None = None,
    scaling_factor: float = 1.0,
    return_stats: bool = False,
    backend: str = "auto",
):
    """Score the experts of every token and keep the top k.

    ============== ========== ============ =====================================================
    argument       shape      dtype        meaning
    ============== ========== ============ =====================================================
    logits         [..., E]   fp32/bf16/   router output (any leading dims: ``T`` = their product)
                              fp16/fp64
    correction_bias [E]       float        added to the scores for *selection only* (DeepSeek-V3)
    topk_weights   [..., k]   fp32 (fp64   unbiased scores of the chosen experts, renormalised
                              for fp64)    if asked, times ``scaling_factor``
    topk_ids       [..., k]   int32        chosen experts, best first, ties to the lower index
    ============== ========== ============ =====================================================

    Scores, in fp32: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"`` (``sqrt(softplus(x))``,
    DeepSeek-V4; Megatron/TE ``score_function="sqrtsoftplus"``, vLLM ``topk_softplus_sqrt``).
    ``renormalize``: softmax weights are the softmax of the k selected logits (never 0/0); sigmoid
    and sqrtsoftplus weights are divided by their sum plus 1e-20 (Megatron/TE, which renormalise only
    for k > 1: pass ``renormalize=False`` at k = 1 for their result). A renormalised k = 1 weight is
    exactly 1 and its gradient exactly 0.

    Groups (``num_groups > 1``): the experts form equal groups and only the ``topk_groups`` best
    groups are eligible. A group's score (``group_score``) is its best selection score (``"max"``,
    DeepSeek-V2), the sum of its two best (``"top2_sum"``, DeepSeek-V3) or of its
    ``top_k // topk_groups`` best (``"topk_sum"``, TE/Megatron); ``None`` (default): ``"top2_sum"``
    with a correction bias, else ``"max"``.

    Non-finite logits always give finite weights and valid, distinct ids: a NaN ranks below every
    number (-inf included) and weighs 0 (it is left out of the softmax normaliser); +inf ranks above
    every finite logit: under softmax the +inf experts of a row share the weight equally and the
    others weigh 0, under sigmoid it scores 1, under sqrtsoftplus ``sqrt(max float)``. A row without a
    finite or +inf logit gets the lowest ids allowed by the rules above and weights 0. Gradients with
    respect to non-finite logits are 0.

    ``return_stats=True`` returns ``(topk_weights, topk_ids, GatingStats)``, the statistics of the
    load-balancing loss computed in the same pass (pass them to :func:`load_balancing_loss`).

    Example::

        >>> w, ids = topk_gating(torch.randn(5, 8), 2)
        >>> w.shape, ids.dtype
        (torch.Size([5, 2]), torch.int32)
        >>> topk_gating(torch.randn(2, 3, 8), 2)[1].shape  # [B, S, E] -> [B, S, k]
        torch.Size([2, 3, 2])
    """
    _check_gating(logits, top_k, scoring, correction_bias, num_groups, topk_groups, scaling_factor, group_score)
    lead, E = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, E)  # [T, E]
    impl = _backends.select("topk_gating", backend, logits.device, flat, top_k, scoring=scoring,
                            num_groups=num_groups, with_stats=bool(return_stats))
    if correction_bias is not None:
        correction_bias = correction_bias.float() if correction_bias.dtype != torch.float64 else correction_bias
    group_n = ref.group_top_n(group_score, correction_bias is not None, top_k, topk_groups, E // num_groups)
    w, ids, counts, sums = impl(flat, correction_bias, top_k, scoring, bool(renormalize), num_groups, topk_groups,
                                float(scaling_factor), bool(return_stats), group_n)
    w, ids = w.view(*lead, top_k), ids.view(*lead, top_k)
    if return_stats:
        return w, ids, GatingStats(counts, sums, flat.shape[0], top_k, scoring)
    return w, ids


@dataclass(frozen=True)
class GatingStats:
    """Statistics of one routing decision, from the gating pass itself.

    ``tokens_per_expert`` [E] int32: slots routed to each expert; ``score_sums`` [E] fp32: per expert,
    the sum over tokens of its probability (softmax scores, or sigmoid scores normalised per token);
    differentiable with respect to the logits.
    """

    tokens_per_expert: torch.Tensor
    score_sums: torch.Tensor
    num_tokens: int
    top_k: int
    scoring: str


def expert_choice_gating(
    logits: torch.Tensor, capacity: int, *, scoring: str = "softmax", backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing (Zhou et al., 2022): every expert takes its ``capacity`` best tokens.

    ========== ======== ===== ===========================================================
    argument   shape    dtype meaning
    ========== ======== ===== ===========================================================
    logits     [T, E]   float router output; scores are softmax over experts (or sigmoid)
    weights    [E, C]   fp32  ``s[token, e]`` of the chosen tokens, best first (0 for padding)
    token_ids  [E, C]   int32 chosen tokens, ties to the lower token; -1 where C > T
    ========== ======== ===== ===========================================================

    A token may be taken by several experts or by none. Feed the result to
    :func:`expert_choice_plan` to run the experts with permute / grouped_gemm / unpermute.
    Differentiable in ``logits``.
    """
    fn = "expert_choice_gating"
    _checks.check_tensor(fn, "logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[T, E]")
    if logits.shape[1] < 1:
        raise ValueError(f"{fn}: logits must have at least one expert column, got shape {tuple(logits.shape)}")
    _checks.check_int(fn, "capacity", capacity, lo=1)
    _checks.check_choice(fn, "scoring", scoring, ("softmax", "sigmoid"))
    impl = _backends.select(fn, backend, logits.device, logits, capacity)
    return impl(logits, capacity, scoring)


def expert_counts(topk_ids: torch.Tensor, num_experts: int, *, backend: str = "auto") -> torch.Tensor:
    """Slots routed to each expert, ``[E]`` int32; ids outside ``[0, E)`` (-1, sentinels: dropped slots)
    are not counted. ``topk_ids`` [T, k] of any integer dtype."""
    fn = "expert_counts"
    _checks.check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=_checks.ID_DTYPES, layout="[T, k]")
    _checks.check_top_k(fn, "topk_ids", topk_ids)
    _checks.check_int(fn, "num_experts", num_experts, lo=1)
    _checks.check_expert_ids(fn, "topk_ids", topk_ids, num_experts)
    return _backends.select(fn, backend, topk_ids.device, topk_ids, num_experts)(topk_ids, num_experts)


def load_balancing_loss(
    logits: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    num_experts: int | None = None,
    *,
    scoring: str = "softmax",
    stats: GatingStats | None = None,
    fraction: str = "routed",
) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` (1.0 for perfectly even routing).

    ``f_e`` is the fraction of the (token, slot) pairs that went to expert e: of the routed pairs with
    ``fraction="routed"`` (pairs dropped with an id outside ``[0, E)`` count in neither numerator nor
    denominator), or of all ``k*T`` pairs with ``fraction="all_slots"`` (TransformerEngine's
    ``fused_moe_aux_loss`` and Megatron's ``switch_load_balancing_loss_func``, there times their coefficient).
    ``P_e`` is the mean router probability of e (softmax of the logits, or the sigmoid scores normalised
    per token for ``scoring="sigmoid"``). Differentiable in ``logits``.
    Hugging Face's Mixtral loss is ``top_k`` times this value.

    With ``stats`` (from ``topk_gating(..., return_stats=True)``) nothing else is needed: the loss
    comes from the statistics the gating pass already computed, without another pass over the logits.
    """
    fn = "load_balancing_loss"
    _checks.check_choice(fn, "fraction", fraction, ("routed", "all_slots"))
    if stats is not None:
        if not isinstance(stats, GatingStats):
            raise TypeError(f"{fn}: stats must be a GatingStats (topk_gating(..., return_stats=True)), got {type(stats).__name__}")
        slots = stats.num_tokens * stats.top_k if fraction == "all_slots" else None
        return _balance_loss(stats.score_sums / max(stats.num_tokens, 1), stats.tokens_per_expert, slots)
    if logits is None or topk_ids is None or num_experts is None:
        raise ValueError(f"{fn}: give either logits, topk_ids and num_experts, or stats")
    _checks.check_tensor(fn, "logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[T, E]")
    _checks.check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=_checks.ID_DTYPES, shape=(logits.shape[0], None), layout="[T, k]")
    _checks.check_choice(fn, "scoring", scoring, ("softmax", "sigmoid"))
    _checks.check_same_device(fn, logits=logits, topk_ids=topk_ids)
    if logits.shape[1] != num_experts:
        raise ValueError(f"{fn}: logits must have num_experts={num_experts} columns, got shape {tuple(logits.shape)}")
    T, k = topk_ids.shape
    x = logits.to(ref.acc_dtype(logits.dtype))
    s = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    p = ref.balance_scores(s, scoring).sum(0) / max(T, 1)
    return _balance_loss(p, expert_counts(topk_ids, num_experts), T * k if fraction == "all_slots" else None)


def _balance_loss(p: torch.Tensor, counts: torch.Tensor, num_slots=None) -> torch.Tensor:
    """``E * sum_e f_e * p_e`` with ``f`` the share of the routed (not dropped) pairs, or of ``num_slots``
    pairs when given (no host sync)."""
    c = counts.to(p.dtype)
    denom = c.sum().clamp(min=1) if num_slots is None else max(num_slots, 1)
    return p.shape[0] * (c / denom * p).sum()


def seq_aux_loss(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int | None = None,
    *,
    seq_len: int | None = None,
    scoring: str = "sigmoid",
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without its coefficient alpha).

    Per sequence of ``S`` tokens, ``L = sum_e f_e * P_e`` with ``f_e = E / (k*S) * #{t : e in topk(t)}`` and
    ``P_e = 1/S * sum_t s'_{t,e}``, ``s'`` the scores normalised per token (sigmoid scores divided by their
    sum; softmax scores as they are); the result is the mean of ``L`` over the ``B`` sequences (1.0 for
    perfectly even routing within every sequence). Ids outside ``[0, E)`` are not counted.

    ========== ============================= ==============================================
    argument   shape                         meaning
    ========== ============================= ==============================================
    logits     [B, S, E] (or [B*S, E])       router output; give ``seq_len=S`` for 2-D inputs
    topk_ids   [B, S, k] (or [B*S, k])       the chosen experts (any integer dtype)
    out        []                            fp32 (fp64 for fp64 logits), differentiable in logits
    ========== ============================= ==============================================

    Example::

        >>> loss = 1e-4 * seq_aux_loss(logits.view(B, S, E), ids.view(B, S, k))
    """
    fn = "seq_aux_loss"
    _checks.check_tensor(fn, "logits", logits, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_choice(fn, "scoring", scoring, ("softmax", "sigmoid"))
    if logits.dim() == 2:
        if seq_len is None:
            raise ValueError(f"{fn}: 2-D logits [B*S, E] need seq_len=S (or give logits [B, S, E])")
        _checks.check_int(fn, "seq_len", seq_len, lo=1)
        if logits.shape[0] % seq_len:
            raise ValueError(f"{fn}: logits has {logits.shape[0]} tokens, not a multiple of seq_len={seq_len}")
        logits = logits.view(-1, seq_len, logits.shape[1])
        if topk_ids.dim() == 2:
            _checks.check_tensor(fn, "topk_ids", topk_ids, dtypes=_checks.ID_DTYPES, shape=(logits.shape[0] * seq_len, None),
                                 layout="[B*S, k]")
            topk_ids = topk_ids.view(logits.shape[0], seq_len, -1)
    elif logits.dim() != 3:
        raise ValueError(f"{fn}: logits must be [B, S, E] or [B*S, E], got shape {tuple(logits.shape)}")
    B, S, E = logits.shape
    if num_experts is not None and num_experts != E:
        raise ValueError(f"{fn}: logits must have num_experts={num_experts} columns, got shape {tuple(logits.shape)}")
    _checks.check_tensor(fn, "topk_ids", topk_ids, ndim=3, dtypes=_checks.ID_DTYPES, shape=(B, S, None), layout="[B, S, k]")
    k = topk_ids.shape[2]
    _checks.check_size(fn, "topk_ids.shape[-1] (k)", k, lo=1)
    _checks.check_same_device(fn, logits=logits, topk_ids=topk_ids)
    x = logits.to(ref.acc_dtype(logits.dtype))
    s = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    p = ref.balance_scores(s, scoring).sum(1) / max(S, 1)  # [B, E]
    ids = topk_ids.reshape(B, S * k).long()
    ids = torch.where((ids >= 0) & (ids < E), ids, E)
    counts = torch.zeros(B, E + 1, dtype=p.dtype, device=p.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=p.dtype))
    f = counts[:, :E] * (E / max(k * S, 1))
    return (f * p).sum() / max(B, 1)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2`` (0 for no tokens)."""
    _checks.check_tensor("router_z_loss", "logits", logits, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[T, E]")
    x = logits.to(ref.acc_dtype(logits.dtype))
    return torch.logsumexp(x, -1).square().sum() / max(logits.shape[0], 1)


@dataclass(frozen=True)
class RoutingStats:
    """Routing statistics as device tensors (reading them is the caller's choice of sync).

    ``tokens_per_expert`` [E] int32; ``max_load`` and ``mean_load`` (slots per expert) fp32;
    ``load_entropy``: entropy in nats of the load distribution (``log E`` when perfectly even);
    ``imbalance``: ``max_load / mean_load`` (1.0 when even).
    """

    tokens_per_expert: torch.Tensor
    max_load: torch.Tensor
    mean_load: torch.Tensor
    load_entropy: torch.Tensor
    imbalance: torch.Tensor


def routing_stats(topk_ids: torch.Tensor, num_experts: int) -> RoutingStats:
    """Load statistics of a routing decision, without a host synchronisation."""
    return stats_from_counts(expert_counts(topk_ids, num_experts))


def stats_from_counts(counts: torch.Tensor) -> RoutingStats:
    """:class:`RoutingStats` of a per-expert load ``counts [E]``."""
    load = counts.float()
    mean = load.mean()
    p = load / load.sum().clamp(min=1)
    entropy = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum()
    return RoutingStats(counts, load.max(), mean, entropy, load.max() / mean.clamp(min=1e-20))


def update_correction_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3 aux-loss-free balancing, in place: ``bias += rate * sign(mean load - load)``.

    ``bias`` [E] float (kept fp32 by :class:`MoE`), ``tokens_per_expert`` [E] (e.g. summed
    ``routing_stats(...).tokens_per_expert``). Returns ``bias``. No host synchronisation.
    """
    fn = "update_correction_bias"
    _checks.check_tensor(fn, "bias", bias, ndim=1, dtypes=_checks.FLOAT_DTYPES, layout="[E]")
    _checks.check_tensor(fn, "tokens_per_expert", tokens_per_expert, shape=(bias.shape[0],), layout="[E]")
    _checks.check_same_device(fn, bias=bias, tokens_per_expert=tokens_per_expert)
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise TypeError(f"{fn}: rate must be a float, got {type(rate).__name__}")
    _OPS.update_correction_bias(bias, tokens_per_expert, float(rate))
    return bias
