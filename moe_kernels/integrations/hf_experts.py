"""The experts of every transformers (>= 5.0) MoE model on moe_kernels, through transformers' experts registry.

transformers decorates the experts class of each MoE model with ``@use_experts_implementation``; its forward
calls the function registered under ``config._experts_implementation`` in ``ALL_EXPERTS_FUNCTIONS`` with
``(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``, the layout described by flags on
the module. :func:`experts_forward` is that function for ``"moe_kernels"`` (registered by
:func:`moe_kernels.integrations.transformers.register`). It reads the module once and picks a path:

=========== ==============================================================================================
path        when, and what runs
=========== ==============================================================================================
fused       the activation is one of :func:`fused_moe`'s (``silu``, ``gelu``, ``relu``, ``swiglu_oai``;
            gated or not): one :func:`fused_moe` call on the module's own tensors. Transposed weights
            (``is_transposed``) are passed as transposed views and gpt-oss's interleaved gate/up columns
            with ``gate_up_interleaved=True``: no weight is copied.
composed    any other activation (a custom ``_apply_gate`` such as a clamped SwiGLU, ``gelu_pytorch_tanh``,
            ``relu2``, ...) or a post-expert norm: :func:`plan_routing`, :func:`permute`, our
            :func:`grouped_gemm`, the module's own ``_apply_gate`` / ``act_fn``, :func:`grouped_gemm`, the
            module's ``post_expert_norm``, :func:`unpermute` with the routing weights.
fallback    what neither can serve (weights that are not plain 3-D float tensors, routing weights that are
            not ``[T, k]``, ...): transformers' own ``grouped_mm`` experts, with one warning naming the class
            and the reason.
=========== ==============================================================================================

The activation is recognised by value, not by name: the module's gate function is evaluated once on a fixed
float64 probe and compared with each of our activations in both gate/up layouts, so a model whose
``_apply_gate`` computes exactly gpt-oss's clamped SwiGLU gets the fused path whatever its class is called.

Expert-parallel sentinel ids (``>= num_experts``, the experts a rank does not hold) are dropped, as -1 ids
(no GEMM rows, no output, zero router gradient). Routing weights and expert weights get gradients as in
transformers' implementations. The computation runs in the weights' dtype (the input is cast to it, as
transformers' ``grouped_mm`` does) and returns the input's dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import _checks, _cpu_moe, _torch_moe
from ..gemm import grouped_gemm
from ..moe import fused_moe
from ..reference import GATED_ACTIVATIONS, PLAIN_ACTIVATIONS
from ..reference import activation as _ref_activation
from ..routing import plan_routing, permute, unpermute

__all__ = ["ExpertsLayout", "experts_forward", "experts_layout"]

NAME = "moe_kernels"
BACKEND = "auto"  # moe_kernels backend of every call; set by register(backend=...)
_SPEC_ATTR = "_moe_kernels_layout"
_CHECKED_ATTR = "_moe_kernels_checked"  # the signature of the last call fused_moe's checks passed (CPU path)
_WARNED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class ExpertsLayout:
    """How :func:`experts_forward` serves one experts module (see the module docstring).

    ``path`` is ``"fused"``, ``"composed"`` or ``"fallback"``; ``reason`` says why (for the latter two);
    ``activation`` is our name of the module's activation on the fused path.
    """

    path: str
    reason: str = ""
    activation: str | None = None
    gated: bool = True
    interleaved: bool = False
    transposed: bool = False
    has_bias: bool = False
    post_norm: bool = False
    up_name: str = "gate_up_proj"


def _probe() -> torch.Tensor:
    """A fixed float64 input ``[8, 24]`` that spans [-12, 12] (past gpt-oss's clamps at +-7) in every column."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(8, 24, generator=g, dtype=torch.float64) * 24 - 12)


def _match_activation(fn, gated: bool) -> tuple[str | None, bool, str]:
    """``(activation, interleaved, why)``: which of ours ``fn`` (``[P, 2I] -> [P, I]``, or ``[P, I] -> [P, I]``)
    computes, found by evaluating it on :func:`_probe`; ``(None, False, why)`` when none does."""
    h = _probe()
    try:
        with torch.no_grad():
            want = fn(h)
    except Exception as exc:  # the module's function cannot run on a CPU float64 tensor
        return None, False, f"its activation could not be evaluated on a probe ({type(exc).__name__}: {exc})"
    if not isinstance(want, torch.Tensor) or want.dtype != torch.float64:
        return None, False, "its activation does not map a float64 tensor to a float64 tensor"
    kinds = GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS
    for interleaved in ((False, True) if gated else (False,)):
        for kind in kinds:
            got = _ref_activation(h, kind, gated, interleaved)
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12):
                return kind, interleaved, ""
    return None, False, "its activation is none of fused_moe's (silu, gelu, relu, swiglu_oai)"


def _tensor(module, name: str):
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def experts_layout(module: torch.nn.Module) -> ExpertsLayout:
    """Read a transformers experts module (its ``@use_experts_implementation`` flags, weights and activation)
    and decide how :func:`experts_forward` serves it; cached on the module."""
    spec = module.__dict__.get(_SPEC_ATTR)
    if spec is None:
        spec = _read_layout(module)
        module.__dict__[_SPEC_ATTR] = spec
    return spec


def _read_layout(m: torch.nn.Module) -> ExpertsLayout:
    gated = bool(getattr(m, "has_gate", True))
    transposed = bool(getattr(m, "is_transposed", False))
    has_bias = bool(getattr(m, "has_bias", False))
    post_norm = bool(getattr(m, "has_post_expert_norm", False))
    up_name = "gate_up_proj" if gated else "up_proj"
    base = dict(gated=gated, transposed=transposed, has_bias=has_bias, post_norm=post_norm, up_name=up_name)
    up, down = _tensor(m, up_name), _tensor(m, "down_proj")
    if up is None or down is None:
        return ExpertsLayout("fallback", f"no tensors {up_name} and down_proj", **base)
    for name, t in ((up_name, up), ("down_proj", down)):
        if t.dim() != 3 or t.dtype not in _checks.FLOAT_DTYPES or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return ExpertsLayout("fallback", f"{name} is not a plain 3-D float tensor ({type(t).__name__}, "
                                             f"{t.dtype}, shape {tuple(t.shape)})", **base)
    if has_bias and (_tensor(m, up_name + "_bias") is None or _tensor(m, "down_proj_bias") is None):
        return ExpertsLayout("fallback", f"has_bias is set but {up_name}_bias/down_proj_bias are missing", **base)
    if post_norm and not callable(getattr(m, "post_expert_norm", None)):
        return ExpertsLayout("fallback", "has_post_expert_norm is set but post_expert_norm is missing", **base)
    if gated:
        fn = m._apply_gate if callable(getattr(m, "_apply_gate", None)) else None
        if fn is None:
            return ExpertsLayout("fallback", "gated experts without _apply_gate", **base)
    else:
        fn = getattr(m, "act_fn", None)
        if not callable(fn):
            return ExpertsLayout("fallback", "non-gated experts without act_fn", **base)
    kind, interleaved, why = _match_activation(fn, gated)
    if kind is None:
        return ExpertsLayout("composed", why, **base)
    if post_norm:
        return ExpertsLayout("composed", "a post-expert norm runs between the experts and the combine", **base)
    return ExpertsLayout("fused", "", activation=kind, interleaved=interleaved, **base)


def _fall_back(m, reason: str, args, kwargs):
    key = (type(m).__name__, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"moe_kernels experts: {type(m).__name__} runs on transformers' grouped_mm experts instead: "
                      f"{reason}", stacklevel=3)
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(m, *args, **kwargs)


def _signature(x, ids, weights, w13, w2, b13, b2):
    """What ``fused_moe``'s argument checks read (types, shapes, dtypes, devices) when the call takes the eager
    CPU path; None where it does not (or the strict value mode reads ids): such calls are always checked."""
    if BACKEND not in ("auto", "torch") or not _cpu_moe.serves(x, w13, w2) or _checks.strict_values():
        return None
    return tuple((type(t), t.shape, t.dtype, t.device) if t is not None else None
                 for t in (x, ids, weights, w13, w2, b13, b2))


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The ``"moe_kernels"`` experts implementation of transformers' ``ALL_EXPERTS_FUNCTIONS``.

    ============== ========= ====================================================================
    argument       shape     meaning
    ============== ========= ====================================================================
    hidden_states  [T, H]    tokens (any float dtype; computed in the weights' dtype)
    top_k_index    [T, k]    experts in [0, E); ids >= E (expert-parallel sentinels) are dropped
    top_k_weights  [T, k]    routing weights (differentiable)
    out            [T, H]    ``sum_j w[t, j] * expert_{ids[t, j]}(x_t)`` in ``hidden_states``' dtype
    ============== ========= ====================================================================

    The layout (gate, concatenation, transposition, biases, activation, post-expert norm) comes from the
    module (:func:`experts_layout`).
    """
    spec = experts_layout(self)
    call = (hidden_states, top_k_index, top_k_weights) + args
    if spec.path == "fallback":
        return _fall_back(self, spec.reason, call, kwargs)
    if args or kwargs:
        return _fall_back(self, f"unexpected extra arguments {len(args)} positional, {sorted(kwargs)}", call, kwargs)
    up, down = getattr(self, spec.up_name), self.down_proj
    E = up.shape[0]
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2:
        return _fall_back(self, f"routing tensors of shapes {tuple(top_k_index.shape)} and "
                                f"{tuple(top_k_weights.shape)} (expected two [T, k])", call, kwargs)
    if down.dtype != up.dtype:
        return _fall_back(self, f"{spec.up_name} is {up.dtype} but down_proj is {down.dtype}", call, kwargs)
    x = hidden_states if hidden_states.dtype == up.dtype else hidden_states.to(up.dtype)
    ids = top_k_index  # expert-parallel sentinels (>= E) are dropped slots on every backend, as -1
    if _checks.strict_values():  # where only [0, E) and -1 pass
        ids = top_k_index.masked_fill(top_k_index >= E, -1)
    w13 = up.transpose(1, 2) if spec.transposed else up  # [E, 2I, H] (a view)
    w2 = down.transpose(1, 2) if spec.transposed else down  # [E, H, I]
    b13 = getattr(self, spec.up_name + "_bias") if spec.has_bias else None
    b2 = self.down_proj_bias if spec.has_bias else None
    if spec.path == "fused":
        sig = _signature(x, ids, top_k_weights, w13, w2, b13, b2)
        if sig is not None and self.__dict__.get(_CHECKED_ATTR) == sig:  # checked before: straight to the CPU path
            out = _torch_moe.fused_moe(x, w13, w2, top_k_weights, ids, spec.activation, spec.gated, b13, b2, False,
                                       None, None, spec.interleaved)
        else:
            out = fused_moe(x, w13, w2, top_k_weights, ids, activation=spec.activation, gated=spec.gated,
                            w13_bias=b13, w2_bias=b2, gate_up_interleaved=spec.interleaved, backend=BACKEND)
            if sig is not None:
                self.__dict__[_CHECKED_ATTR] = sig
    else:
        b = BACKEND
        plan = plan_routing(ids, E, backend=b)
        h = grouped_gemm(permute(x, plan, backend=b), w13, plan, bias=b13, backend=b)  # [S, 2I], the model's layout
        a = self._apply_gate(h) if spec.gated else self.act_fn(h)  # [S, I]
        ys = grouped_gemm(a.to(w2.dtype), w2, plan, bias=b2, backend=b)  # [S, H]
        if spec.post_norm:
            ys = self.post_expert_norm(ys)
        out = unpermute(ys, plan, top_k_weights, backend=b)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)
