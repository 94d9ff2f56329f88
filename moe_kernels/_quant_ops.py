"""FP8 experts: the reference ops (``torch`` backend), their registration, and the checks and dispatch behind
``grouped_gemm`` / ``fused_moe`` when they are given a :class:`~moe_kernels.quant.QuantizedWeight`.

The ops take the weight as block scales (``QuantizedWeight.scale_blocks``: per tensor is one ``N x K`` block,
per channel ``1 x K`` blocks), an activation mode (``group``, ``token``, ``tensor``, ``static``, or ``none`` for
the weight-only path of GPUs without fp8 tensor cores) and are inference-only: a backward raises.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import _backends, _checks
from . import reference as ref
from .quant import FP8_FORMATS, QuantizedWeight, dequantize_blocks, fake_quantize_activation
from .quant_int import INT_FORMATS
from .routing import RoutingPlan

ACT_MODES = ("group", "token", "tensor", "static", "none")


def weight_only(device: torch.device) -> bool:
    """True where the GPU has no fp8 tensor cores (before sm_89): weights are dequantized to bf16 tile-wise in the
    kernel and activations stay unquantized (w8a16). CPU runs the w8a8 pipeline (the reference of the GPU one)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) < (8, 9)


# ----- reference ops ---------------------------------------------------------------------------------


@custom_op("moe_kernels::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm(
    x: Tensor, w_data: Tensor, w_scale: Tensor, block_n: int, block_k: int, expert_offsets: Tensor,
    bias: Optional[Tensor], sorted_slots: Optional[Tensor], act_mode: str, act_scale: Optional[Tensor],
) -> Tensor:
    """``y[r] = fq(x)[r] @ deq(w)[e].T + bias[e]`` (fq: the activation quantization of ``act_mode`` with groups
    of ``block_k`` columns), accumulated in fp32 (fp64 for fp64 inputs), returned in ``x``'s dtype."""
    acc = ref.acc_dtype(x.dtype)
    xa = fake_quantize_activation(x, act_mode, block_k, w_data.dtype, act_scale)
    w = dequantize_blocks(w_data, w_scale, block_n, block_k, acc)
    b = bias.to(acc) if bias is not None else None
    return ref.grouped_gemm(xa, w, expert_offsets, b, sorted_slots).to(x.dtype)


@fp8_grouped_gemm.register_fake
def _(x, w_data, w_scale, block_n, block_k, expert_offsets, bias, sorted_slots, act_mode, act_scale):
    return x.new_empty(x.shape[0], w_data.shape[1])


@custom_op("moe_kernels::fp8_fused_moe", mutates_args=())
def fp8_fused_moe(
    hidden: Tensor, w13_data: Tensor, w13_scale: Tensor, w13_bn: int, w13_bk: int, w2_data: Tensor, w2_scale: Tensor,
    w2_bn: int, w2_bk: int, topk_weights: Tensor, topk_ids: Tensor, activation: str, gated: bool,
    w13_bias: Optional[Tensor], w2_bias: Optional[Tensor], apply_router_weight_on_input: bool, capacity: Optional[int],
    expert_map: Optional[Tensor], act_mode13: str, a13_scale: Optional[Tensor], act_mode2: str,
    a2_scale: Optional[Tensor],
) -> Tensor:
    """The fused MoE of FP8 experts: the first GEMM's input is ``hidden`` (all T tokens) quantized as
    ``act_mode13`` (the routed rows when ``apply_router_weight_on_input``), the second GEMM's the activation
    output (in ``hidden``'s dtype, all P rows) quantized as ``act_mode2``."""
    return fp8_fused_moe_reference(hidden, w13_data, w13_scale, w13_bn, w13_bk, w2_data, w2_scale, w2_bn, w2_bk,
                                   topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                                   apply_router_weight_on_input, capacity, expert_map, act_mode13, a13_scale,
                                   act_mode2, a2_scale)


def fp8_fused_moe_reference(hidden, w13_data, w13_scale, w13_bn, w13_bk, w2_data, w2_scale, w2_bn, w2_bk, topk_weights,
                            topk_ids, activation, gated, w13_bias, w2_bias, on_input, capacity, expert_map, act_mode13,
                            a13_scale, act_mode2, a2_scale, inter_dtype=None):
    """The reference pipeline; ``inter_dtype`` (default: ``hidden``'s) is the dtype intermediates (the activation
    output, the routed rows scaled on input) are rounded to before their quantization: a float64 reference of an
    fp16 run rounds them to fp16, as the kernels do."""
    k, E = topk_ids.shape[1], w13_data.shape[0]
    acc = ref.acc_dtype(hidden.dtype)
    qdt = w13_data.dtype
    slots, offsets, _, slot_to_row = ref.plan_routing(topk_ids, E, 1, capacity, expert_map)
    if on_input:  # the routed rows, scaled by their weight, are the first GEMM's input
        xs = ref.permute(hidden, slots, k, topk_weights).to(inter_dtype or hidden.dtype).to(hidden.dtype)
        xs = fake_quantize_activation(xs, act_mode13, w13_bk, qdt, a13_scale)
    else:
        xs = ref.permute(fake_quantize_activation(hidden, act_mode13, w13_bk, qdt, a13_scale), slots, k)  # [P, H]
    w13 = dequantize_blocks(w13_data, w13_scale, w13_bn, w13_bk, acc)
    h = ref.grouped_gemm(xs, w13, offsets, w13_bias.to(acc) if w13_bias is not None else None, slots)  # [P, 2I]
    a = ref.activation(h, activation, gated).to(inter_dtype or hidden.dtype).to(hidden.dtype)  # as the kernels write it
    aq = fake_quantize_activation(a, act_mode2, w2_bk, qdt, a2_scale)
    w2 = dequantize_blocks(w2_data, w2_scale, w2_bn, w2_bk, acc)
    ys = ref.grouped_gemm(aq, w2, offsets, w2_bias.to(acc) if w2_bias is not None else None, slots)  # [P, H]
    return ref.unpermute(ys, slot_to_row, k, None if on_input else topk_weights).to(hidden.dtype)


@fp8_fused_moe.register_fake
def _(hidden, *args):
    return torch.empty_like(hidden)


def inference_only(fn: str, weights: str):
    """``(backward, setup_context)`` that refuse a backward through FP8 weights, naming them."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{fn}: backward through the QuantizedWeight {weights} is not supported: quantized experts "
                           "are inference-only. Train the dense weight (QuantizedWeight.dequantize()) or run under "
                           "torch.no_grad() / torch.inference_mode().")

    return backward, setup_context


_bwd, _setup = inference_only("grouped_gemm", "w")
fp8_grouped_gemm.register_autograd(_bwd, setup_context=_setup)
_bwd, _setup = inference_only("fused_moe", "w13 / w2")
fp8_fused_moe.register_autograd(_bwd, setup_context=_setup)
_backends.register("fp8_grouped_gemm", "torch")(torch.ops.moe_kernels.fp8_grouped_gemm.default)
_backends.register("fp8_fused_moe", "torch")(torch.ops.moe_kernels.fp8_fused_moe.default)


# ----- checks and dispatch of the public functions ---------------------------------------------------


def check_qweight(fn: str, name: str, w, N: int | None, K: int | None, layout: str, formats, fmt_error: str):
    """``w`` is a QuantizedWeight of one of ``formats`` (else ``fmt_error`` after ``{name} has fmt=...;``) whose dense
    shape matches ``N`` and ``K`` where given (the FP8 and the weight-only dispatch share these checks)."""
    if not isinstance(w, QuantizedWeight):
        raise ValueError(f"{fn}: {name} must be a QuantizedWeight like the other expert weight, got {type(w).__name__}")
    if w.fmt not in formats:
        raise ValueError(f"{fn}: {name} has fmt={w.fmt!r}; {fmt_error}")
    _, n, kk = w.shape
    if (N is not None and n != N) or (K is not None and kk != K):
        raise ValueError(f"{fn}: {name} must have dense shape {layout}, got {list(w.shape)}")
    return w


def _check_qweight(fn: str, name: str, w, N: int | None, K: int | None, layout: str) -> QuantizedWeight:
    return check_qweight(fn, name, w, N, K, layout, FP8_FORMATS, f"this op serves {tuple(FP8_FORMATS)}")


def _check_act_scale(fn: str, name: str, s, device) -> Optional[Tensor]:
    if s is None:
        return None
    if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype != torch.float32:
        got = f"{str(s.dtype).replace('torch.', '')} of shape {list(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"{fn}: {name} must be a static per-tensor activation scale (one float32 element), got {got}")
    if s.device != device:
        raise ValueError(f"{fn}: {name} is on {s.device} but the activations are on {device}")
    return s.reshape(1)


def _act_mode(w: QuantizedWeight, static: Optional[Tensor], device) -> str:
    if weight_only(device):
        return "none"
    return "static" if static is not None else w.activation_group()


def _offsets(fn: str, plan_or_offsets, P: int, E: int):
    if isinstance(plan_or_offsets, RoutingPlan):
        if plan_or_offsets.num_rows != P:
            raise ValueError(f"{fn}: x_sorted must have the plan's P={plan_or_offsets.num_rows} rows, got {P}")
        offsets, slots = plan_or_offsets.expert_offsets, plan_or_offsets.sorted_slots
    else:
        offsets = _checks.check_tensor(fn, "plan_or_offsets", plan_or_offsets, dtypes=_checks.INDEX_DTYPES, shape=(E + 1,),
                                       layout="[E+1] expert offsets")
        if _checks.value_checks_enabled(offsets) and offsets.numel():
            o = offsets.tolist()
            if o[0] != 0 or any(b < a for a, b in zip(o, o[1:])) or o[-1] > P:
                raise ValueError(f"{fn}: expert offsets must start at 0, not decrease and end at most at P={P}; got {o}")
        offsets, slots = offsets.to(torch.int32), None
    if offsets.shape[0] != E + 1:
        raise ValueError(f"{fn}: w has E={E} experts but the plan has {offsets.shape[0] - 1}")
    return offsets, slots


def check_gemm_call(fn: str, x_sorted, w, plan_or_offsets, bias, weight_layout, check_w):
    """The checks of ``grouped_gemm`` with a QuantizedWeight ``w`` (``check_w(fn, name, w, N, K, layout)`` checks its
    format); returns ``(offsets, sorted_slots or None)``."""
    if weight_layout != "nk":
        raise ValueError(f"{fn}: a QuantizedWeight is [E, N, K] (weight_layout='nk'), got weight_layout={weight_layout!r}")
    _checks.check_tensor(fn, "x_sorted", x_sorted, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[P, K]")
    P, K = x_sorted.shape
    check_w(fn, "w", w, None, K, f"[E, N, K={K}]")
    E, N, _ = w.shape
    offsets, slots = _offsets(fn, plan_or_offsets, P, E)
    if bias is not None:
        _checks.check_tensor(fn, "bias", bias, dtypes=_checks.FLOAT_DTYPES, shape=(E, N), layout="[E, N]")
    _checks.check_same_device(fn, x_sorted=x_sorted, w=w.data, plan=offsets, bias=bias)
    return offsets, slots


def check_moe_weights(fn: str, hidden, w13, w2, activation, gated, check_w) -> tuple[int, int, int, int]:
    """The checks of ``fused_moe``'s activations and QuantizedWeight experts (``check_w(fn, name, w, N, K, layout,
    like=None)``; ``like`` is w13 when checking w2); returns ``(T, H, E, 2I)``."""
    _checks.check_tensor(fn, "hidden", hidden, ndim=2, dtypes=_checks.FLOAT_DTYPES, layout="[T, H]")
    T, H = hidden.shape
    _checks.check_choice(fn, "activation", activation, ref.GATED_ACTIVATIONS if gated else ref.PLAIN_ACTIVATIONS)
    check_w(fn, "w13", w13, None, H, f"[E, 2I, H={H}]")
    E, I2 = w13.shape[0], w13.shape[1]
    if gated and I2 % 2:
        raise ValueError(f"{fn}: gated w13 must have an even number of rows 2I, got shape {list(w13.shape)}")
    inter = I2 // 2 if gated else I2
    check_w(fn, "w2", w2, H, inter, f"[E, H={H}, I={inter}]", like=w13)
    if w2.shape[0] != E:
        raise ValueError(f"{fn}: w2 must have the E={E} experts of w13, got dense shape {list(w2.shape)}")
    return T, H, E, I2


def check_moe_routing(fn: str, hidden, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, capacity, drop_policy,
                      expert_map, drop_policies, T: int, E: int, H: int, I2: int) -> int:
    """The routing checks of ``fused_moe`` with QuantizedWeight experts; returns ``k``."""
    k, n_ids = _checks.check_moe_routing(fn, topk_ids, topk_weights, T, E, H, I2, w13_bias, w2_bias, capacity,
                                         drop_policy, expert_map, _checks.FLOAT_DTYPES, drop_policies)
    _checks.check_same_device(fn, hidden=hidden, w13=w13.data, w2=w2.data, topk_weights=topk_weights, topk_ids=topk_ids,
                              w13_bias=w13_bias, w2_bias=w2_bias, expert_map=expert_map)
    _checks.check_expert_ids(fn, "topk_ids", topk_ids, n_ids)
    return k


def dispatch(op: str, backend: str, device, *args):
    """Run ``op`` on the backend ``backend`` selects; its ``supports`` sees every argument of the call."""
    return _backends.select(op, backend, device, *args)(*args)


def _check_fp8(fn, name, w, N, K, layout, like=None):
    _check_qweight(fn, name, w, N, K, layout)
    if like is not None and w.fmt != like.fmt:
        raise ValueError(f"{fn}: w13 and w2 must share a format, got {like.fmt!r} and {w.fmt!r}")


def grouped_gemm(x_sorted, w: QuantizedWeight, plan_or_offsets, *, bias=None, weight_layout="nk",
                 activation_scale=None, backend="auto") -> Tensor:
    """``moe_kernels.grouped_gemm`` with a QuantizedWeight (see there)."""
    fn = "grouped_gemm"
    if isinstance(w, QuantizedWeight) and w.fmt in INT_FORMATS:
        from . import _wna16_ops

        return _wna16_ops.grouped_gemm(x_sorted, w, plan_or_offsets, bias=bias, weight_layout=weight_layout,
                                       activation_scale=activation_scale, backend=backend)
    offsets, slots = check_gemm_call(fn, x_sorted, w, plan_or_offsets, bias, weight_layout, _check_qweight)
    a_scale = _check_act_scale(fn, "activation_scale", activation_scale, x_sorted.device)
    scale, bn, bk = w.scale_blocks()
    mode = _act_mode(w, a_scale, x_sorted.device)
    return dispatch("fp8_grouped_gemm", backend, x_sorted.device, x_sorted, w.data, scale, bn, bk, offsets, bias, slots,
                    mode, a_scale)


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, *, activation, gated, w13_bias, w2_bias,
              apply_router_weight_on_input, capacity, expert_map, a13_scale, a2_scale, backend, drop_policy="gshard",
              gate_up_interleaved=False) -> Tensor:
    """``moe_kernels.fused_moe`` with QuantizedWeight experts (see there); checks as for dense weights."""
    fn = "fused_moe"
    if isinstance(w13, QuantizedWeight) and w13.fmt in INT_FORMATS:
        from . import _wna16_ops

        return _wna16_ops.fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation=activation, gated=gated,
                                    w13_bias=w13_bias, w2_bias=w2_bias,
                                    apply_router_weight_on_input=apply_router_weight_on_input, capacity=capacity,
                                    expert_map=expert_map, a13_scale=a13_scale, a2_scale=a2_scale, backend=backend)
    T, H, E, I2 = check_moe_weights(fn, hidden, w13, w2, activation, gated, _check_fp8)
    if gate_up_interleaved and gated:
        raise ValueError(f"{fn}: gate_up_interleaved is not supported for a QuantizedWeight w13; quantize the weight "
                         "with gate rows first, then up rows")
    check_moe_routing(fn, hidden, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, capacity, drop_policy, expert_map,
                      ref.DROP_POLICIES, T, E, H, I2)
    if capacity is not None and drop_policy != "gshard":  # the over-capacity slots become dropped ids
        from .routing import _capacity_drop

        topk_ids = _capacity_drop(fn, topk_ids, E, capacity, drop_policy, topk_weights, expert_map, backend)
        capacity = None
    s13 = _check_act_scale(fn, "a13_scale", a13_scale, hidden.device)
    s2 = _check_act_scale(fn, "a2_scale", a2_scale, hidden.device)
    sc13, bn13, bk13 = w13.scale_blocks()
    sc2, bn2, bk2 = w2.scale_blocks()
    m13, m2 = _act_mode(w13, s13, hidden.device), _act_mode(w2, s2, hidden.device)
    return dispatch("fp8_fused_moe", backend, hidden.device, hidden, w13.data, sc13, bn13, bk13, w2.data, sc2, bn2, bk2,
                    topk_weights, topk_ids, activation, bool(gated), w13_bias, w2_bias,
                    bool(apply_router_weight_on_input), capacity, expert_map, m13, s13, m2, s2)


from . import _triton_fp8  # noqa: E402,F401  (registers the triton backend of the FP8 ops)
