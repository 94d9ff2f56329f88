"""``MoE``: router, routed experts, shared experts and auxiliary losses as one nn.Module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .gating import (GatingStats, expert_choice_gating, expert_counts, load_balancing_loss, router_z_loss, routing_stats,
                     stats_from_counts, topk_gating)
from .gemm import grouped_gemm
from .moe import activation, fused_moe
from .routing import expert_choice_plan, permute, unpermute
from .reference import GATED_ACTIVATIONS, GROUP_SCORES, PLAIN_ACTIVATIONS, SCORINGS, balance_scores
from .stats import RoutingStatsAccumulator, routing_entropy


class SharedExpert(nn.Module):
    """Dense gated MLP that every token goes through (DeepSeek / Qwen2-MoE shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, gated: bool, **factory):
        super().__init__()
        self.activation, self.gated = activation, gated
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory) if gated else None
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_proj(x) if self.up_proj is None else torch.cat([self.gate_proj(x), self.up_proj(x)], -1)
        return self.down_proj(activation(h, self.activation, gated=self.gated))


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Parameters: ``router.weight [E, H]`` (+ ``router.bias``), ``w13 [E, 2I, H]`` (gate rows first; ``[E, I, H]``
    when not gated), ``w2 [E, H, I]`` (+ ``b13 [E, 2I]``, ``b2 [E, H]`` with ``expert_bias``), buffer
    ``correction_bias [E]`` (fp32, with ``correction_bias=True``), ``shared.{gate,up,down}_proj`` and
    ``shared_gate`` (``Linear(H, 1)``, its sigmoid scales the shared output as in Qwen2-MoE).

    The router runs in fp32; ``scoring``, ``renormalize``, ``num_groups``, ``topk_groups``, ``group_score``
    and ``scaling_factor`` are those of :func:`topk_gating`. ``forward(x [..., H]) -> [..., H]``; afterwards ``last_stats`` holds a
    :class:`RoutingStats` and ``aux_loss`` ``aux_loss_coef * load_balancing_loss + z_loss_coef * router_z_loss``
    (add it to the training loss); ``run_stats`` (:class:`~moe_kernels.stats.RoutingStatsAccumulator`) accumulates
    token counts per expert and routing entropy over calls until ``run_stats.reset()``. ``capacity_factor`` sets each expert's capacity to
    ``ceil(capacity_factor * T * k / E)`` slots, ``drop_policy`` which slots it keeps (see :func:`plan_routing`).

    ``save_preactivation=True`` keeps the experts' pre-activation ``[T*k, 2I]`` from the forward so that the
    backward skips recomputing the first GEMM (fused_moe's option; single-rank top-k routing).

    ``routing="expert_choice"`` lets every expert pick its ``ceil(capacity_factor * T * k / E)`` best
    tokens (Zhou et al., 2022; ``capacity_factor`` defaults to 1, so tokens get k experts on average);
    the load-balancing loss does not apply there (the load is even by construction).

    ``routing="hierarchical"`` (a tree of gates, Jordan & Jacobs, 1994): ``group_router`` (``Linear(H, G)``, G =
    ``num_groups``) picks each token's ``topk_groups`` groups and ``router`` its ``top_k / topk_groups`` experts
    inside each, with weights ``p(g) p(e | g)`` (:func:`~moe_kernels.hierarchical.hierarchical_gating`).

    ``residual=True`` (DeepSpeed-MoE's residual MoE): a dense MLP ``residual_mlp`` (width ``intermediate_size``)
    beside the experts and a per-token 2-way mix ``c = softmax(residual_coef(x))`` (fp32):
    ``out = c0 * residual_mlp(x) + c1 * moe(x)``, ``moe(x)`` being routed plus shared experts.

    ``ep_group`` (a process group, or an :class:`~moe_kernels.distributed.ExpertParallel` for options such as
    ``capacity``) shards the experts: ``w13``, ``w2`` (and biases) hold this rank's ``E/world`` experts only, each
    rank passes its own tokens, and outputs and gradients equal the unsharded layer's on all ranks' tokens. The
    router and shared experts stay replicated (all-reduce their gradients, as DDP does); ``aux_loss`` and
    ``last_stats`` cover this rank's tokens. Top-k (or hierarchical) routing without ``capacity_factor`` only.
    ``shadow_experts=n`` shadows the n most loaded experts on every rank each step (FasterMoE; see
    :class:`~moe_kernels.distributed.ExpertParallel`).

    Example::

        >>> moe = MoE(64, 128, num_experts=8, top_k=2)
        >>> y = moe(torch.randn(2, 5, 64)); y.sum().backward()
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        renormalize: bool = True,
        num_groups: int = 1,
        topk_groups: int = 1,
        group_score: str | None = None,
        scaling_factor: float = 1.0,
        correction_bias: bool = False,
        router_bias: bool = False,
        shared_intermediate_size: int = 0,
        shared_gate: bool = False,
        activation: str = "silu",
        gated: bool = True,
        expert_bias: bool = False,
        capacity_factor: float | None = None,
        drop_policy: str = "gshard",
        routing: str = "topk",
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
        ep_group=None,
        shadow_experts: int = 0,
        residual: bool = False,
        save_preactivation: bool = False,
    ):
        config = {n: v for n, v in locals().items() if n not in ("self", "__class__")}  # for merge_experts / to_dense
        super().__init__()
        self._config = config
        fn = "MoE"
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size), ("num_experts", num_experts)):
            _checks.check_int(fn, name, v, lo=1)
        _checks.check_int(fn, "top_k", top_k, lo=1, hi=num_experts)
        _checks.check_int(fn, "shared_intermediate_size", shared_intermediate_size, lo=0)
        _checks.check_choice(fn, "scoring", scoring, SCORINGS)
        if group_score is not None:
            _checks.check_choice(fn, "group_score", group_score, GROUP_SCORES)
        _checks.check_choice(fn, "routing", routing, ("topk", "expert_choice", "hierarchical"))
        _checks.check_choice(fn, "drop_policy", drop_policy, ("gshard", "position", "probs"))
        _checks.check_choice(fn, "activation", activation, GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS)
        if num_experts % num_groups or topk_groups > num_groups or topk_groups * (num_experts // num_groups) < top_k:
            raise ValueError(f"{fn}: num_groups={num_groups} must divide num_experts={num_experts} and topk_groups={topk_groups} "
                             f"groups of {num_experts // max(num_groups, 1)} experts must hold top_k={top_k}")
        if routing == "hierarchical" and (top_k % topk_groups or top_k // topk_groups > num_experts // num_groups
                                          or scoring != "softmax" or correction_bias):
            raise ValueError(f"{fn}: routing='hierarchical' needs top_k={top_k} to be a multiple of topk_groups={topk_groups} "
                             f"with top_k/topk_groups <= E/num_groups={num_experts // num_groups}, scoring='softmax' "
                             f"(got {scoring!r}) and no correction_bias")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"{fn}: capacity_factor must be > 0 or None, got {capacity_factor}")
        factory = dict(dtype=dtype, device=device)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.renormalize, self.scaling_factor = scoring, renormalize, scaling_factor
        self.num_groups, self.topk_groups, self.group_score = num_groups, topk_groups, group_score
        self.activation, self.gated = activation, gated
        self.capacity_factor, self.aux_loss_coef, self.z_loss_coef = capacity_factor, aux_loss_coef, z_loss_coef
        self.routing = routing
        self.drop_policy = drop_policy
        self.backend = backend
        self.save_preactivation = bool(save_preactivation)
        if ep_group is not None and (routing == "expert_choice" or capacity_factor is not None):
            raise ValueError(f"{fn}: ep_group supports top-k routing without capacity_factor, got routing={routing!r}, "
                             f"capacity_factor={capacity_factor}")
        _checks.check_int(fn, "shadow_experts", shadow_experts, lo=0, hi=num_experts)
        if shadow_experts and ep_group is None:
            raise ValueError(f"{fn}: shadow_experts={shadow_experts} needs an ep_group (experts shadowed across ranks)")
        self.ep = None
        if ep_group is not None:
            from .distributed import ExpertParallel

            self.ep = ExpertParallel.of(ep_group, num_experts, shadow=shadow_experts)
        local = num_experts if self.ep is None else self.ep.num_local_experts  # experts held by this rank

        self.router = nn.Linear(hidden_size, num_experts, bias=router_bias, **factory)
        # routing="hierarchical": the group level of the tree of gates (see moe_kernels.hierarchical)
        self.group_router = (nn.Linear(hidden_size, num_groups, bias=router_bias, **factory)
                             if routing == "hierarchical" else None)
        rows = 2 * intermediate_size if gated else intermediate_size
        self.w13 = nn.Parameter(torch.empty(local, rows, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, intermediate_size, **factory))
        self.b13 = nn.Parameter(torch.empty(local, rows, **factory)) if expert_bias else None
        self.b2 = nn.Parameter(torch.empty(local, hidden_size, **factory)) if expert_bias else None
        if correction_bias:
            self.register_buffer("correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.correction_bias = None
        self.shared = (SharedExpert(hidden_size, shared_intermediate_size, activation, gated, **factory)
                       if shared_intermediate_size else None)
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False, **factory) if shared_gate else None
        # residual=True (DeepSpeed-MoE): out = c0 * residual_mlp(x) + c1 * moe(x), c = softmax(residual_coef(x))
        self.residual_mlp = SharedExpert(hidden_size, intermediate_size, activation, gated, **factory) if residual else None
        self.residual_coef = nn.Linear(hidden_size, 2, bias=False, **factory) if residual else None
        self.last_stats = None
        # statistics over a run (RoutingStatsAccumulator; reset() starts a new one; None switches them off)
        self.run_stats = RoutingStatsAccumulator(num_experts)
        self.run_stats.reset(device)
        self.aux_loss = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, per expert: uniform in ``+-1/sqrt(fan_in)``."""
        with torch.no_grad():
            for p, fan_in in ((self.w13, self.hidden_size), (self.w2, self.intermediate_size),
                              (self.b13, self.hidden_size), (self.b2, self.intermediate_size)):
                if p is not None:
                    bound = 1.0 / math.sqrt(fan_in)
                    p.uniform_(-bound, bound)

    def route(self, x: torch.Tensor):
        """Router logits (fp32) and top-k choice of tokens ``x [T, H]``: ``(logits, topk_weights, topk_ids, stats)``;
        ``stats`` (:class:`GatingStats`, from the same pass) when the load-balancing loss is on, else None."""
        dt = torch.promote_types(x.dtype, torch.float32)  # fp32 router (fp64 stays fp64)
        bias = self.router.bias.to(dt) if self.router.bias is not None else None
        logits = F.linear(x.to(dt), self.router.weight.to(dt), bias)  # [T, E]
        if self.group_router is not None:
            return self._route_hierarchical(x.to(dt), logits)
        out = topk_gating(
            logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize,
            correction_bias=self.correction_bias, num_groups=self.num_groups, topk_groups=self.topk_groups,
            group_score=self.group_score, scaling_factor=self.scaling_factor, return_stats=bool(self.aux_loss_coef),
            backend=self.backend,
        )
        return (logits, *out) if self.aux_loss_coef else (logits, *out, None)

    def _route_hierarchical(self, x: torch.Tensor, logits: torch.Tensor):
        """``route`` for ``routing="hierarchical"``: the group router picks groups, the expert router experts."""
        from .hierarchical import hierarchical_gating, hierarchical_probs

        gr = self.group_router
        group_logits = F.linear(x, gr.weight.to(x.dtype), None if gr.bias is None else gr.bias.to(x.dtype))  # [T, G]
        # the group router's z-loss, added to aux_loss by forward; its logits, for run_stats
        self._group_z_loss = router_z_loss(group_logits) if self.z_loss_coef else None
        self._group_logits = group_logits.detach()
        w, ids = hierarchical_gating(group_logits, logits, self.top_k, self.topk_groups, renormalize=self.renormalize,
                                     scaling_factor=self.scaling_factor, backend=self.backend)
        stats = None
        if self.aux_loss_coef:  # the balancing loss over the marginal p(g) p(e | g)
            counts = expert_counts(ids, self.num_experts, backend=self.backend)
            probs = hierarchical_probs(group_logits, logits)
            stats = GatingStats(counts, probs.sum(0), x.shape[0], self.top_k, "softmax")
        return logits, w, ids, stats

    def _entropy_sum(self, logits: torch.Tensor) -> torch.Tensor:
        """Sum over tokens of the entropy of their routing distribution over experts (for ``run_stats``)."""
        if self.group_router is not None:
            from .hierarchical import hierarchical_probs

            return routing_entropy(hierarchical_probs(self._group_logits, logits)).sum()
        s = torch.softmax(logits, -1) if self.scoring == "softmax" else torch.sigmoid(logits)
        return routing_entropy(balance_scores(s, self.scoring)).sum()

    def _capacity(self, num_tokens: int, default: float | None) -> int | None:
        factor = self.capacity_factor if self.capacity_factor is not None else default
        if factor is None:
            return None
        return max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def _expert_choice(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed output and per-expert load when every expert picks its best tokens."""
        weights, tokens = expert_choice_gating(logits, self._capacity(x.shape[0], 1.0), scoring=self.scoring,
                                               backend=self.backend)
        plan, slot_weights = expert_choice_plan(tokens, weights, x.shape[0])  # index bookkeeping: any backend
        h = grouped_gemm(permute(x, plan, backend=self.backend), self.w13, plan, bias=self.b13, backend=self.backend)
        a = activation(h, self.activation, gated=self.gated)
        y = grouped_gemm(a, self.w2, plan, bias=self.b2, backend=self.backend)
        return unpermute(y, plan, slot_weights, backend=self.backend), plan.tokens_per_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: input must have shape [..., {self.hidden_size}], got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        stats = None
        if self.routing == "expert_choice":
            dt = torch.promote_types(x.dtype, torch.float32)
            bias = self.router.bias.to(dt) if self.router.bias is not None else None
            logits = F.linear(x.to(dt), self.router.weight.to(dt), bias)
            out, load = self._expert_choice(x, logits)
        else:
            logits, weights, ids, stats = self.route(x)
            run = fused_moe if self.ep is None else self.ep.experts
            more = dict(save_preactivation=True) if self.save_preactivation and self.ep is None else {}
            out = run(
                x, self.w13, self.w2, weights, ids, activation=self.activation, gated=self.gated,
                w13_bias=self.b13, w2_bias=self.b2, capacity=self._capacity(x.shape[0], None), backend=self.backend,
                **more, **({} if self.ep is not None else {"drop_policy": self.drop_policy}),  # EP: no capacity
            )
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        if self.residual_mlp is not None:
            dt = torch.promote_types(x.dtype, torch.float32)
            c = torch.softmax(F.linear(x.to(dt), self.residual_coef.weight.to(dt)), -1).to(out.dtype)  # [T, 2]
            out = c[:, :1] * self.residual_mlp(x) + c[:, 1:] * out
        with torch.no_grad():
            if self.routing == "expert_choice":
                self.last_stats = stats_from_counts(load)
            else:
                self.last_stats = routing_stats(ids, self.num_experts)
            if self.run_stats is not None:
                self.run_stats.update(self.last_stats.tokens_per_expert, x.shape[0], self._entropy_sum(logits))
            self._group_logits = None
        aux = logits.new_zeros(())
        if self.aux_loss_coef and stats is not None:
            aux = aux + self.aux_loss_coef * load_balancing_loss(stats=stats)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * router_z_loss(logits)
            if self.group_router is not None:
                aux = aux + self.z_loss_coef * self._group_z_loss
                self._group_z_loss = None
        self.aux_loss = aux
        return out.reshape(shape)

    def quantize_(self, fmt: str = "fp8", *, block_shape=None, per_channel: bool = False, group_size=None,
                  zero_point: bool = False) -> "MoE":
        """Quantize the routed experts' ``w13`` and ``w2`` in place (:func:`moe_kernels.quantize`; inference only:
        a backward through them raises). Afterwards ``self.w13`` / ``self.w2`` are :class:`QuantizedWeight` values
        over buffers ``w13_qdata``/``w13_qscale`` (and ``w2_*``), held as bit views (uint8 / int32) so that the
        module's dtype casts (``.half()``, ``.to(torch.bfloat16)``) leave them untouched while device moves and
        ``state_dict`` carry them. Router, biases and shared experts stay dense. Returns ``self``. Weight-only
        formats (``"int8"``, ``"int4"``, ``"mxfp4"``) take ``group_size`` / ``zero_point`` and add ``*_qzero``.

        Example::

            >>> moe = MoE(256, 512, num_experts=8, top_k=2).quantize_("fp8", block_shape=(128, 128))
        """
        from .quant import quantize

        if self.ep is not None:
            raise ValueError("MoE.quantize_: expert-parallel layers (ep_group) are not supported")
        for name in ("w13", "w2"):
            if name in self.__dict__.get("_quant", {}):
                raise ValueError(f"MoE.quantize_: {name} is already quantized")
        quant = {}
        for name in ("w13", "w2"):
            q = quantize(getattr(self, name).detach(), fmt, block_shape=block_shape, per_channel=per_channel,
                         group_size=group_size, zero_point=zero_point)
            delattr(self, name)
            self.register_buffer(f"{name}_qdata", q.data.view(torch.uint8))
            self.register_buffer(f"{name}_qscale", q.scale.view(torch.int32) if q.scale.dtype == torch.float32 else q.scale)
            if q.zero is not None:
                self.register_buffer(f"{name}_qzero", q.zero)
            quant[name] = (q.fmt, q.block_shape, q.orig_dtype, q.data.dtype, q.group_size, q.scale.dtype)
        self._quant = quant
        return self

    def __getattr__(self, name: str):
        quant = self.__dict__.get("_quant")
        if quant and name in quant:
            from .quant import QuantizedWeight

            fmt, block_shape, orig_dtype, dtype, group_size, scale_dtype = quant[name]
            zero = self._buffers.get(f"{name}_qzero")
            return QuantizedWeight(data=getattr(self, f"{name}_qdata").view(dtype),
                                   scale=getattr(self, f"{name}_qscale").view(scale_dtype), fmt=fmt,
                                   block_shape=block_shape, zero=zero, group_size=group_size, orig_dtype=orig_dtype)
        return super().__getattr__(name)

    @staticmethod
    def from_dense(mlp, num_experts: int, top_k: int, *, noise: float = 0.0, **kwargs) -> "MoE":
        """Sparse upcycling: every expert a copy of the dense FFN ``mlp`` (see :func:`moe_kernels.upcycle.from_dense`)."""
        from .upcycle import from_dense

        return from_dense(mlp, num_experts, top_k, noise=noise, **kwargs)

    def merge_experts(self, num_out: int, *, usage: torch.Tensor | None = None) -> "MoE":
        """A new layer of ``num_out`` experts, usage-weighted averages within router-similarity clusters
        (see :func:`moe_kernels.upcycle.merge_experts`)."""
        from .upcycle import merge_experts

        return merge_experts(self, num_out, usage=usage)

    def to_dense(self, *, usage: torch.Tensor | None = None) -> nn.Module:
        """One FFN, the usage-weighted average of the experts (see :func:`moe_kernels.upcycle.to_dense`)."""
        from .upcycle import to_dense

        return to_dense(self, usage=usage)

    @staticmethod
    def from_hf(block, *, backend: str = "auto"):
        """A module running our kernels on the parameters of a Hugging Face transformers MoE block
        (no copy); see :func:`moe_kernels.integrations.transformers.from_hf`."""
        from .integrations.transformers import from_hf

        return from_hf(block, backend=backend)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, scoring={self.scoring}, activation={self.activation}, backend={self.backend}")
