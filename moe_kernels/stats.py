"""Routing statistics over a whole run (many forward calls): per-expert token counts and routing entropy."""

from __future__ import annotations

import torch

from . import _checks
from .gating import RoutingStats, stats_from_counts

__all__ = ["RoutingStatsAccumulator", "routing_entropy"]


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``[T]`` entropy in nats of each token's routing distribution ``probs [T, E]`` (rows sum to 1; 0 log 0 = 0)."""
    _checks.check_tensor("routing_entropy", "probs", probs, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[T, E]")
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    return -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1)


class RoutingStatsAccumulator:
    """Routing statistics accumulated across calls, until :meth:`reset`; device tensors, never a host sync.

    ============================ ======= ======================================================================
    attribute                    dtype   meaning
    ============================ ======= ======================================================================
    tokens_per_expert [E]        int64   slots routed to each expert over the run
    num_tokens []                int64   tokens seen
    num_calls []                 int64   forward calls seen
    entropy_sum []               fp64    sum over tokens of the entropy of their routing distribution (nats)
    ============================ ======= ======================================================================

    ``mean_entropy`` is the mean per-token routing entropy (``log E`` for a router that cannot decide, 0 for a
    confident one); ``stats()`` the :class:`RoutingStats` of the accumulated load (its ``load_entropy`` is the
    entropy of the load over experts, ``log E`` when even). ``MoE`` keeps one in ``run_stats``.

    Example::

        >>> moe.run_stats.reset()
        >>> for batch in data: moe(batch)
        >>> moe.run_stats.tokens_per_expert, moe.run_stats.mean_entropy, moe.run_stats.stats().imbalance
    """

    def __init__(self, num_experts: int):
        _checks.check_int("RoutingStatsAccumulator", "num_experts", num_experts, lo=1)
        self.num_experts = num_experts
        self.tokens_per_expert = self.num_tokens = self.num_calls = self.entropy_sum = None
        self.reset()

    def reset(self, device: torch.device | str | None = None) -> None:
        """Start a new run: zero every statistic (on ``device``, default: where they are)."""
        if device is None:
            device = self.tokens_per_expert.device if self.tokens_per_expert is not None else "cpu"
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=device)
        self.num_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.num_calls = torch.zeros((), dtype=torch.int64, device=device)
        self.entropy_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, tokens_per_expert: torch.Tensor, num_tokens: int, entropy_sum: torch.Tensor | None = None) -> None:
        """Add one call: ``tokens_per_expert [E]`` (e.g. ``RoutingStats.tokens_per_expert``), its token count and the
        sum of its tokens' routing entropies (``routing_entropy(probs).sum()``; None: not counted)."""
        _checks.check_tensor("RoutingStatsAccumulator.update", "tokens_per_expert", tokens_per_expert,
                             shape=(self.num_experts,), layout="[E]")
        if self.tokens_per_expert.device != tokens_per_expert.device:
            for name in ("tokens_per_expert", "num_tokens", "num_calls", "entropy_sum"):
                setattr(self, name, getattr(self, name).to(tokens_per_expert.device))
        self.tokens_per_expert += tokens_per_expert
        self.num_tokens += num_tokens
        self.num_calls += 1
        if entropy_sum is not None:
            self.entropy_sum += entropy_sum.to(torch.float64)

    @property
    def mean_entropy(self) -> torch.Tensor:
        """Mean per-token routing entropy over the run, in nats (0 before any token)."""
        return self.entropy_sum / self.num_tokens.clamp(min=1)

    @property
    def load_fraction(self) -> torch.Tensor:
        """``[E]`` fp32 share of the routed slots that went to each expert (0 before any token)."""
        load = self.tokens_per_expert.float()
        return load / load.sum().clamp(min=1)

    def stats(self) -> RoutingStats:
        """:class:`RoutingStats` of the load accumulated so far."""
        return stats_from_counts(self.tokens_per_expert)

    def __repr__(self) -> str:
        return f"RoutingStatsAccumulator(num_experts={self.num_experts}, device={self.tokens_per_expert.device})"
