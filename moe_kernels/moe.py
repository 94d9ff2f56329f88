"""The experts of an MoE layer in one call: ``fused_moe``."""

from __future__ import annotations

import torch

from . import _backends, _checks, _torch_moe
from . import ops  # noqa: F401
from .quant import QuantizedWeight, check_not_raw_fp8
from .reference import DROP_POLICIES, GATED_ACTIVATIONS, PLAIN_ACTIVATIONS
from .routing import _capacity_drop

_OPS = torch.ops.moe_kernels
_backends.register("fused_moe", "torch")(_torch_moe.fused_moe)  # the reference op's math, less glue
_backends.register("fused_moe_saved", "torch")(_torch_moe.fused_moe)  # keeps what its backward needs either way


def activation(h: torch.Tensor, kind: str = "silu", *, gated: bool = True) -> torch.Tensor:
    """The experts' activation: ``act(gate) * up`` on ``h = [gate | up]`` ``[P, 2I] -> [P, I]`` (gated),
    or ``act(h)``; computed in fp32, returned in ``h``'s dtype. ``kind``: silu, gelu (exact), relu, or
    swiglu_oai (gpt-oss, gated only). Differentiable."""
    fn = "activation"
    _checks.check_tensor(fn, "h", h, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[P, 2I] or [P, I]")
    _checks.check_choice(fn, "kind", kind, GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS)
    if gated and h.shape[1] % 2:
        raise ValueError(f"{fn}: gated h must have an even number of columns [gate | up], got shape {tuple(h.shape)}")
    return _OPS.activation(h, kind, bool(gated))


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    gated: bool = True,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    capacity: int | None = None,
    drop_policy: str = "gshard",
    expert_map: torch.Tensor | None = None,
    gate_up_interleaved: bool = False,
    save_preactivation: bool = False,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Run every token through its k experts and sum the outputs with the routing weights.

    ============= ============= =============================================================
    argument      shape         meaning
    ============= ============= =============================================================
    hidden        [T, H]        tokens (fp32/bf16/fp16/fp64)
    w13           [E, 2I, H]    gate rows [0, I) and up rows [I, 2I) (``[E, I, H]`` if not gated)
    w2            [E, H, I]     down projection
    topk_weights  [T, k]        routing weights (fp32)
    topk_ids      [T, k]        experts in [0, E_global) (any integer dtype); others (-1, sentinels) dropped
    w13_bias      [E, 2I]       optional (gpt-oss)
    w2_bias       [E, H]        optional
    out           [T, H]        ``sum_j w[t, j] * (act(x_t @ w13[e].T + b13) @ w2[e].T + b2)``
    ============= ============= =============================================================

    ``activation``: ``silu`` (SwiGLU), ``gelu`` (exact), ``relu`` or ``swiglu_oai`` (gpt-oss, gated only).
    ``apply_router_weight_on_input`` scales the token before the experts instead of after (Llama-4).
    ``capacity``, ``drop_policy`` and ``expert_map`` are as in :func:`plan_routing` (``"probs"`` ranks by
    ``topk_weights``); ``E`` is ``w13.shape[0]`` (the local experts when ``expert_map`` is given).
    ``gate_up_interleaved``: the rows of ``w13`` and ``w13_bias`` alternate gate, up (gpt-oss's layout, e.g.
    ``gate_up_proj.transpose(1, 2)`` without a copy) instead of all gate rows then all up rows.
    Differentiable in hidden, w13, w2, the biases and topk_weights.
    By default only the inputs are kept for the backward, which recomputes the first GEMM (4 GEMM FLOPs
    of it in all on the triton backend); ``save_preactivation=True`` keeps the pre-activation
    ``[T*k, 2I]`` instead (3 of it), as SonicMoE does: memory for a quarter of the backward's GEMM work.

    FP8 experts: ``w13`` and ``w2`` may both be :class:`~moe_kernels.QuantizedWeight` (inference only). Each GEMM's
    input is then quantized dynamically as its weight's layout asks (:mod:`moe_kernels.quant`), or with the static
    per-tensor ``a13_scale`` / ``a2_scale`` (one fp32 element each) when given.

    Example::

        >>> out = fused_moe(x, w13, w2, *topk_gating(x @ router.T, 2))
    """
    fn = "fused_moe"
    if isinstance(w13, QuantizedWeight) or isinstance(w2, QuantizedWeight):
        from . import _quant_ops

        return _quant_ops.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation=activation, gated=gated,
                                    w13_bias=w13_bias, w2_bias=w2_bias,
                                    apply_router_weight_on_input=apply_router_weight_on_input, capacity=capacity,
                                    expert_map=expert_map, a13_scale=a13_scale, a2_scale=a2_scale, backend=backend,
                                    drop_policy=drop_policy, gate_up_interleaved=gate_up_interleaved)
    check_not_raw_fp8(fn, w13=w13, w2=w2)
    if a13_scale is not None or a2_scale is not None:
        raise ValueError(f"{fn}: a13_scale / a2_scale are for QuantizedWeight experts; w13 and w2 are dense")
    f = _checks.FLOAT_DTYPES
    _checks.check_tensor(fn, "hidden", hidden, ndim=2, dtypes=f, layout="[T, H]")
    T, H = hidden.shape
    _checks.check_choice(fn, "activation", activation, GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS)
    _checks.check_tensor(fn, "w13", w13, ndim=3, dtypes=(hidden.dtype,), layout="[E, 2I, H] (same dtype as hidden)")
    E, I2 = w13.shape[0], w13.shape[1]
    if w13.shape[2] != H:
        raise ValueError(f"{fn}: w13 must have shape [E, {'2I' if gated else 'I'}, H={H}], got {tuple(w13.shape)}")
    if gated and I2 % 2:
        raise ValueError(f"{fn}: gated w13 must have an even number of rows 2I, got shape {tuple(w13.shape)}")
    inter = I2 // 2 if gated else I2
    _checks.check_tensor(fn, "w2", w2, dtypes=(hidden.dtype,), shape=(E, H, inter), layout="[E, H, I]")
    k, n_ids = _checks.check_moe_routing(fn, topk_ids, topk_weights, T, E, H, I2, w13_bias, w2_bias, capacity,
                                         drop_policy, expert_map, f, DROP_POLICIES)
    _checks.check_same_device(fn, hidden=hidden, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids,
                              w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map)
    _checks.check_expert_ids(fn, "topk_ids", topk_ids, n_ids)
    if capacity is not None and drop_policy != "gshard":  # the over-capacity slots become dropped ids
        topk_ids = _capacity_drop(fn, topk_ids, E, capacity, drop_policy, topk_weights, expert_map, backend)
        capacity = None
    interleaved = bool(gate_up_interleaved) and bool(gated)
    impl = _backends.select("fused_moe_saved" if save_preactivation else fn, backend, hidden.device, hidden, w13, w2,
                            topk_weights, topk_ids, w13_bias, w2_bias, activation=activation,
                            gate_up_interleaved=interleaved)
    extra = (True,) if interleaved else ()  # only then: every backend's op takes the flag last, with default False
    return impl(hidden, w13, w2, topk_weights, topk_ids, activation, bool(gated), w13_bias, w2_bias,
                bool(apply_router_weight_on_input), capacity, expert_map, *extra)
