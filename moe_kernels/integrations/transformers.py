"""Hugging Face transformers on moe_kernels: the ``"moe_kernels"`` experts implementation (``register()``), and
``patch(model)`` / ``from_hf(block)`` for the fused router.

``register()`` adds ``"moe_kernels"`` to transformers' experts registry (``ALL_EXPERTS_FUNCTIONS``, and the FP8
one once moe_kernels has FP8 experts); then every MoE model whose experts class uses
``@use_experts_implementation`` runs its experts on :func:`fused_moe` (see :mod:`.hf_experts`)::

    >>> from moe_kernels.integrations.transformers import register
    >>> register()
    >>> model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_kernels")
    >>> model.set_experts_implementation("moe_kernels")     # or switch a loaded model

The registry hands the experts the router's decision; ``patch`` below also replaces the router, for the six
families it knows.

``patch(model)`` replaces, in place, every sparse-MoE block of a transformers (>= 5.0, stacked expert weights)
model by a :class:`MoEBlock` that routes with :func:`moe_kernels.topk_gating` and runs the experts with
:func:`moe_kernels.fused_moe`, on the block's own parameter tensors. Routing is matched to transformers:

=========== ======================= ==========================================================================
family      block class             routing
=========== ======================= ==========================================================================
Mixtral     MixtralSparseMoeBlock   softmax (fp32), top-k, renormalised; router jitter in training
Qwen2-MoE   Qwen2MoeSparseMoeBlock  softmax (fp32), top-k, renormalised if ``norm_topk_prob``, weights cast to
                                    the logits' dtype; plus the shared expert times ``sigmoid(shared_expert_gate)``
Qwen3-MoE   Qwen3MoeSparseMoeBlock  as Qwen2-MoE, without shared expert
OLMoE       OlmoeSparseMoeBlock     as Qwen3-MoE
DeepSeek-V3 DeepseekV3MoE           fp32 router, sigmoid; ``e_score_correction_bias`` added for selection only;
                                    ``n_group`` groups scored by their two best, ``topk_group`` kept;
                                    renormalised if ``norm_topk_prob``; times ``routed_scaling_factor``;
                                    plus the shared experts
gpt-oss     GptOssMLP               router with bias, softmax over the top-k logits (= softmax, top-k,
                                    renormalise); expert biases; ``swiglu_oai``; returns ``(out, router_scores)``
gpt-oss     Mxfp4GptOssMLP, or      as gpt-oss, with the experts held in MXFP4 (``Mxfp4GptOssExperts``) served
(MXFP4)     GptOssMLP holding       packed (:mod:`.hf_mxfp4`); returns ``(out, router_logits)`` as transformers'
            Mxfp4GptOssExperts      MXFP4 block
=========== ======================= ==========================================================================

Example::

    >>> model = AutoModelForCausalLM.from_pretrained("mistralai/Mixtral-8x7B-v0.1", dtype=torch.bfloat16)
    >>> patch(model)                     # number of blocks replaced
    32
    >>> model.generate(...)              # same state_dict, same outputs, our kernels

How: a :class:`MoEBlock` holds the original block's submodules under their original names (``gate`` or
``router``, ``experts``, ``shared_expert(s)``), so ``state_dict()`` keys and tensors are unchanged and nothing
is copied. The experts module is kept for its parameters only: its ``forward`` (and the transformers
``experts_implementation`` setting) is bypassed. The router becomes an instance of a subclass of its own class
(:class:`KernelRouter`) sharing its parameters and hooks, so transformers' ``output_router_logits`` recorder,
which matches on the router class, still records the logits (and the auxiliary loss still works).

Differences from the original blocks:

- expert ids are int32 (transformers: int64); ties between equal scores go to the lower expert index.
- gpt-oss stores ``gate_up_proj [E, H, 2I]`` with gate and up *interleaved* in columns; :func:`fused_moe` takes
  gate rows then up rows, which no strided view of that tensor can express, so each forward makes one
  (differentiable) de-interleaved copy of ``gate_up_proj`` and its bias. ``down_proj [E, I, H]`` is passed as
  a transposed view, without copy. gpt-oss's bf16 router softmax runs in fp32 here.
- forward hooks registered on the original *block* are not carried over (those on its submodules are, since
  the submodules are the same objects). Weights offloaded by accelerate hooks on ``experts`` are not supported
  (the experts' forward, where such hooks load them, is not called).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..gating import topk_gating
from ..moe import fused_moe
from ..reference import OAI_ALPHA, OAI_LIMIT
from . import hf_mxfp4

__all__ = ["FAMILIES", "Family", "KernelRouter", "MoEBlock", "Routing", "from_hf", "patch", "register"]

EXPERTS_IMPLEMENTATION = "moe_kernels"
FP8_MODULE = "moe_kernels.integrations.hf_fp8"  # moe_kernels' FP8 experts, when present
FP8_EXPERTS_FORWARD = "fp8_experts_forward"  # its transformers FP8 experts forward


def register(*, backend: str = "auto") -> list[str]:
    """Register ``"moe_kernels"`` as a transformers experts implementation; idempotent.

    ``backend`` is the moe_kernels backend of every experts call (``auto``: the fastest that serves the
    tensors; the last ``register`` call decides).

    Registers :func:`moe_kernels.integrations.hf_experts.experts_forward` in ``ALL_EXPERTS_FUNCTIONS`` and, when
    the FP8 experts module of moe_kernels exists, its FP8 experts forward in ``ALL_FP8_EXPERTS_FUNCTIONS``.
    Returns the names of the registries written. Raises ``ImportError`` when transformers (>= 5.0, with the
    experts registry) is not installed.
    """
    import importlib
    import importlib.util

    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError("register: transformers >= 5.0 (transformers.integrations.moe.ExpertsInterface) is needed "
                          f"for the experts registry ({exc})") from exc
    from . import hf_experts
    from .hf_experts import experts_forward

    if backend not in ("auto", "torch", "triton", "cuda"):
        raise ValueError(f"register: backend must be one of ('auto', 'torch', 'triton', 'cuda'), got {backend!r}")
    hf_experts.BACKEND = backend
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
    written = ["ALL_EXPERTS_FUNCTIONS"]
    fp8 = None
    if importlib.util.find_spec(FP8_MODULE) is not None:
        fp8 = getattr(importlib.import_module(FP8_MODULE), FP8_EXPERTS_FORWARD, None)
    if fp8 is not None:
        try:
            from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
        except ImportError:
            FP8ExpertsInterface = None
        if FP8ExpertsInterface is not None:
            FP8ExpertsInterface.register(EXPERTS_IMPLEMENTATION, fp8)
            written.append("ALL_FP8_EXPERTS_FUNCTIONS")
    return written


@dataclass(frozen=True)
class Family:
    """Layout and routing rules of one transformers MoE block class (see the module docstring)."""

    name: str
    router: str  # child module holding the router
    scoring: str = "softmax"
    renormalize: str | bool = True  # True, or the router (or block) attribute that decides
    grouped: bool = False  # DeepSeek-V3: fp32 router, correction bias, groups, routed scaling factor
    weights_in_logits_dtype: bool = False  # the router hands on weights cast to the logits' dtype
    gpt_oss: bool = False  # interleaved gate/up [E, H, 2I], expert biases, swiglu_oai, returns router scores
    shared: str | None = None  # child module with the shared expert(s)
    shared_gate: str | None = None  # child Linear(H, 1) whose sigmoid scales the shared output


FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family("mixtral", "gate"),
    "Qwen2MoeSparseMoeBlock": Family("qwen2_moe", "gate", renormalize="norm_topk_prob", weights_in_logits_dtype=True,
                                     shared="shared_expert", shared_gate="shared_expert_gate"),
    "Qwen3MoeSparseMoeBlock": Family("qwen3_moe", "gate", renormalize="norm_topk_prob", weights_in_logits_dtype=True),
    "OlmoeSparseMoeBlock": Family("olmoe", "gate", renormalize="norm_topk_prob", weights_in_logits_dtype=True),
    "DeepseekV3MoE": Family("deepseek_v3", "gate", scoring="sigmoid", renormalize="norm_topk_prob", grouped=True,
                            shared="shared_experts"),
    "GptOssMLP": Family("gpt_oss", "router", weights_in_logits_dtype=True, gpt_oss=True),
}


@dataclass(frozen=True)
class Routing:
    """Arguments of :func:`topk_gating` for one router, plus where transformers computes in which dtype."""

    top_k: int
    scoring: str
    renormalize: bool
    num_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0
    correction_bias: bool = False  # use the router's ``e_score_correction_bias`` buffer
    fp32_logits: bool = False  # logits computed from fp32 copies of input and weight (DeepSeek-V3)
    fp32_scores: bool = True  # scores in fp32 even for fp64 logits, as transformers' ``softmax(logits.float())``
    weights_in_logits_dtype: bool = False


class KernelRouter(nn.Module):
    """``forward`` of a transformers router on :func:`topk_gating`: ``(logits [T, E], weights [T, k], ids [T, k])``.

    Never instantiated alone: :func:`from_hf` makes a subclass of (this, the original router class) and an
    instance of it that shares the original router's parameters, buffers and hooks.
    """

    mk_routing: Routing
    mk_backend: str

    def forward(self, hidden_states: torch.Tensor):
        r = self.mk_routing
        x = hidden_states.reshape(-1, self.weight.shape[1])  # [T, H]
        if r.fp32_logits:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight, getattr(self, "bias", None))  # [T, E]
        weights, ids = topk_gating(
            logits.float() if r.fp32_scores else logits, r.top_k, scoring=r.scoring, renormalize=r.renormalize,
            correction_bias=self.e_score_correction_bias if r.correction_bias else None, num_groups=r.num_groups,
            topk_groups=r.topk_groups, scaling_factor=r.scaling_factor, backend=self.mk_backend,
        )
        if r.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        return logits, weights, ids


_ROUTER_CLASSES: dict[type, type] = {}


def _kernel_router(router: nn.Module, routing: Routing, backend: str) -> nn.Module:
    """A new module of class ``(KernelRouter, type(router))`` sharing ``router``'s tensors and hooks."""
    cls = type(router)
    sub = _ROUTER_CLASSES.get(cls)
    if sub is None:
        sub = type(f"MoEKernels{cls.__name__}", (KernelRouter, cls), {"__module__": __name__})
        _ROUTER_CLASSES[cls] = sub
    new = sub.__new__(sub)
    # shallow copies of the containers (parameters, buffers, hooks): the same tensors in new dicts
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in vars(router).items()})
    new.mk_routing = routing
    new.mk_backend = backend
    return new


class MoEBlock(nn.Module):
    """A transformers sparse-MoE block running on moe_kernels; made by :func:`from_hf`.

    ``forward(hidden_states [..., H])`` returns what the original block returns: ``out [..., H]``, or
    ``(out, router_scores [T, k])`` for gpt-oss. The submodules are the original block's, under the same names
    (the router re-classed as a :class:`KernelRouter`), so ``state_dict()`` is unchanged.
    """

    def __init__(self, block: nn.Module, family: Family, router: nn.Module, activation: str, backend: str):
        super().__init__()
        for k, v in vars(block).items():  # plain attributes: top_k, jitter_noise, config, ...
            if not k.startswith("_") and k != "training":
                setattr(self, k, v)
        for name, p in block._parameters.items():
            self.register_parameter(name, p)
        for name, b in block._buffers.items():
            self.register_buffer(name, b, persistent=name not in block._non_persistent_buffers_set)
        for name, child in block.named_children():
            self.add_module(name, router if name == family.router else child)
        self.train(block.training)
        self.family, self.activation, self.backend = family, activation, backend
        self.hf_class = type(block).__name__

    def expert_weights(self):
        """``(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None)`` in :func:`fused_moe`'s layout."""
        e = self.experts
        if not self.family.gpt_oss:
            return e.gate_up_proj, e.down_proj, None, None
        E, H, I2 = e.gate_up_proj.shape
        # columns (g0, u0, g1, u1, ...) -> rows (g0, g1, ..., u0, u1, ...): a copy, no strided view can do it
        w13 = e.gate_up_proj.view(E, H, I2 // 2, 2).permute(0, 3, 2, 1).reshape(E, I2, H)
        b13 = e.gate_up_proj_bias.view(E, I2 // 2, 2).transpose(1, 2).reshape(E, I2)
        return w13, e.down_proj.transpose(1, 2), b13, e.down_proj_bias

    def forward(self, hidden_states: torch.Tensor):
        f = self.family
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        jitter = getattr(self, "jitter_noise", 0.0)
        if self.training and jitter:  # Mixtral's multiplicative router jitter
            x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
        _, weights, ids = getattr(self, f.router)(x)  # [T, k]
        w13, w2, b13, b2 = self.expert_weights()
        out = fused_moe(x, w13, w2, weights, ids, activation=self.activation, w13_bias=b13, w2_bias=b2,
                        backend=self.backend)
        if f.shared is not None:
            shared = getattr(self, f.shared)(x)
            if f.shared_gate is not None:
                shared = torch.sigmoid(getattr(self, f.shared_gate)(x)) * shared
            out = out + shared
        out = out.reshape(shape)
        return (out, weights) if f.gpt_oss else out

    def extra_repr(self) -> str:
        return f"hf_class={self.hf_class}, activation={self.activation}, backend={self.backend}"


def _attr(fn: str, names: tuple[str, ...], *objs):
    for o in objs:
        for n in names:
            if hasattr(o, n):
                return getattr(o, n)
    raise ValueError(f"{fn}: expected attribute {' or '.join(names)} on {type(objs[0]).__name__} "
                     f"(transformers layout not recognised)")


def _routing(block: nn.Module, f: Family, router: nn.Module) -> Routing:
    fn = "from_hf"
    top_k = int(_attr(fn, ("top_k",), router, block))
    renorm = True if f.renormalize is True else bool(_attr(fn, (f.renormalize,), router, block))
    if f.grouped:
        return Routing(
            top_k, f.scoring, renorm,
            num_groups=int(_attr(fn, ("num_group", "n_group"), router, block)),
            topk_groups=int(_attr(fn, ("topk_group",), router, block)),
            scaling_factor=float(_attr(fn, ("routed_scaling_factor",), router, block)),
            correction_bias=True, fp32_logits=True,
        )
    return Routing(top_k, f.scoring, renorm, fp32_scores=not f.gpt_oss,
                   weights_in_logits_dtype=f.weights_in_logits_dtype)


def _activation(experts: nn.Module, f: Family) -> str:
    fn = "from_hf"
    if f.gpt_oss:
        alpha, limit = float(experts.alpha), float(experts.limit)
        if (alpha, limit) != (OAI_ALPHA, OAI_LIMIT):
            raise ValueError(f"{fn}: gpt-oss swiglu_alpha={alpha}, swiglu_limit={limit}; fused_moe's swiglu_oai "
                             f"has alpha={OAI_ALPHA}, limit={OAI_LIMIT}")
        return "swiglu_oai"
    act = getattr(experts, "act_fn", None)
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name == "ReLU":
        return "relu"
    if (name == "GELU" and act.approximate == "none") or (name == "GELUActivation"):  # both exact (erf)
        return "gelu"
    raise ValueError(f"{fn}: expert activation {name} is not one of fused_moe's silu, gelu (exact), relu")


def _check_layout(block: nn.Module, f: Family, router, experts) -> None:
    fn, cls = "from_hf", type(block).__name__
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3 or down.dim() != 3:
        raise ValueError(f"{fn}: {cls}.experts has no stacked 3-D gate_up_proj/down_proj (transformers < 5 keeps "
                         "one module per expert); transformers >= 5.0 is needed")
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{fn}: {cls}.{f.router} has no 2-D weight [E, H]")
    E, H = weight.shape
    if f.gpt_oss:
        biases = (getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None))
        if not all(isinstance(b, torch.Tensor) for b in biases):
            raise ValueError(f"{fn}: {cls}.experts has no gate_up_proj_bias/down_proj_bias")
        want_gu, want_down = (E, H, None), (E, None, H)
    else:
        want_gu, want_down = (E, None, H), (E, H, None)
    ok = all(w is None or w == s for w, s in zip(want_gu + want_down, tuple(gu.shape) + tuple(down.shape)))
    inter = down.shape[1] if f.gpt_oss else down.shape[2]
    if not ok or gu.shape[2 if f.gpt_oss else 1] != 2 * inter:
        raise ValueError(f"{fn}: {cls} expert weights gate_up_proj {tuple(gu.shape)}, down_proj {tuple(down.shape)} "
                         f"do not match router weight {tuple(weight.shape)} and the transformers 5.x layout")


def from_hf(block: nn.Module, *, backend: str = "auto") -> MoEBlock:
    """A :class:`MoEBlock` that computes what ``block`` (a transformers sparse-MoE block, see the module docstring)
    computes, on the same parameter tensors, with :func:`topk_gating` and :func:`fused_moe` (``backend`` is passed
    to both). ``block`` itself is left as it was.

    Example::

        >>> moe = from_hf(model.model.layers[0].mlp)
        >>> y = moe(torch.randn(2, 5, model.config.hidden_size))
    """
    cls = type(block).__name__
    if hf_mxfp4.is_mxfp4_block(block):  # gpt-oss experts held in MXFP4: served packed
        return hf_mxfp4.from_hf(block, backend=backend)
    family = FAMILIES.get(cls)
    if family is None:
        raise ValueError(f"from_hf: {cls} is not a supported transformers MoE block (supported: {', '.join(FAMILIES)})")
    router, experts = getattr(block, family.router, None), getattr(block, "experts", None)
    _check_layout(block, family, router, experts)
    routing = _routing(block, family, router)
    activation = _activation(experts, family)
    return MoEBlock(block, family, _kernel_router(router, routing, backend), activation, backend)


def patch(model: nn.Module, *, backend: str = "auto") -> int:
    """Replace every supported sparse-MoE block of ``model`` in place by :func:`from_hf` ``(block, backend=backend)``.

    Returns the number of blocks replaced (0 when there are none, or when ``model`` is already patched).
    ``model.state_dict()`` keeps its keys and its tensors (same storage). All blocks are converted before any is
    swapped in, so a block that cannot be converted raises and leaves ``model`` untouched.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if type(m).__name__ in FAMILIES or hf_mxfp4.is_mxfp4_block(m)]
    if any(name == "" for name, _ in targets):
        raise ValueError(f"patch: the model is itself a {type(model).__name__}; use from_hf(block) instead")
    replacements = [(name, from_hf(block, backend=backend)) for name, block in targets]
    for name, new in replacements:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return len(replacements)
