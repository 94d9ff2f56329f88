"""FLOP and byte counts of every benchmarked op: ``op(shape) -> (flops, bytes)``.

Bytes are the compulsory traffic of an ideal kernel (each input read once, each output written
once, intermediates of fused ops kept on chip), so ``bytes / time`` is an effective bandwidth.
FLOPs count the matmuls only (2 per multiply-add); elementwise work is left out.
"""

from __future__ import annotations

from .shapes import Shape

I32, F32 = 4, 4


def _es(s: Shape) -> int:
    return s.dtype.itemsize


def _slots(s: Shape) -> int:
    return s.T * s.k


def _expert_weights(s: Shape) -> int:
    """Elements of w13 [E, I2, H] and w2 [E, H, I], plus biases."""
    n = s.E * (s.I2 * s.H + s.H * s.I)
    return n + (s.E * (s.I2 + s.H) if s.cfg.get("bias") else 0)


def _expert_flops(s: Shape) -> int:
    return 2 * _slots(s) * (s.I2 * s.H + s.H * s.I)


def gating_bytes(s: Shape, logits_bytes: int = F32, stats: bool = False, bwd: bool = False) -> int:
    """logits [T, E] in (+ correction bias [E] fp32); weights [T, k] fp32 and ids [T, k] int32 out;
    ``stats``: counts [E] int32 and score sums [E] fp32 out too; ``bwd``: then grad_weights [T, k] and
    ids in, logits read again and grad_logits [T, E] written."""
    n = s.T * s.E * logits_bytes + _slots(s) * (F32 + I32) + (s.E * F32 if s.cfg.get("correction_bias") else 0)
    n += s.E * (I32 + F32) if stats else 0
    return n + (_slots(s) * (F32 + I32) + 2 * s.T * s.E * logits_bytes if bwd else 0)


def expert_choice_bytes(s: Shape, capacity: int) -> int:
    # logits [T, E] in; weights [E, C] fp32 and token_ids [E, C] int32 out
    return s.T * s.E * _es(s) + s.E * capacity * (F32 + I32)


def topk_gating(s: Shape) -> tuple[int, int]:
    # the layer's logits are fp32 whatever the layer's dtype
    return 0, gating_bytes(s, F32)


def plan_routing(s: Shape) -> tuple[int, int]:
    # ids [T, k] in; sorted_slots [P], offsets [E+1], tokens [E], slot_to_row [S] out (P = S)
    return 0, _slots(s) * I32 + _slots(s) * I32 + (2 * s.E + 1) * I32 + _slots(s) * I32


def permute(s: Shape) -> tuple[int, int]:
    # x [T, H] in; x_sorted [P, H] out; sorted_slots [P] in
    return 0, s.T * s.H * _es(s) + _slots(s) * (s.H * _es(s) + I32)


def unpermute(s: Shape) -> tuple[int, int]:
    # y_sorted [P, H] in, weights [T, k] and slot_to_row [S] in; y [T, H] out
    return 2 * _slots(s) * s.H, _slots(s) * (s.H * _es(s) + F32 + I32) + s.T * s.H * _es(s)


def grouped_gemm(s: Shape) -> tuple[int, int]:
    # x_sorted [P, H] @ w13[e].T -> [P, I2]
    S, es = _slots(s), _es(s)
    return 2 * S * s.H * s.I2, (S * s.H + s.E * s.I2 * s.H + S * s.I2) * es + (s.E + 1) * I32


def fused_moe_fwd(s: Shape) -> tuple[int, int]:
    # hidden [T, H] in, expert weights in, routing [T, k] in, out [T, H]
    return _expert_flops(s), (2 * s.T * s.H + _expert_weights(s)) * _es(s) + _slots(s) * (F32 + I32)


def fused_moe_fwd_bwd(s: Shape) -> tuple[int, int]:
    # backward: data grad and weight grad each cost a forward's matmuls; weights read again and
    # their grads written, grad_out read and grad_hidden written
    flops, bytes_ = fused_moe_fwd(s)
    return 3 * flops, bytes_ + (2 * _expert_weights(s) + 2 * s.T * s.H) * _es(s) + _slots(s) * F32


def _dense_extra(s: Shape) -> tuple[int, int]:
    """Router (fp32) and shared expert of the layer: (flops, bytes)."""
    rows = 3 if s.gated else 2
    flops = 2 * s.T * s.H * s.E + 2 * s.T * rows * s.H * s.shared_I
    bytes_ = s.E * s.H * F32 + rows * s.H * s.shared_I * _es(s) + s.T * s.E * F32
    return flops, bytes_


def layer_fwd(s: Shape) -> tuple[int, int]:
    f, b = fused_moe_fwd(s)
    df, db = _dense_extra(s)
    return f + df, b + db


def layer_fwd_bwd(s: Shape) -> tuple[int, int]:
    f, b = fused_moe_fwd_bwd(s)
    df, db = _dense_extra(s)
    return f + 3 * df, b + 3 * db


COSTS = {
    "topk_gating": topk_gating,
    "plan_routing": plan_routing,
    "permute": permute,
    "unpermute": unpermute,
    "grouped_gemm": grouped_gemm,
    "fused_moe.fwd": fused_moe_fwd,
    "fused_moe.fwd+bwd": fused_moe_fwd_bwd,
    "MoE.fwd": layer_fwd,
    "MoE.fwd+bwd": layer_fwd_bwd,
}
