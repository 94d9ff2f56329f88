"""Python side of the ``moe_kernels._C`` CUDA extension: fake implementations and backend entries.

Importing this module never fails: without the extension the ``cuda`` backend reports why it is
unavailable (see :func:`moe_kernels.backends`).
"""

from __future__ import annotations

import torch

from . import _backends, _checks, ops
from .batch_invariance import is_batch_invariant

try:
    from . import _C  # noqa: F401  (registers torch.ops.moe_kernels.*_cuda)
except ImportError:
    _C = None

MAX_COUNT_EXPERTS = 12288  # the CUDA histogram keeps E int32 counters in 48 KB of shared memory


def _counts_supports(topk_ids, num_experts=None, *args, **kwargs):
    if num_experts is not None and num_experts > MAX_COUNT_EXPERTS:
        return f"the cuda histogram serves E <= {MAX_COUNT_EXPERTS}, got {num_experts}"
    return None


def gating_backward_op():
    """The backward of the CUDA gating op, chosen when it runs (not at import, when the Triton op may not
    be registered yet): the Triton kernel where the triton backend is available, else the reference op."""
    if hasattr(torch.ops.moe_kernels, "topk_gating_backward_triton") and _backends.backends()["triton"].available:
        return torch.ops.moe_kernels.topk_gating_backward_triton.default
    return torch.ops.moe_kernels.topk_gating_backward.default


if _C is not None:

    @torch.library.register_fake("moe_kernels::expert_counts_cuda")
    def _(topk_ids, num_experts):
        return topk_ids.new_empty(num_experts, dtype=torch.int32)

    _backends.register("expert_counts", "cuda", _counts_supports)(torch.ops.moe_kernels.expert_counts_cuda.default)

    @torch.library.register_fake("moe_kernels::topk_gating_cuda")
    def _(logits, correction_bias, top_k, scoring, renormalize, num_groups, topk_groups, scaling_factor, group_n):
        T = logits.shape[0]
        return logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int32)

    _bwd, _setup = ops.gating_autograd(lambda *args: gating_backward_op()(*args))
    torch.library.register_autograd("moe_kernels::topk_gating_cuda", _bwd, setup_context=_setup)
    _GATING = torch.ops.moe_kernels.topk_gating_cuda.default

    def _gating_supports(logits, top_k, *, num_groups=1, with_stats=False, **kwargs):
        if logits.dtype == torch.float64:
            return "float64 inputs are served by the torch backend only"
        if logits.shape[1] > 1024:
            return f"the cuda kernel serves E <= 1024, got {logits.shape[1]}"
        if num_groups > 32:
            return f"the cuda kernel serves num_groups <= 32, got {num_groups}"
        if with_stats:
            return "fused statistics are computed by the triton kernel only"
        return None

    @_backends.register("topk_gating", "cuda", _gating_supports)
    def _topk_gating_cuda(logits, bias, top_k, scoring, renormalize, num_groups, topk_groups, scaling, with_stats,
                          group_n):
        w, ids = _GATING(logits, bias, top_k, scoring, renormalize, num_groups, topk_groups, scaling, group_n)
        return w, ids, ids.new_empty(0), w.new_empty(0)

    # ----- routing plan, permute, unpermute, slot dots -----------------------------------------------

    torch.library.register_fake("moe_kernels::plan_routing_cuda")(ops.plan_fake)
    torch.library.register_fake("moe_kernels::permute_cuda")(ops.permute_fake)
    torch.library.register_fake("moe_kernels::unpermute_cuda")(ops.unpermute_fake)

    @torch.library.register_fake("moe_kernels::slot_dots_cuda")
    def _(rows, slot_to_row, per_token, top_k):
        return rows.new_empty(slot_to_row.shape[0] // top_k, top_k, dtype=torch.float32)

    _PERMUTE = torch.ops.moe_kernels.permute_cuda.default
    _UNPERMUTE = torch.ops.moe_kernels.unpermute_cuda.default
    _pbwd, _ubwd, _setup = ops.route_autograd(_PERMUTE, _UNPERMUTE, torch.ops.moe_kernels.slot_dots_cuda.default)
    torch.library.register_autograd("moe_kernels::permute_cuda", _pbwd, setup_context=_setup)
    torch.library.register_autograd("moe_kernels::unpermute_cuda", _ubwd, setup_context=_setup)

    def _route_supports(data, *args, **kwargs):
        if data.dtype == torch.float64:
            return "float64 inputs are served by the torch backend only"
        return None

    def _plan_supports(topk_ids, num_experts, *args, **kwargs):
        if num_experts > 1024:
            return f"the cuda plan kernel serves E <= 1024, got {num_experts}"
        return None

    _backends.register("permute", "cuda", _route_supports)(_PERMUTE)
    _backends.register("unpermute", "cuda", _route_supports)(_UNPERMUTE)
    _backends.register("plan_routing", "cuda", _plan_supports)(torch.ops.moe_kernels.plan_routing_cuda.default)

    @torch.library.register_fake("moe_kernels::grouped_gemm_small_cuda")
    def _(x, w, expert_offsets, bias, sorted_slots, gather_top_k, activation, gated, row_weights, scale_input,
          scatter_slots):
        rows = scatter_slots if scatter_slots > 0 else (sorted_slots.shape[0] if sorted_slots is not None else x.shape[0])
        return x.new_empty(rows, w.shape[1] // 2 if gated else w.shape[1])

    _SMALL = torch.ops.moe_kernels.grouped_gemm_small_cuda.default
    _PLAN = torch.ops.moe_kernels.plan_routing_cuda.default
    DECODE_ROWS_PER_EXPERT = 4  # above this the tensor-core GEMM (triton) wins

    def _decode_supports(hidden, w13, w2, *args, **kwargs):
        """The decode path: inference, few rows per expert, K-contiguous weights."""
        if is_batch_invariant():  # one kernel (and config) for every batch size: the triton kernel
            return "batch-invariant mode: the triton kernel serves every batch size"
        if hidden.dtype == torch.float64:
            return "float64 inputs are served by the torch backend only"
        if kwargs.get("gate_up_interleaved"):
            return "the cuda decode kernel reads gate rows then up rows (not interleaved)"
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, w13, w2) + args):
            return "the cuda decode path is inference-only (training runs the triton or torch backend)"
        E, k = w13.shape[0], args[1].shape[1]
        if E > 1024:
            return f"the cuda plan kernel serves E <= 1024, got {E}"
        if not _checks.known_true(hidden.shape[0] * k <= DECODE_ROWS_PER_EXPERT * E):  # unknown (traced): not decode
            return f"more than {DECODE_ROWS_PER_EXPERT} rows per expert on average: not a decode batch"
        vec = 16 // hidden.element_size()
        if hidden.shape[1] % vec or w2.shape[2] % vec or w13.stride(2) != 1 or w2.stride(2) != 1:
            return f"the decode kernel needs H and I multiples of {vec} and K-contiguous weights"
        return None

    @_backends.register("fused_moe", "cuda", _decode_supports)
    def _fused_moe_decode(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                          apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved=False):
        """plan -> small GEMM (gather, activation) -> small GEMM (weights, scatter to slots) -> sum over k."""
        k, on_input = topk_ids.shape[1], apply_router_weight_on_input
        slots, offsets, _, slot_to_row = _PLAN(topk_ids, w13.shape[0], 1, capacity, expert_map)
        w_flat = topk_weights.reshape(-1).float().contiguous()
        h = _SMALL(hidden.contiguous(), w13, offsets, w13_bias, slots, k, activation, gated,
                   w_flat if on_input else None, True, 0)  # [P, I]
        y_slots = _SMALL(h, w2, offsets, w2_bias, slots, 0, "none", False, None if on_input else w_flat, False,
                         slot_to_row.shape[0])  # [T*k, H] in token order
        kept = torch.where(slot_to_row >= 0, torch.arange(slot_to_row.shape[0], device=hidden.device), -1)
        return _UNPERMUTE(y_slots, slots, kept.to(torch.int32), k, None)
