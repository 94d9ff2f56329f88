"""The ``cuda`` backend of the quantized fused MoE ops at decode (``fp8_fused_moe``, ``wna16_fused_moe``).

The CUDA small-batch GEMM (``csrc/include/moe_kernels/quant_small_gemm.cuh``) streams each routed expert's packed
weight bytes once with 16-byte loads (16 or 32 elements, so K must be a multiple of that) and dequantizes them in
registers against fp16 / bf16 activations: fp8 (e4m3fn / e5m2) with per-tensor, per-channel or block scales, int8
(per channel or group scales), int4 (vLLM layout, optional zero points) and mxfp4 (e8m0 scales). FP8 activations
are quantized as the reference pipeline (``_quant_ops.fp8_fused_moe_reference``) prescribes, every mode exactly: ``group`` / ``token`` / ``tensor`` scales come from an amax pass over the rows the
GEMM reads (``act_amax_cuda``: gather and routing weights included, the per-tensor one a deterministic atomic max),
``static`` takes the caller's scale, ``none`` (GPUs without fp8 tensor cores) reads activations unquantized. Each
input is replaced by its fp8 code's value as the GEMM stages it, so nothing quantized is written to memory.

``auto`` chooses it for decode batches (at most ``DECODE_ROWS_PER_EXPERT`` rows per expert on average); the
``supports`` functions below say why it refuses anything else. Inference-only, as every quantized path.
"""

from __future__ import annotations

import torch

from . import _backends, _checks
from ._quant_ops import inference_only
from .batch_invariance import is_batch_invariant
from .quant_int import PACKED

try:
    from . import _C  # noqa: F401  (registers torch.ops.moe_kernels.*_cuda)
except ImportError:
    _C = None

DECODE_ROWS_PER_EXPERT = 4  # above this the tensor-core GEMMs (triton) win, as for bf16
MAX_EXPERTS = 1024  # the cuda plan kernel
SCALE_STEP = 16  # the kernel looks weight and activation scales up once per 16 elements of K
ACT_DTYPES = (torch.float16, torch.bfloat16)  # what quantized models run their activations in


def _decode_reasons(hidden, E: int, topk_ids) -> str | None:
    if is_batch_invariant():  # one kernel (and config) for every batch size: the triton kernel
        return "batch-invariant mode: the triton kernel serves every batch size"
    if hidden.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if hidden.dtype not in ACT_DTYPES:
        return f"the cuda quantized decode kernel serves float16 / bfloat16 activations, got {hidden.dtype}"
    if E > MAX_EXPERTS:
        return f"the cuda plan kernel serves E <= {MAX_EXPERTS}, got {E}"
    if topk_ids is None:
        return "the cuda decode path needs topk_ids to tell a decode batch"
    if not _checks.known_true(hidden.shape[0] * topk_ids.shape[1] <= DECODE_ROWS_PER_EXPERT * E):
        return f"more than {DECODE_ROWS_PER_EXPERT} rows per expert on average: not a decode batch"
    return None


def _weight_reasons(name: str, data, K: int, group: int, chunk: int) -> str | None:
    """Scale groups of ``group`` columns along the dense ``K``; ``chunk`` elements a 16-byte load."""
    if K % chunk:
        return f"the cuda decode kernel loads {chunk} elements of {name} at a time: K must be a multiple of {chunk}, got {K}"
    b = data.element_size()
    if data.stride(2) != 1 or not _checks.known_true((data.storage_offset() * b) % 16 == 0) or any(
            not _checks.known_true((data.stride(d) * b) % 16 == 0) for d in (0, 1)):
        return f"the cuda decode kernel needs K-contiguous, 16-byte aligned rows of {name}"
    if group < K and group % SCALE_STEP:
        return (f"the cuda decode kernel reads scales once per {SCALE_STEP} columns: {name}'s groups along K must be "
                f"multiples of {SCALE_STEP} (got {group} columns over K={K})")
    return None


def fp8_decode_supports(hidden, w13_data, w13_scale, w13_bn, w13_bk, w2_data, w2_scale, w2_bn, w2_bk,
                        topk_weights=None, topk_ids=None, *args, **kwargs) -> str | None:
    """Why the cuda decode kernel cannot serve this FP8 fused MoE call, or None. Every activation mode (group,
    token, tensor, static, none) is served exactly; the activation groups are the weight's ``block_k``."""
    why = _decode_reasons(hidden, w13_data.shape[0], topk_ids)
    for name, data, bk in (("w13", w13_data, w13_bk), ("w2", w2_data, w2_bk)):
        why = why or _weight_reasons(name, data, data.shape[2], bk, 16)
    return why


def wna16_decode_supports(hidden, w13_data, w13_scale, w13_zero, w2_data, w2_scale, w2_zero, fmt, g13, g2,
                          topk_weights=None, topk_ids=None, *args, **kwargs) -> str | None:
    """Why the cuda decode kernel cannot serve this int8 / int4 / mxfp4 fused MoE call, or None."""
    why = _decode_reasons(hidden, w13_data.shape[0], topk_ids)
    for name, data, g in (("w13", w13_data, g13), ("w2", w2_data, g2)):
        K = data.shape[2] * (2 if fmt in PACKED else 1)
        why = why or _weight_reasons(name, data, K, g or K, 32 if fmt in PACKED else 16)
    return why


# ----- the decode pipeline ---------------------------------------------------------------------------

if _C is not None:
    _QGEMM = torch.ops.moe_kernels.grouped_gemm_small_quant_cuda.default
    _AMAX = torch.ops.moe_kernels.act_amax_cuda.default
    _PLAN = torch.ops.moe_kernels.plan_routing_cuda.default
    _UNPERMUTE = torch.ops.moe_kernels.unpermute_cuda.default

    @torch.library.register_fake("moe_kernels::grouped_gemm_small_quant_cuda")
    def _(x, w, fmt, w_scale, w_zero, block_n, block_k, expert_offsets, bias, sorted_slots, gather_top_k, activation,
          gated, row_weights, scale_input, scatter_slots, act_mode, act_scale, act_group, act_by_routed_row):
        rows = scatter_slots if scatter_slots > 0 else (sorted_slots.shape[0] if sorted_slots is not None else x.shape[0])
        return x.new_empty(rows, w.shape[1] // 2 if gated else w.shape[1])

    @torch.library.register_fake("moe_kernels::act_amax_cuda")
    def _(x, sorted_slots, top_k, row_weights, group, per_tensor):
        rows = sorted_slots.shape[0] if sorted_slots is not None else x.shape[0]
        K = x.shape[1]
        return x.new_empty((1,) if per_tensor else (rows, (K + group - 1) // group), dtype=torch.float32)

    _bwd, _setup = inference_only("fused_moe", "w13 / w2")
    torch.library.register_autograd("moe_kernels::grouped_gemm_small_quant_cuda", _bwd, setup_context=_setup)
else:
    _QGEMM = _AMAX = _PLAN = _UNPERMUTE = None


def _act_scale(x, mode: str, group: int, static, slots, top_k: int, row_weights):
    """The ``act_scale`` argument of the GEMM for activation mode ``mode``: amax values, the static scale, or None."""
    if mode == "none":
        return None
    if mode == "static":
        return static
    K = x.shape[1]
    if mode == "group":
        return _AMAX(x, slots, top_k, row_weights, group, False)
    return _AMAX(x, slots, top_k, row_weights, max(K, 1), mode == "tensor")  # token: one group a row


def _decode(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias, on_input, capacity,
            expert_map, mode13, s13, mode2, s2):
    """plan -> [amax] -> GEMM1 (gather, quantize on load, dequantize weights, activation) -> [amax] -> GEMM2
    (quantize on load, routing weights, scatter to slots) -> sum over the k slots. ``w13`` / ``w2``:
    ``(data, fmt, scale, zero, block_n, block_k)``."""
    k = topk_ids.shape[1]
    slots, offsets, _, slot_to_row = _PLAN(topk_ids, w13[0].shape[0], 1, capacity, expert_map)
    w_flat = topk_weights.reshape(-1).float().contiguous()
    x = hidden.contiguous()
    rw_in = w_flat if on_input else None
    xs13 = _act_scale(x, mode13, w13[5], s13, slots if on_input else None, k, rw_in)
    h = _QGEMM(x, *w13, offsets, w13_bias, slots, k, activation, gated, rw_in, True, 0, mode13, xs13, w13[5],
               on_input)  # [P, I]
    xs2 = _act_scale(h, mode2, w2[5], s2, None, 1, None)
    y_slots = _QGEMM(h, *w2, offsets, w2_bias, slots, 0, "none", False, None if on_input else w_flat, False,
                     slot_to_row.shape[0], mode2, xs2, w2[5], False)  # [T*k, H] in token order
    kept = torch.where(slot_to_row >= 0, torch.arange(slot_to_row.shape[0], device=hidden.device), -1)
    return _UNPERMUTE(y_slots, slots, kept.to(torch.int32), k, None)


@_backends.register("fp8_fused_moe", "cuda", fp8_decode_supports)
def fp8_fused_moe_decode(hidden, w13_data, w13_scale, w13_bn, w13_bk, w2_data, w2_scale, w2_bn, w2_bk, topk_weights,
                         topk_ids, activation, gated, w13_bias, w2_bias, apply_router_weight_on_input, capacity,
                         expert_map, act_mode13, a13_scale, act_mode2, a2_scale):
    """The FP8 fused MoE at decode (the schema of ``moe_kernels::fp8_fused_moe``)."""
    fmt = "fp8" if w13_data.dtype == torch.float8_e4m3fn else "fp8_e5m2"
    return _decode(hidden, (w13_data, fmt, w13_scale, None, w13_bn, w13_bk), (w2_data, fmt, w2_scale, None, w2_bn, w2_bk),
                   topk_weights, topk_ids, activation, gated, w13_bias, w2_bias, apply_router_weight_on_input,
                   capacity, expert_map, act_mode13, a13_scale, act_mode2, a2_scale)


@_backends.register("wna16_fused_moe", "cuda", wna16_decode_supports)
def wna16_fused_moe_decode(hidden, w13_data, w13_scale, w13_zero, w2_data, w2_scale, w2_zero, fmt, w13_group,
                           w2_group, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                           apply_router_weight_on_input, capacity, expert_map):
    """The int8 / int4 / mxfp4 fused MoE at decode (the schema of ``moe_kernels::wna16_fused_moe``)."""
    K13, K2 = hidden.shape[1], w2_data.shape[2] * (2 if fmt in PACKED else 1)
    return _decode(hidden, (w13_data, fmt, w13_scale, w13_zero, 1, w13_group or max(K13, 1)),
                   (w2_data, fmt, w2_scale, w2_zero, 1, w2_group or max(K2, 1)), topk_weights, topk_ids, activation,
                   gated, w13_bias, w2_bias, apply_router_weight_on_input, capacity, expert_map, "none", None, "none",
                   None)
