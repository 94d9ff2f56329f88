"""Hierarchical gating: a two-level tree of softmax gates (Jordan & Jacobs, 1994), on ``topk_gating``.

Experts form ``G`` equal groups of ``E/G``. A group router scores the groups and an expert router scores the
experts; for a token, ``p(g) = softmax(group_logits)[g]`` and ``p(e | g) = softmax(expert_logits[g's experts])[e]``.
The token goes to its ``topk_groups`` most likely groups and, inside each, to the ``top_k / topk_groups`` most
likely experts; its weight for expert ``e`` of group ``g`` is ``p(g) p(e | g)``.

Unlike DeepSeek-V3's group-limited top-k (``topk_gating(num_groups=...)``), which ranks groups by the scores of
their own experts, the groups here have a router of their own, so both levels learn.
"""

from __future__ import annotations

import torch

from . import _checks
from .gating import topk_gating

__all__ = ["hierarchical_gating", "hierarchical_probs"]


def _check(fn, group_logits, expert_logits, top_k, topk_groups):
    f = _checks.FLOAT_DTYPES
    _checks.check_tensor(fn, "group_logits", group_logits, ndim=2, dtypes=f, layout="[T, G]")
    T, G = group_logits.shape
    _checks.check_tensor(fn, "expert_logits", expert_logits, ndim=2, dtypes=f, shape=(T, None), layout="[T, E]")
    _checks.check_same_device(fn, group_logits=group_logits, expert_logits=expert_logits)
    E = expert_logits.shape[1]
    if G < 1 or E % G:
        raise ValueError(f"{fn}: the number of groups G={G} (group_logits [T, G]) must be >= 1 and divide the number "
                         f"of experts E={E} (expert_logits [T, E])")
    _checks.check_int(fn, "topk_groups", topk_groups, lo=1, hi=G)
    _checks.check_int(fn, "top_k", top_k, lo=1, hi=E)
    if top_k % topk_groups or top_k // topk_groups > E // G:
        raise ValueError(f"{fn}: top_k={top_k} must be a multiple of topk_groups={topk_groups} with top_k/topk_groups "
                         f"<= {E // G} experts per group")
    return T, G, E


def hierarchical_gating(
    group_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    top_k: int,
    topk_groups: int,
    *,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing down a tree of gates: ``(topk_weights, topk_ids)``.

    ============== ======== ============ ==========================================================
    argument       shape    dtype        meaning
    ============== ======== ============ ==========================================================
    group_logits   [T, G]   float        group router output
    expert_logits  [T, E]   float        expert router output; group g holds experts [g*E/G, (g+1)*E/G)
    topk_weights   [T, k]   fp32 (fp64   ``p(g) p(e | g)``, renormalised over the k chosen experts if
                            for fp64)    asked, times ``scaling_factor``
    topk_ids       [T, k]   int32        chosen experts: the best group's ``k/topk_groups`` best first,
                                         then the next group's; ties to the lower index
    ============== ======== ============ ==========================================================

    Both levels run :func:`topk_gating` (softmax scores, ties to the lower index, NaN ranks last), so the
    weights are differentiable in both logits. ``top_k`` must be a multiple of ``topk_groups``.

    Example::

        >>> w, ids = hierarchical_gating(torch.randn(5, 4), torch.randn(5, 16), top_k=4, topk_groups=2)
        >>> ids.shape
        torch.Size([5, 4])
    """
    fn = "hierarchical_gating"
    T, G, E = _check(fn, group_logits, expert_logits, top_k, topk_groups)
    n, kl = E // G, top_k // topk_groups  # experts per group, experts chosen per group
    p_group, groups = topk_gating(group_logits, topk_groups, scoring="softmax", renormalize=False,
                                  backend=backend)  # [T, kg]
    dt = p_group.dtype
    per_group = expert_logits.reshape(T, G, n)
    chosen = per_group.gather(1, groups.long()[:, :, None].expand(T, topk_groups, n))  # [T, kg, n]
    p_expert, local = topk_gating(chosen.reshape(T * topk_groups, n), kl, scoring="softmax", renormalize=False,
                                  backend=backend)  # [T*kg, kl]: p(e | g)
    w = (p_group[:, :, None] * p_expert.to(dt).view(T, topk_groups, kl)).reshape(T, top_k)
    ids = (groups[:, :, None] * n + local.view(T, topk_groups, kl)).reshape(T, top_k).to(torch.int32)
    if renormalize:
        w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(dt).tiny)
    if scaling_factor != 1.0:
        w = w * scaling_factor
    return w, ids


def hierarchical_probs(group_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` marginal probability ``p(g(e)) p(e | g(e))`` of every expert (rows sum to 1); differentiable.
    What the load-balancing loss and the routing entropy of a hierarchical layer use."""
    fn = "hierarchical_probs"
    T, G, E = _check(fn, group_logits, expert_logits, 1, 1)
    dt = torch.promote_types(torch.promote_types(group_logits.dtype, expert_logits.dtype), torch.float32)
    pg = torch.softmax(group_logits.to(dt), -1)  # [T, G]
    pe = torch.softmax(expert_logits.to(dt).view(T, G, E // G), -1)  # [T, G, E/G]
    return (pg[:, :, None] * pe).reshape(T, E)
