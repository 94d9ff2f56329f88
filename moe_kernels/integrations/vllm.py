"""vLLM's fused-MoE entry points on moe_kernels: ``fused_experts`` and ``fused_topk``.

Same argument names, layouts and results as ``vllm.model_executor.layers.fused_moe``, so that a vLLM-style
caller switches by changing an import::

    from moe_kernels.integrations.vllm import fused_experts, fused_topk

    topk_weights, topk_ids, _ = fused_topk(x, router_logits, topk=2, renormalize=True)
    out = fused_experts(x, w1, w2, topk_weights, topk_ids, activation="silu")

============== ============ ==========================================================================
argument       shape        meaning
============== ============ ==========================================================================
hidden_states  [T, H]       tokens (fp32/bf16/fp16; fp64 too)
w1             [E, 2I, H]   gate rows [0, I) then up rows (vLLM's layout); ``[E, I, H]`` for ``*_no_mul``;
                            for ``swigluoai`` vLLM's interleaved rows (gate, up, gate, up, ...)
w2             [E, H, I]    down projection
topk_weights   [T, k]       routing weights (fp32)
topk_ids       [T, k]       int32/int64 expert ids (global ids when ``expert_map`` is given)
expert_map     [E_global]   global -> local expert on this rank, -1 where the expert lives elsewhere
============== ============ ==========================================================================

Differences from vLLM:

- Unquantized and FP8 experts: ``use_fp8_w8a8=True`` (or a ``quant_config`` with fp8 ``quant_dtype``) takes
  ``w1``/``w2`` in float8_e4m3fn with ``w1_scale``/``w2_scale`` as vLLM lays them out (per tensor ``[E]``,
  per channel ``[E, N, 1]`` with ``per_channel_quant``, block ``[E, ceil(N/bn), ceil(K/bk)]`` with
  ``block_shape=[bn, bk]``), without copies, and the static per-tensor ``a1_scale``/``a2_scale`` (dynamic
  quantization when None: per token and ``bk`` columns for block scales, per token for per-channel, per tensor
  otherwise). Weight-only experts: ``use_int8_w8a16=True`` takes int8 ``w1``/``w2`` with per-channel
  ``w1_scale``/``w2_scale`` ``[E, N]`` (or group scales ``[E, N, K/g]`` with ``block_shape=[0, g]``);
  ``use_int4_w4a16=True`` takes uint8 ``[E, N, K/2]`` (low nibble = even k), ``block_shape=[0, g]``, scales
  ``[E, N, K/g]`` and optional zero points ``w1_zp``/``w2_zp`` ``[E, N/2, K/g]`` (see :mod:`moe_kernels.quant_int`).
  ``use_int8_w8a8`` raises ``ValueError``. Expert biases come from the ``w1_bias``/``w2_bias`` keywords or, as in newer vLLM, the
  fields of the same names of an unquantized ``quant_config``.
- Activations ``silu``, ``gelu`` (exact), ``swigluoai``, ``silu_no_mul``, ``gelu_no_mul`` (strings, or an enum
  whose ``value``/``name`` is one of them); others raise ``ValueError``. ``swigluoai`` makes one
  de-interleaving copy of ``w1`` (and its bias) per call, since :func:`moe_kernels.fused_moe` takes gate rows
  then up rows.
- ``inplace=True`` writes the result into ``hidden_states`` and returns it, but computes it out of place
  first: it saves no memory.
- ``apply_router_weight_on_input`` works for any ``k`` (vLLM requires ``k == 1``).
- Arguments after ``apply_router_weight_on_input`` are keyword-only (vLLM's positional order differs between
  versions). ``allow_deep_gemm`` and ``allow_cutlass_block_scaled_grouped_gemm`` are accepted and ignored;
  ``backend`` (``"auto" | "torch" | "triton" | "cuda"``) is ours.
- Differentiable in hidden states, weights, biases and routing weights (vLLM's op is inference-only), and
  deterministic.
- ``fused_topk``: ties go to the lower expert index; ``token_expert_indices[t, j] = j * T + t`` as vLLM's
  kernel writes them.
- ``fused_topk_bias`` and ``grouped_topk`` (DeepSeek-V2/V3 routing) take vLLM's names and positional order and
  run :func:`moe_kernels.topk_gating`: ties go to the lower expert index (vLLM's ``torch.topk`` leaves them
  unspecified), the group score is the best score of the group, or the sum of its two best biased scores with
  a correction bias, as in vLLM. ``num_expert_group=0``/``topk_group=0`` mean no groups.
- Expert ids of any integer dtype are accepted; ids outside ``[0, E)`` (vLLM's sentinels for other ranks'
  experts) are dropped slots, on every backend. ``RoutingPlan.vllm_view()`` gives a plan in the layout of
  ``moe_align_block_size`` and ``RoutingPlan.vllm_permute_view()`` the index maps of ``moe_permute``.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..gating import topk_gating
from ..moe import fused_moe

__all__ = ["fused_experts", "fused_topk", "fused_topk_bias", "grouped_topk"]

# vLLM activation -> (fused_moe activation, gated)
ACTIVATIONS = {
    "silu": ("silu", True),
    "gelu": ("gelu", True),
    "swigluoai": ("swiglu_oai", True),
    "silu_no_mul": ("silu", False),
    "gelu_no_mul": ("gelu", False),
}
_QUANT_FLAGS = ("use_fp8_w8a8", "use_int8_w8a8", "use_int8_w8a16", "use_int4_w4a16", "per_channel_quant")
_QUANT_TENSORS = ("w1_scale", "w2_scale", "w1_zp", "w2_zp", "a1_scale", "a2_scale", "block_shape")


def _activation(fn: str, activation) -> tuple[str, bool, bool]:
    """``(fused_moe activation, gated, interleaved)`` of a vLLM activation name or enum member."""
    names = [activation] if isinstance(activation, str) else [getattr(activation, "value", None),
                                                               getattr(activation, "name", None)]
    for name in names:
        if isinstance(name, str) and name.lower() in ACTIVATIONS:
            kind, gated = ACTIVATIONS[name.lower()]
            return kind, gated, name.lower() == "swigluoai"
    raise ValueError(f"{fn}: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def _deinterleave(w: torch.Tensor) -> torch.Tensor:
    """Rows (g0, u0, g1, u1, ...) -> (g0, g1, ..., u0, u1, ...) along dim 1 (a copy)."""
    E, I2 = w.shape[0], w.shape[1]
    return w.view(E, I2 // 2, 2, *w.shape[2:]).transpose(1, 2).reshape(w.shape)


def fused_experts(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    inplace: bool = False,
    activation="silu",
    apply_router_weight_on_input: bool = False,
    *,
    global_num_experts: int = -1,
    expert_map: torch.Tensor | None = None,
    quant_config=None,
    w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    use_fp8_w8a8: bool = False,
    use_int8_w8a8: bool = False,
    use_int8_w8a16: bool = False,
    use_int4_w4a16: bool = False,
    per_channel_quant: bool = False,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w1_zp: torch.Tensor | None = None,
    w2_zp: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    block_shape: list[int] | None = None,
    allow_deep_gemm: bool = False,
    allow_cutlass_block_scaled_grouped_gemm: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """vLLM's ``fused_experts``: every token through its k experts, summed with ``topk_weights`` -> ``[T, H]``.

    See the module docstring for shapes and for the differences from vLLM. Example::

        >>> w, ids, _ = fused_topk(x, x @ router.T, 2, True)
        >>> out = fused_experts(x, w1, w2, w, ids)
    """
    fn = "fused_experts"
    if quant_config is not None and _fp8_config(quant_config):
        use_fp8_w8a8 = True
        w1_scale = w1_scale if w1_scale is not None else getattr(quant_config, "w1_scale", None)
        w2_scale = w2_scale if w2_scale is not None else getattr(quant_config, "w2_scale", None)
        a1_scale = a1_scale if a1_scale is not None else getattr(quant_config, "a1_scale", None)
        a2_scale = a2_scale if a2_scale is not None else getattr(quant_config, "a2_scale", None)
        block_shape = block_shape if block_shape is not None else getattr(quant_config, "block_shape", None)
        per_channel_quant = per_channel_quant or bool(getattr(quant_config, "per_out_ch_quant", False))
        w1_bias = w1_bias if w1_bias is not None else getattr(quant_config, "w1_bias", None)
        w2_bias = w2_bias if w2_bias is not None else getattr(quant_config, "w2_bias", None)
        quant_config = None
    given = dict(use_fp8_w8a8=use_fp8_w8a8, use_int8_w8a8=use_int8_w8a8, use_int8_w8a16=use_int8_w8a16,
                 use_int4_w4a16=use_int4_w4a16, per_channel_quant=per_channel_quant, w1_scale=w1_scale,
                 w2_scale=w2_scale, w1_zp=w1_zp, w2_zp=w2_zp, a1_scale=a1_scale, a2_scale=a2_scale,
                 block_shape=block_shape)
    fp8 = bool(use_fp8_w8a8)
    wna16 = "int8" if use_int8_w8a16 else "int4" if use_int4_w4a16 else None
    if wna16 and (fp8 or (use_int8_w8a16 and use_int4_w4a16)):
        raise ValueError(f"{fn}: use_fp8_w8a8, use_int8_w8a16 and use_int4_w4a16 are exclusive")
    for name in _QUANT_FLAGS + _QUANT_TENSORS:
        if (fp8 and name in _FP8_ARGS) or (wna16 and name in _WNA16_ARGS):
            continue
        if given[name] not in (None, False):
            raise ValueError(f"{fn}: {name} was given, but only unquantized and FP8 (use_fp8_w8a8) experts are supported")
    if quant_config is not None:
        if getattr(quant_config, "quant_dtype", None) is not None or any(
                getattr(quant_config, f, False) for f in _QUANT_FLAGS):
            raise ValueError(f"{fn}: quant_config describes quantized experts; only unquantized ones are supported")
        w1_bias = w1_bias if w1_bias is not None else getattr(quant_config, "w1_bias", None)
        w2_bias = w2_bias if w2_bias is not None else getattr(quant_config, "w2_bias", None)
    kind, gated, interleaved = _activation(fn, activation)
    _checks.check_tensor(fn, "w1", w1, ndim=3, layout="[E, 2I, H]")
    n_global = expert_map.shape[0] if expert_map is not None else w1.shape[0]
    if global_num_experts not in (-1, n_global):
        raise ValueError(f"{fn}: global_num_experts={global_num_experts} but "
                         f"{'expert_map' if expert_map is not None else 'w1'} has {n_global} experts")
    if fp8:  # QuantizedWeight views; swigluoai's w1 rows (and per-channel scales) de-interleaved there
        w1, w2 = _fp8_weights(fn, w1, w2, w1_scale, w2_scale, block_shape, per_channel_quant, interleaved)
    elif wna16:  # QuantizedWeight views of vLLM's w8a16 / w4a16 tensors
        w1, w2 = _wna16_weights(fn, wna16, w1, w2, w1_scale, w2_scale, w1_zp, w2_zp, block_shape, interleaved)
    elif interleaved:
        w1 = _deinterleave(w1)
    if interleaved:
        w1_bias = _deinterleave(w1_bias) if w1_bias is not None else None
    extra = dict(a13_scale=_static(fn, "a1_scale", a1_scale), a2_scale=_static(fn, "a2_scale", a2_scale)) if fp8 else {}
    out = fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, activation=kind, gated=gated, w13_bias=w1_bias,
                    w2_bias=w2_bias, apply_router_weight_on_input=apply_router_weight_on_input,
                    expert_map=expert_map, backend=backend, **extra)
    if inplace:
        return hidden_states.copy_(out)
    return out


_WNA16_ARGS = ("use_int8_w8a16", "use_int4_w4a16", "w1_scale", "w2_scale", "w1_zp", "w2_zp", "block_shape")


def _wna16_weights(fn, fmt, w1, w2, w1_scale, w2_scale, w1_zp, w2_zp, block_shape, interleaved):
    """QuantizedWeight views (no copies, except swigluoai's de-interleaving) of vLLM's weight-only experts:
    ``use_int8_w8a16``: int8 ``[E, N, K]`` with per-channel scales ``[E, N]`` (or ``[E, N, 1]``), or group scales
    ``[E, N, K/g]`` with ``block_shape=[0, g]``; ``use_int4_w4a16``: uint8 ``[E, N, K/2]`` (low nibble = even k)
    with ``block_shape=[0, g]``, scales ``[E, N, K/g]`` and optional zero points ``[E, N/2, K/g]`` (value
    ``(q - zp) * scale``, ``(q - 8) * scale`` without)."""
    from ..quant import QuantizedWeight
    from ..quant_int import pack_nibbles, unpack_nibbles

    flag = "use_int8_w8a16" if fmt == "int8" else "use_int4_w4a16"
    g = None
    if block_shape is not None:
        if len(block_shape) != 2 or int(block_shape[0]) != 0 or int(block_shape[1]) < 1:
            raise ValueError(f"{fn}: {flag} takes block_shape=[0, group_size] (groups along K), got {block_shape!r}")
        g = int(block_shape[1])
    elif fmt == "int4":
        raise ValueError(f"{fn}: use_int4_w4a16 needs block_shape=[0, group_size]")
    out = []
    for wname, w, sname, sc, zname, zp in (("w1", w1, "w1_scale", w1_scale, "w1_zp", w1_zp),
                                          ("w2", w2, "w2_scale", w2_scale, "w2_zp", w2_zp)):
        if sc is None:
            raise ValueError(f"{fn}: {flag} needs {sname}, the scales of {wname}")
        if fmt == "int8" and zp is not None:
            raise ValueError(f"{fn}: {zname} was given, but use_int8_w8a16 weights are symmetric")
        if fmt == "int8" and g is None and isinstance(sc, torch.Tensor) and sc.dim() == 3 and sc.shape[2] == 1:
            sc = sc.squeeze(2)
        if wname == "w1" and interleaved:  # gate/up rows interleaved: rows of data, scales and zero points
            w, sc = _deinterleave(w), _deinterleave(sc)
            if zp is not None:
                zp = pack_nibbles(_deinterleave(unpack_nibbles(zp.transpose(1, 2)).transpose(1, 2)).transpose(1, 2)
                                  ).transpose(1, 2).contiguous()
        try:
            out.append(QuantizedWeight(data=w, scale=sc, fmt=fmt, zero=zp, group_size=g))
        except ValueError as exc:
            msg = str(exc).replace("QuantizedWeight: data", f"{fn}: {wname}").replace("QuantizedWeight: scale", f"{fn}: {sname}")
            raise ValueError(msg.replace("QuantizedWeight: zero", f"{fn}: {zname}").replace("QuantizedWeight:", f"{fn}: {wname}:")) from None
    return out


_FP8_ARGS = ("use_fp8_w8a8", "per_channel_quant", "w1_scale", "w2_scale", "a1_scale", "a2_scale", "block_shape")


def _fp8_config(quant_config) -> bool:
    """A vLLM ``FusedMoEQuantConfig`` (or look-alike) describing fp8 w8a8 experts."""
    if getattr(quant_config, "use_fp8_w8a8", False):
        return True
    return getattr(quant_config, "quant_dtype", None) in (torch.float8_e4m3fn, "fp8")


def _static(fn: str, name: str, s):
    """vLLM's static per-tensor input scale (one element; fp32)."""
    if s is None:
        return None
    if not isinstance(s, torch.Tensor) or s.numel() != 1:
        got = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"{fn}: {name} must be a static per-tensor activation scale with one element, got {got}")
    return s.reshape(1).float()


def _fp8_weights(fn, w1, w2, w1_scale, w2_scale, block_shape, per_channel_quant, interleaved):
    """QuantizedWeight views (no copies) of vLLM's fp8 ``w1``/``w2`` and their scales: per tensor ``[E]`` (or
    ``[E, 1, 1]``), per channel ``[E, N, 1]`` (``per_channel_quant``), block ``[E, ceil(N/bn), ceil(K/bk)]``
    (``block_shape=[bn, bk]``)."""
    from ..quant import QuantizedWeight

    if block_shape is not None and per_channel_quant:
        raise ValueError(f"{fn}: block_shape and per_channel_quant are exclusive")
    if block_shape is not None and (len(block_shape) != 2 or any(int(b) < 1 for b in block_shape)):
        raise ValueError(f"{fn}: block_shape must be [block_n, block_k] with positive sizes, got {block_shape!r}")
    out = []
    for wname, w, sname, s in (("w1", w1, "w1_scale", w1_scale), ("w2", w2, "w2_scale", w2_scale)):
        _checks.check_tensor(fn, wname, w, ndim=3, layout="[E, N, K]")
        if w.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{fn}: use_fp8_w8a8 needs {wname} in float8_e4m3fn, got {str(w.dtype).replace('torch.', '')}")
        if s is None:
            raise ValueError(f"{fn}: use_fp8_w8a8 needs {sname}, the inverse scales of {wname}")
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            raise ValueError(f"{fn}: {sname} must be a float32 tensor, got "
                             f"{str(s.dtype).replace('torch.', '') if isinstance(s, torch.Tensor) else type(s).__name__}")
        E, N, K = w.shape
        if block_shape is None and not per_channel_quant and tuple(s.shape) == (E, 1, 1):
            s = s.view(E)
        if block_shape is None and not per_channel_quant and tuple(s.shape) != (E,):
            raise ValueError(f"{fn}: per-tensor {sname} must have shape [E]={[E]} (or give per_channel_quant / "
                             f"block_shape), got {list(s.shape)}")
        if per_channel_quant and tuple(s.shape) not in ((E, N, 1), (E, N)):
            raise ValueError(f"{fn}: per-channel {sname} must have shape [E, N, 1]={[E, N, 1]}, got {list(s.shape)}")
        if per_channel_quant:
            s = s.view(E, N, 1)
        if interleaved and wname == "w1":
            if block_shape is not None:
                raise ValueError(f"{fn}: swigluoai's interleaved w1 rows cannot be reordered under block scales")
            w = _deinterleave(w)
            s = _deinterleave(s) if per_channel_quant else s
        bs = (int(block_shape[0]), int(block_shape[1])) if block_shape is not None else None
        try:
            out.append(QuantizedWeight(data=w, scale=s, block_shape=bs))
        except ValueError as exc:
            raise ValueError(f"{fn}: {sname} does not fit {wname} of shape {list(w.shape)} with block_shape="
                             f"{block_shape}: {exc}") from None
    return out


def fused_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    indices_type: torch.dtype | None = None,
    scoring_func: str = "softmax",
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``fused_topk``: ``(topk_weights [T, k] fp32, topk_ids [T, k] int32, token_expert_indices [T, k] int32)``.

    Scores are ``softmax`` (or ``sigmoid``) of ``gating_output [T, E]`` in fp32; ``renormalize`` makes each
    token's k weights sum to 1. ``indices_type`` sets the dtype of ``topk_ids``. ``hidden_states [T, H]`` is only
    checked for its number of tokens, as in vLLM. Example::

        >>> w, ids, _ = fused_topk(x, torch.randn(x.shape[0], 8), 2, renormalize=True)
    """
    fn = "fused_topk"
    _checks.check_tensor(fn, "hidden_states", hidden_states, ndim=2, layout="[T, H]")
    _checks.check_tensor(fn, "gating_output", gating_output, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[T, E]")
    T = hidden_states.shape[0]
    if gating_output.shape[0] != T:
        raise ValueError(f"{fn}: gating_output has {gating_output.shape[0]} tokens, hidden_states {T}")
    weights, ids = topk_gating(gating_output.float(), topk, scoring=scoring_func, renormalize=renormalize,
                               backend=backend)
    if indices_type is not None:
        ids = ids.to(indices_type)
    slots = torch.arange(topk, dtype=torch.int32, device=ids.device)
    token_expert_indices = slots[None, :] * T + torch.arange(T, dtype=torch.int32, device=ids.device)[:, None]
    return weights, ids, token_expert_indices


def _check_router(fn: str, hidden_states, gating_output) -> None:
    _checks.check_tensor(fn, "hidden_states", hidden_states, ndim=2, layout="[T, H]")
    _checks.check_tensor(fn, "gating_output", gating_output, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[T, E]")
    if gating_output.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"{fn}: gating_output has {gating_output.shape[0]} tokens, hidden_states {hidden_states.shape[0]}")


def fused_topk_bias(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    e_score_correction_bias,
    topk,
    renormalize,
    scoring_func="softmax",
    indices_type: torch.dtype | None = None,
    *,
    routed_scaling_factor: float = 1.0,
    backend: str = "auto",
):
    """vLLM's ``fused_topk_bias``: top-k of ``scores + e_score_correction_bias`` (selection only), weights the
    unbiased scores of the chosen experts, renormalised if asked, times ``routed_scaling_factor``.

    ``(hidden_states, gating_output, e_score_correction_bias, topk, renormalize, scoring_func, indices_type)``
    returns ``(topk_weights [T, k] fp32, topk_ids [T, k])``. Newer vLLM's order ``(hidden_states,
    gating_output, scoring_func, e_score_correction_bias, topk, renormalize, indices_type)`` (recognised by
    the string in third place) returns vLLM's third output too, ``token_expert_indices`` ``[T, k]`` int32. Example::

        >>> w, ids = fused_topk_bias(x, router_logits, bias, 8, True, "sigmoid")
    """
    fn = "fused_topk_bias"
    newer = isinstance(e_score_correction_bias, str)
    if newer:  # (scoring_func, e_score_correction_bias, topk, renormalize, indices_type)
        scoring_func, e_score_correction_bias, topk, renormalize, indices_type = (
            e_score_correction_bias, topk, renormalize, scoring_func if not isinstance(scoring_func, str) else None,
            indices_type)
    _check_router(fn, hidden_states, gating_output)
    weights, ids = topk_gating(gating_output.float(), topk, scoring=scoring_func, renormalize=bool(renormalize),
                               correction_bias=e_score_correction_bias, scaling_factor=routed_scaling_factor,
                               backend=backend)
    if indices_type is not None:
        ids = ids.to(indices_type)
    if not newer:
        return weights, ids
    T = hidden_states.shape[0]
    slots = torch.arange(topk, dtype=torch.int32, device=ids.device)
    return weights, ids, slots[None, :] * T + torch.arange(T, dtype=torch.int32, device=ids.device)[:, None]


def grouped_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    num_expert_group: int = 0,
    topk_group: int = 0,
    scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``grouped_topk`` (DeepSeek-V2/V3): experts in ``num_expert_group`` equal groups, only the
    ``topk_group`` best groups eligible, then the top ``topk``; ``(topk_weights [T, k] fp32, topk_ids [T, k]
    int32)``. Example::

        >>> w, ids = grouped_topk(x, router_logits, 8, True, num_expert_group=8, topk_group=4,
        ...                       scoring_func="sigmoid", routed_scaling_factor=2.5, e_score_correction_bias=bias)
    """
    fn = "grouped_topk"
    _check_router(fn, hidden_states, gating_output)
    return topk_gating(gating_output.float(), topk, scoring=scoring_func, renormalize=bool(renormalize),
                       correction_bias=e_score_correction_bias, num_groups=max(int(num_expert_group), 1),
                       topk_groups=max(int(topk_group), 1), scaling_factor=routed_scaling_factor, backend=backend)
