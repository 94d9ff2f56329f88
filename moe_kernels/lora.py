"""Mixture of LoRA experts on a frozen linear layer: ``lora_moe``, ``LoRAMoE`` and ``wrap_linear``.

``y[t] = x[t] @ W0.T + b0 + scaling * sum_j w[t, j] * (x[t] @ A[e_j].T) @ B[e_j].T`` (MoELoRA and
relatives): the base weight stays frozen, each token goes through k of E low-rank adapters.

The adapters are two grouped GEMMs over a routing plan: the shrink ``x -> [T*k, r]`` (every slot's
token times its expert's ``A``) and the expand ``[T*k, r] -> [T*k, N]``, combined over the k slots
with the routing weights and added to the dense base output ``x @ W0.T``. This file holds the
reference (``torch`` backend) and its op registration, the autograd shared by every backend, the
public function and the modules; the Triton path is ``triton_kernels/lora.py``.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import custom_op

from . import _backends, _checks
from . import ops  # noqa: F401  (registers the routing ops the reference builds on)
from . import reference as ref
from .batch_invariance import is_batch_invariant
from .gating import load_balancing_loss, topk_gating

# ----- reference ---------------------------------------------------------------------------------------


def lora_moe_reference(x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling):
    """Plain PyTorch: plan, permute, shrink, expand, weighted combine (fp32), plus the dense base output."""
    k = topk_ids.shape[1]
    slots, offsets, _, slot_to_row = ref.plan_routing(topk_ids, lora_a.shape[0])
    xs = ref.permute(x, slots, k)  # [S, K] expert order
    h = ref.grouped_gemm(xs, lora_a, offsets, None, slots)  # [S, r] shrink
    d = ref.grouped_gemm(h, lora_b, offsets, None, slots)  # [S, N] expand
    acc = ref.acc_dtype(x.dtype)
    delta = ref.unpermute(d.to(acc), slot_to_row, k, topk_weights)  # [T, N]
    return (F.linear(x, base_weight, base_bias).to(acc) + scaling * delta).to(x.dtype)


def lora_moe_reference_backward(grad, x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling, needs):
    """Gradients ``[x, base_weight, base_bias, lora_a, lora_b, topk_weights]`` (None where ``needs`` is False).

    With ``g_h = scaling * w * (g[t] @ B[e])`` per slot: ``dx = g @ W0 + sum_j g_h @ A[e]``,
    ``dA[e] = g_h^T x``, ``dB[e] = g^T (scaling * w * h)``, ``dw = scaling * <g[t] @ B[e], h>``.
    """
    k, acc = topk_ids.shape[1], ref.acc_dtype(x.dtype)
    slots, offsets, _, slot_to_row = ref.plan_routing(topk_ids, lora_a.shape[0])
    xs = ref.permute(x, slots, k)  # [S, K]
    h = ref.grouped_gemm(xs, lora_a, offsets, None, slots)  # [S, r]
    gs = ref.permute(grad, slots, k)  # [S, N] each slot's output gradient
    g_hu = ref.grouped_gemm(gs, lora_b, offsets, None, slots, trans_w=False)  # [S, r] g @ B[e]
    row_w = _row_weights(topk_weights, slots).to(acc) * scaling  # [S]
    g_h = (g_hu.to(acc) * row_w[:, None]).to(x.dtype)
    out = [None] * 6
    if needs[0]:
        g_xs = ref.grouped_gemm(g_h, lora_a, offsets, None, slots, trans_w=False)  # [S, K]
        out[0] = ((grad @ base_weight).to(acc) + ref.unpermute(g_xs.to(acc), slot_to_row, k)).to(x.dtype)
    if needs[1]:
        out[1] = grad.t() @ x
    if needs[2]:
        out[2] = grad.to(acc).sum(0).to(base_bias.dtype)
    if needs[3]:
        out[3] = ref.grouped_gemm_wgrad(g_h, xs, offsets)
    if needs[4]:
        out[4] = ref.grouped_gemm_wgrad(gs, (h.to(acc) * row_w[:, None]).to(x.dtype), offsets)
    if needs[5]:
        dots = (g_hu.to(acc) * h.to(acc)).sum(1).index_select(0, slot_to_row.clamp(min=0).long())  # [S] slot order
        out[5] = (torch.where(slot_to_row >= 0, dots, 0.0) * scaling).view(topk_ids.shape).to(topk_weights.dtype)
    return out


def _row_weights(topk_weights: Tensor, slots: Tensor) -> Tensor:
    """The routing weight of each row's slot ``[P]`` (0 for padding rows)."""
    picked = topk_weights.reshape(-1).index_select(0, slots.clamp(min=0).long())
    return torch.where(slots >= 0, picked, 0.0)


# ----- op registration and autograd --------------------------------------------------------------------


@custom_op("moe_kernels::lora_moe", mutates_args=())
def lora_moe_op(
    x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    topk_weights: Tensor, topk_ids: Tensor, scaling: float,
) -> Tensor:
    return lora_moe_reference(x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling)


@lora_moe_op.register_fake
def lora_moe_fake(x, base_weight, *args):
    return x.new_empty(x.shape[0], base_weight.shape[0])


@custom_op("moe_kernels::lora_moe_backward", mutates_args=())
def lora_moe_backward_op(
    grad: Tensor, x: Tensor, base_weight: Tensor, base_bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    topk_weights: Tensor, topk_ids: Tensor, scaling: float, needs: List[bool],
) -> List[Tensor]:
    grads = lora_moe_reference_backward(grad, x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids,
                                        scaling, needs)
    return [g if g is not None else x.new_empty(0) for g in grads]


@lora_moe_backward_op.register_fake
def lora_moe_backward_fake(grad, x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling, needs):
    like = (x, base_weight, base_bias, lora_a, lora_b, topk_weights)
    return [torch.empty_like(t) if n else x.new_empty(0) for t, n in zip(like, needs)]


def lora_autograd(backward_op):
    """``(backward, setup_context)`` of one backend's lora_moe op ``(x, base_weight, base_bias, lora_a,
    lora_b, topk_weights, topk_ids, scaling)``; ``backward_op`` (arguments of ``lora_moe_backward``)
    recomputes the shrink, so only the inputs are kept. The frozen base gets gradients only when it
    requires them."""

    def setup_context(ctx, inputs, output):
        x, w0, b0, a, b, w, ids, scaling = inputs
        ctx.save_for_backward(x, w0, b0, a, b, w, ids)
        ctx.scaling = scaling

    def backward(ctx, grad):
        x, w0, b0, a, b, w, ids = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = [bool(need[0]), bool(need[1]), b0 is not None and bool(need[2]), bool(need[3]), bool(need[4]), bool(need[5])]
        if not any(needs):
            return (None,) * 8
        g = backward_op(grad, x, w0, b0, a, b, w, ids, ctx.scaling, needs)
        return (*(gi if n else None for gi, n in zip(g, needs)), None, None)

    return backward, setup_context


_bwd, _setup = lora_autograd(lora_moe_backward_op)
lora_moe_op.register_autograd(_bwd, setup_context=_setup)
DENSE_SHARE = 0.25  # run every adapter densely while that costs at most this share of the base GEMM


def dense_is_cheaper(K: int, N: int, E: int, r: int) -> bool:
    """All E adapters densely cost ``E*r*(K+N)`` FLOPs per token against ``K*N`` for the base layer:
    when that is small, two dense GEMMs beat any routed kernel (no plan, no gather, no scatter)."""
    return E * r * (K + N) <= DENSE_SHARE * K * N


def lora_moe_dense(x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, scaling):
    """Every adapter for every token, each expert's rank block scaled by the token's routing weight for
    that expert (0 where not chosen): ``x @ A_cat.T`` [T, E*r], then one ``addmm`` with ``B_cat`` into the
    base output. Exact (the unchosen blocks are zero), deterministic, differentiable by autograd."""
    T = x.shape[0]
    E, r, K = lora_a.shape
    N = lora_b.shape[1]
    ids = topk_ids.long()
    gate = torch.zeros(T, E + 1, dtype=topk_weights.dtype, device=x.device)
    gate = gate.scatter_add(1, torch.where((ids >= 0) & (ids < E), ids, E), topk_weights)[:, :E]  # [T, E]; ids of a token are distinct
    h = F.linear(x, lora_a.reshape(E * r, K)).view(T, E, r) * (scaling * gate).to(x.dtype)[:, :, None]
    b_cat = lora_b.permute(1, 0, 2).reshape(N, E * r)
    return torch.addmm(F.linear(x, base_weight, base_bias), h.reshape(T, E * r), b_cat.t())


_backends.register("lora_moe", "torch")(torch.ops.moe_kernels.lora_moe.default)

# ----- public function ---------------------------------------------------------------------------------


def lora_moe(
    x: Tensor,
    base_weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    *,
    scaling: float = 1.0,
    base_bias: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """A frozen linear layer plus k of E LoRA adapters per token.

    ============= =========== ======================================================================
    argument      shape       meaning
    ============= =========== ======================================================================
    x             [T, K]      tokens (fp32/bf16/fp16/fp64)
    base_weight   [N, K]      frozen weight W0 (nn.Linear layout, x's dtype)
    lora_a        [E, r, K]   adapters' down projections A (x's dtype)
    lora_b        [E, N, r]   adapters' up projections B (x's dtype)
    topk_weights  [T, k]      routing weights (float)
    topk_ids      [T, k]      experts in [0, E), -1 = dropped (int32/int64)
    base_bias     [N]         optional b0 (x's dtype)
    y             [T, N]      ``x @ W0.T + b0 + scaling * sum_j w[t, j] * (x[t] @ A[e_j].T) @ B[e_j].T``
    ============= =========== ======================================================================

    With ``backend="auto"``, when all E adapters together are small next to the base layer
    (``E*r*(K+N) <= 0.25*K*N``, e.g. E=8, r=16 on 4096x14336), every adapter runs densely as two
    GEMMs with the unchosen experts' blocks weighted 0 (:func:`lora_moe_dense`): no plan, no gather.
    Otherwise the routed kernels run: the adapter sum is accumulated in fp32 over the k slots in a
    fixed order (no atomics): deterministic. The GEMM tiles (and the base layer's cuBLAS kernel) depend
    on the batch size; inside :func:`moe_kernels.batch_invariant` they do not (fixed tiles, the base layer
    on the same kernel, never the dense path), and a token's output is bitwise independent of its batch.
    Differentiable in x, A, B and topk_weights, and in W0 and b0
    when they require grad (a frozen base costs no weight gradient).

    Example::

        >>> w, ids = topk_gating(x @ router.T, 2)
        >>> y = lora_moe(x, linear.weight, lora_a, lora_b, w, ids, scaling=alpha / r)
    """
    fn = "lora_moe"
    f = _checks.FLOAT_DTYPES
    _checks.check_tensor(fn, "x", x, ndim=2, dtypes=f, layout="[T, K]")
    T, K = x.shape
    same = (x.dtype,)
    _checks.check_tensor(fn, "base_weight", base_weight, ndim=2, dtypes=same, shape=(None, K), layout=f"[N, K={K}] (x's dtype)")
    N = base_weight.shape[0]
    _checks.check_tensor(fn, "lora_a", lora_a, ndim=3, dtypes=same, shape=(None, None, K), layout=f"[E, r, K={K}] (x's dtype)")
    E, r = lora_a.shape[0], lora_a.shape[1]
    if E < 1 or r < 1:
        raise ValueError(f"{fn}: lora_a must have at least one expert and rank >= 1, got shape {tuple(lora_a.shape)}")
    _checks.check_tensor(fn, "lora_b", lora_b, ndim=3, dtypes=same, shape=(E, N, r),
                         layout=f"[E, N, r] (E={E} and rank r={r} of lora_a, N={N} of base_weight)")
    _checks.check_tensor(fn, "topk_ids", topk_ids, ndim=2, dtypes=_checks.ID_DTYPES, shape=(T, None), layout="[T, k]")
    k = _checks.check_top_k(fn, "topk_ids", topk_ids)
    _checks.check_tensor(fn, "topk_weights", topk_weights, dtypes=f, shape=(T, k), layout="[T, k]")
    if base_bias is not None:
        _checks.check_tensor(fn, "base_bias", base_bias, dtypes=same, shape=(N,), layout="[N] (x's dtype)")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{fn}: scaling must be a float, got {type(scaling).__name__}")
    _checks.check_same_device(fn, x=x, base_weight=base_weight, lora_a=lora_a, lora_b=lora_b, topk_weights=topk_weights,
                              topk_ids=topk_ids, base_bias=base_bias)
    _checks.check_expert_ids(fn, "topk_ids", topk_ids, E)
    if backend == "auto" and dense_is_cheaper(K, N, E, r) and not is_batch_invariant():
        return lora_moe_dense(x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, float(scaling))
    impl = _backends.select(fn, backend, x.device, x, lora_a)
    return impl(x, base_weight, base_bias, lora_a, lora_b, topk_weights, topk_ids, float(scaling))


# ----- modules -----------------------------------------------------------------------------------------


class LoRAMoE(nn.Module):
    """A frozen ``nn.Linear`` plus a router and E LoRA adapters, k per token.

    Parameters: ``base`` (the wrapped layer, frozen), ``router.weight [E, in]``, ``lora_a [E, r, in]``
    (initialised like LoRA's A: Kaiming-uniform per expert) and ``lora_b [E, out, r]`` (zeros, so the
    wrapped layer starts as the base layer). The router runs in fp32 and picks ``top_k`` adapters with
    :func:`topk_gating`. ``forward(x [..., in]) -> [..., out]``; afterwards ``aux_loss`` holds
    ``aux_loss_coef * load_balancing_loss`` (0 when the coefficient is 0): add it to the training loss.

    Example::

        >>> layer = LoRAMoE(nn.Linear(64, 32), num_experts=8, rank=16, top_k=2, scaling=2.0)
        >>> layer(torch.randn(4, 64)).sum().backward()  # grads for router, lora_a, lora_b only
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        top_k: int,
        *,
        scaling: float = 1.0,
        scoring: str = "softmax",
        renormalize: bool = True,
        aux_loss_coef: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        fn = "LoRAMoE"
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{fn}: base must be an nn.Linear, got {type(base).__name__}")
        _checks.check_int(fn, "num_experts", num_experts, lo=1)
        _checks.check_int(fn, "rank", rank, lo=1)
        _checks.check_int(fn, "top_k", top_k, lo=1, hi=num_experts)
        _checks.check_choice(fn, "scoring", scoring, ("softmax", "sigmoid"))
        factory = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.base = base
        base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.scaling, self.scoring, self.renormalize = float(scaling), scoring, renormalize
        self.aux_loss_coef, self.backend = aux_loss_coef, backend
        self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)
        self.lora_a = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.aux_loss = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as LoRA's ``kaiming_uniform_(a=sqrt(5))`` on each expert's ``[r, in]``; B zeros."""
        with torch.no_grad():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_a[e], a=math.sqrt(5))
            self.lora_b.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRAMoE: input must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        dt = torch.promote_types(x.dtype, torch.float32)  # fp32 router (fp64 stays fp64)
        logits = F.linear(x.to(dt), self.router.weight.to(dt))  # [T, E]
        out = topk_gating(logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize,
                          return_stats=bool(self.aux_loss_coef), backend=self.backend)
        weights, ids = out[0], out[1]
        y = lora_moe(x, self.base.weight, self.lora_a, self.lora_b, weights, ids, scaling=self.scaling,
                     base_bias=self.base.bias, backend=self.backend)
        self.aux_loss = self.aux_loss_coef * load_balancing_loss(stats=out[2]) if self.aux_loss_coef else logits.new_zeros(())
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"rank={self.rank}, top_k={self.top_k}, scaling={self.scaling}, backend={self.backend}")


def wrap_linear(model: nn.Module, names: str | Iterable[str], num_experts: int, rank: int, top_k: int, **kwargs) -> nn.Module:
    """Replace the named ``nn.Linear`` submodules of ``model`` by :class:`LoRAMoE` wrappers, in place.

    ``names`` as in ``model.named_modules()`` (``"layers.0.attn.q_proj"``, ``"0"`` in an
    ``nn.Sequential``); ``kwargs`` go to :class:`LoRAMoE`. Every name is checked before anything is
    replaced. Returns ``model``.

    Example::

        >>> wrap_linear(model, ["layers.0.mlp.up_proj", "layers.0.mlp.down_proj"], num_experts=8, rank=16, top_k=2)
    """
    fn = "wrap_linear"
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"{fn}: names is empty; give the names of nn.Linear submodules (as in model.named_modules())")
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or name == "":
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"{fn}: model has no submodule {name!r}; its nn.Linear submodules are {linears}")
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(f"{fn}: submodule {name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
    for name in dict.fromkeys(names):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRAMoE(modules[name], num_experts, rank, top_k, **kwargs))
    return model
