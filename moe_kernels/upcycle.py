"""Dense-to-sparse and sparse-to-dense: sparse upcycling of a dense FFN into an :class:`~moe_kernels.MoE`, merging
experts, and collapsing a layer back into one FFN.

- :func:`from_dense` (Komatsuzaki et al., "Sparse Upcycling", ICLR 2023): every expert starts as a copy of the dense
  FFN (optionally perturbed), the router is freshly initialised. With ``noise=0`` and routing weights that sum to 1
  per token (``renormalize=True``, or ``top_k = E`` with softmax), the layer computes the dense FFN exactly.
- :func:`merge_experts` (usage-weighted merging within clusters chosen by router similarity, in the spirit of
  M-SMoE, Li et al., "Merge, Then Compress", ICLR 2024): the ``num_out`` most used experts seed the clusters, every
  other expert joins the seed whose router row is most similar (cosine), and each cluster becomes one expert, the
  usage-weighted average of its members, routed by its seed's router row.
- :func:`to_dense`: one FFN, the usage-weighted average of all experts (plus the layer's shared and residual parts).

Usage defaults to the token counts the layer accumulated in ``moe.run_stats`` (uniform when it has seen no tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .moe import activation as _activation

__all__ = ["DenseFFN", "dense_weights", "expert_clusters", "from_dense", "merge_experts", "to_dense"]


class DenseFFN(nn.Module):
    """One (gated) MLP, the dense counterpart of an :class:`~moe_kernels.MoE`: ``forward(x [..., H]) -> [..., H]``.

    Parameters ``w13 [2I, H]`` (gate rows first; ``[I, H]`` when not gated), ``w2 [H, I]`` (+ ``b13``, ``b2``);
    optional ``shared``/``shared_gate`` and ``residual_mlp``/``residual_coef`` modules behave as in ``MoE``:
    ``y = ffn(x) + shared(x)``, then ``c0 * residual_mlp(x) + c1 * y``.
    """

    def __init__(self, w13, w2, b13=None, b2=None, *, activation: str = "silu", gated: bool = True, shared=None,
                 shared_gate=None, residual_mlp=None, residual_coef=None):
        super().__init__()
        self.activation, self.gated = activation, gated
        self.hidden_size, self.intermediate_size = w2.shape
        self.w13, self.w2 = nn.Parameter(w13), nn.Parameter(w2)
        self.b13 = nn.Parameter(b13) if b13 is not None else None
        self.b2 = nn.Parameter(b2) if b2 is not None else None
        self.shared, self.shared_gate = shared, shared_gate
        self.residual_mlp, self.residual_coef = residual_mlp, residual_coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"DenseFFN: input must have shape [..., {self.hidden_size}], got {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        h = F.linear(x, self.w13, self.b13)
        out = F.linear(_activation(h, self.activation, gated=self.gated), self.w2, self.b2)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        if self.residual_mlp is not None:
            dt = torch.promote_types(x.dtype, torch.float32)
            c = torch.softmax(F.linear(x.to(dt), self.residual_coef.weight.to(dt)), -1).to(out.dtype)
            out = c[:, :1] * self.residual_mlp(x) + c[:, 1:] * out
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation}, gated={self.gated}")


def _activation_of(module) -> str | None:
    for name in ("act_fn", "activation_fn", "act", "activation"):
        act = getattr(module, name, None)
        if isinstance(act, str):
            return act
        if act is not None:
            n = type(act).__name__.lower()
            if "silu" in n or "swish" in n:
                return "silu"
            if "relu" in n:
                return "relu"
            if n in ("gelu", "geluactivation") and getattr(act, "approximate", "none") == "none":
                return "gelu"
            return None
    return None


def dense_weights(mlp, *, gated: bool | None = None):
    """``(w13 [rows, H], w2 [H, I], b13 | None, b2 | None, gated, activation | None)`` of a dense FFN.

    ``mlp``: a module with ``gate_proj``/``up_proj``/``down_proj`` (Llama, Qwen, Mixtral's shared experts, this
    package's ``SharedExpert``), ``w1``/``w3``/``w2`` (Mixtral experts), ``wi_0``/``wi_1``/``wo`` (T5 gated),
    ``fc1``/``fc2`` or ``wi``/``wo`` (plain MLPs), a :class:`DenseFFN`; or the weights themselves: a tuple
    ``(w13, w2[, b13, b2])`` or a dict with those keys (``gated`` then says whether w13 is ``[gate | up]``,
    default True). The activation is read from the module's ``act_fn`` where it can be (else None).
    """
    fn = "MoE.from_dense"
    if isinstance(mlp, (tuple, list, dict)):
        d = dict(mlp) if isinstance(mlp, dict) else dict(zip(("w13", "w2", "b13", "b2"), mlp))
        if "w13" not in d or "w2" not in d:
            raise ValueError(f"{fn}: mlp weights must hold w13 [2I, H] and w2 [H, I] (optionally b13, b2), got keys {sorted(d)}")
        return d["w13"], d["w2"], d.get("b13"), d.get("b2"), True if gated is None else gated, None
    if not isinstance(mlp, nn.Module):
        raise TypeError(f"{fn}: mlp must be an nn.Module or a tuple/dict of weights (w13, w2[, b13, b2]), got "
                        f"{type(mlp).__name__}")
    if isinstance(mlp, DenseFFN):
        if any(getattr(mlp, n) is not None for n in ("shared", "shared_gate", "residual_mlp", "residual_coef")):
            raise ValueError(f"{fn}: this DenseFFN has shared or residual parts, which one MoE expert cannot hold; "
                             "pass (ffn.w13, ffn.w2, ffn.b13, ffn.b2) to upcycle its FFN alone")
        return mlp.w13, mlp.w2, mlp.b13, mlp.b2, mlp.gated, mlp.activation
    act = _activation_of(mlp)
    for gate, up, down in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("wi_0", "wi_1", "wo")):
        g, u, o = (getattr(mlp, n, None) for n in (gate, up, down))
        if isinstance(g, nn.Linear) and isinstance(o, nn.Linear):
            ins = [g] + ([u] if isinstance(u, nn.Linear) else [])
            w13 = torch.cat([m.weight for m in ins])
            b13 = None
            if any(m.bias is not None for m in ins):
                b13 = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in ins])
            return w13, o.weight, b13, o.bias, len(ins) == 2, act
    for inp, out in (("fc1", "fc2"), ("wi", "wo")):
        i, o = getattr(mlp, inp, None), getattr(mlp, out, None)
        if isinstance(i, nn.Linear) and isinstance(o, nn.Linear):
            return i.weight, o.weight, i.bias, o.bias, False, act
    raise ValueError(f"{fn}: cannot find the FFN weights of {type(mlp).__name__}: expected gate_proj/up_proj/down_proj, "
                     "w1/w3/w2, wi_0/wi_1/wo, fc1/fc2 or wi/wo linear layers, or pass (w13, w2[, b13, b2])")


def from_dense(mlp, num_experts: int, top_k: int, *, noise: float = 0.0, activation: str | None = None,
               gated: bool | None = None, generator: torch.Generator | None = None, **moe_kwargs):
    """Sparse upcycling: an :class:`~moe_kernels.MoE` whose ``num_experts`` experts are copies of the dense FFN ``mlp``.

    ``noise`` perturbs each expert independently: ``w + noise * std(w) * N(0, 1)`` per weight tensor (biases kept),
    so experts can diverge; ``noise=0`` gives identical experts, and the layer then equals the dense FFN whenever
    each token's routing weights sum to 1 (the default ``renormalize=True``). ``activation`` defaults to the module's
    (``act_fn``), else ``silu``; ``moe_kwargs`` go to ``MoE`` (``dtype``/``device`` default to the weights').

    Example::

        >>> dense = SharedExpert(64, 128, "silu", True)
        >>> moe = MoE.from_dense(dense, num_experts=8, top_k=2)       # moe(x) == dense(x) at initialisation
    """
    from .layer import MoE

    fn = "MoE.from_dense"
    w13, w2, b13, b2, is_gated, act = dense_weights(mlp, gated=gated)
    _checks.check_tensor(fn, "w13", w13, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[2I, H] (or [I, H])")
    _checks.check_tensor(fn, "w2", w2, ndim=2, dtypes=(w13.dtype,), shape=(w13.shape[1], None), layout="[H, I]")
    H, inter = w2.shape
    rows = 2 * inter if is_gated else inter
    _checks.check_tensor(fn, "w13", w13, shape=(rows, H), layout="[2I, H] (gate rows, then up rows)" if is_gated else "[I, H]")
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise >= 0:
        raise ValueError(f"{fn}: noise must be a float >= 0, got {noise!r}")
    kwargs = dict(dtype=w13.dtype, device=w13.device, expert_bias=b13 is not None or b2 is not None,
                  activation=activation or act or "silu", gated=is_gated)
    kwargs.update(moe_kwargs)
    moe = MoE(H, inter, num_experts, top_k, **kwargs)
    with torch.no_grad():
        for p, w in ((moe.w13, w13), (moe.w2, w2), (moe.b13, b13), (moe.b2, b2)):
            if p is None:
                continue
            w = torch.zeros(p.shape[1:], dtype=p.dtype, device=p.device) if w is None else w.detach().to(p)
            p.copy_(w.expand_as(p))
            if noise and p.dim() == 3 and w.numel() > 1:
                z = torch.randn(p.shape, generator=generator, dtype=torch.float32, device="cpu").to(p)
                p.add_(z * (noise * w.float().std().item()))
    return moe


def _usage(moe, usage) -> torch.Tensor:
    E = moe.num_experts
    if usage is None:
        counts = moe.run_stats.tokens_per_expert if getattr(moe, "run_stats", None) is not None else None
        usage = counts if counts is not None and bool(counts.sum() > 0) else torch.ones(E)
    _checks.check_tensor("MoE.merge_experts", "usage", usage, shape=(E,), layout="[E] (tokens per expert)")
    usage = usage.detach().to(torch.float64).cpu()
    if bool((usage < 0).any()) or not bool(torch.isfinite(usage).all()):
        raise ValueError("MoE.merge_experts: usage must be finite and >= 0")
    return usage


def expert_clusters(router_weight: torch.Tensor, usage: torch.Tensor, num_out: int) -> list[list[int]]:
    """Clusters of experts, one per output expert, each a list of expert ids with its seed first; clusters ordered
    by seed id. Seeds: the ``num_out`` most used experts (ties to the lower id); every other expert joins the seed
    with the most similar router row (cosine similarity; ties to the earlier seed)."""
    E = usage.shape[0]
    seeds = sorted(torch.sort(-usage, stable=True).indices[:num_out].tolist())
    r = F.normalize(router_weight.detach().to(torch.float64).cpu(), dim=1)
    sim = r @ r[seeds].t()  # [E, num_out]
    clusters = [[s] for s in seeds]
    for e in range(E):
        if e not in seeds:
            clusters[int(sim[e].argmax())].append(e)  # argmax returns the first maximum
    return clusters


def _merged_params(moe, clusters, usage):
    """Usage-weighted averages of the expert tensors over each cluster (uniform where a cluster saw no tokens)."""
    out = {}
    for name in ("w13", "w2", "b13", "b2"):
        p = getattr(moe, name)
        if p is None:
            continue
        merged = []
        for c in clusters:
            u = usage[c]
            u = u / u.sum() if u.sum() > 0 else torch.full_like(u, 1.0 / len(c))
            w = p.detach()[c].to(torch.float64)  # [n, ...]
            merged.append((u.to(w.device).view(-1, *[1] * (w.dim() - 1)) * w).sum(0).to(p.dtype))
        out[name] = torch.stack(merged)
    return out


def _check_mergeable(moe, fn):
    if moe.ep is not None:
        raise ValueError(f"{fn}: the layer's experts are sharded over ranks (ep_group); gather them into an unsharded "
                         "MoE first")
    if moe.routing == "hierarchical" or moe.num_groups > 1:
        raise ValueError(f"{fn}: merging experts across groups would break the layer's expert groups "
                         f"(routing={moe.routing!r}, num_groups={moe.num_groups}); only flat routing is supported")


def merge_experts(moe, num_out: int, *, usage: torch.Tensor | None = None):
    """A new :class:`~moe_kernels.MoE` with ``num_out`` experts, merged from ``moe``'s (see the module docstring).

    ``usage`` [E]: tokens per expert (default: ``moe.run_stats``, uniform if empty). The new layer keeps every other
    setting, with ``top_k = min(top_k, num_out)``; its router rows (and biases) are the seeds'. Merging identical
    experts changes nothing when routing weights sum to 1 per token (``renormalize=True``)."""
    from .layer import MoE

    fn = "MoE.merge_experts"
    _check_mergeable(moe, fn)
    _checks.check_int(fn, "num_out", num_out, lo=1, hi=moe.num_experts)
    usage = _usage(moe, usage)
    clusters = expert_clusters(moe.router.weight, usage, num_out)
    seeds = [c[0] for c in clusters]
    config = dict(moe._config)
    config.update(num_experts=num_out, top_k=min(moe.top_k, num_out), dtype=moe.w13.dtype, device=moe.w13.device)
    new = MoE(**config)
    state = moe.state_dict()
    state.update(_merged_params(moe, clusters, usage))
    index = torch.tensor(seeds, device=moe.router.weight.device)
    for name in ("router.weight", "router.bias", "correction_bias"):
        if name in state:
            state[name] = state[name].index_select(0, index.to(state[name].device))
    new.load_state_dict(state)
    return new


def to_dense(moe, *, usage: torch.Tensor | None = None) -> DenseFFN:
    """One FFN (:class:`DenseFFN`): the usage-weighted average of ``moe``'s experts, with copies of its shared expert
    and residual parts; the same forward API. Equal to ``moe`` when its experts are identical and each token's
    routing weights sum to 1."""
    import copy

    fn = "MoE.to_dense"
    _check_mergeable(moe, fn)
    usage = _usage(moe, usage)
    p = _merged_params(moe, [list(range(moe.num_experts))], usage)
    parts = {n: copy.deepcopy(getattr(moe, n)) for n in ("shared", "shared_gate", "residual_mlp", "residual_coef")}
    return DenseFFN(p["w13"][0], p["w2"][0], p["b13"][0] if "b13" in p else None, p["b2"][0] if "b2" in p else None,
                    activation=moe.activation, gated=moe.gated, **parts)

