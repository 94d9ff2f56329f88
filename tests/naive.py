"""Deliberately naive float64 implementations written from the contracts (loops over tokens and
experts), independent of moe_kernels.reference, for the tests to compare against."""

import math

import torch


def act(h: torch.Tensor, kind: str, gated: bool) -> torch.Tensor:
    h = h.double()
    if gated:
        g, u = h[: h.shape[0] // 2], h[h.shape[0] // 2:]
    else:
        g, u = h, None
    if kind == "swiglu_oai":
        g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
        return (u + 1) * g * torch.sigmoid(1.702 * g)
    if kind == "silu":
        a = g / (1 + torch.exp(-g))
    elif kind == "gelu":
        a = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    else:
        a = torch.clamp(g, min=0)
    return a if u is None else a * u


def kept_slots(topk_ids, num_experts, capacity=None, expert_map=None):
    """[T][k] local expert of each slot, or None where dropped (GShard capacity order)."""
    T, k = topk_ids.shape
    local = [[None] * k for _ in range(T)]
    for t in range(T):
        for j in range(k):
            e = int(topk_ids[t, j])
            if e < 0:
                continue
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            local[t][j] = e
    if capacity is not None:
        used = [0] * num_experts
        for j in range(k):
            for t in range(T):
                e = local[t][j]
                if e is None:
                    continue
                if used[e] < capacity:
                    used[e] += 1
                else:
                    local[t][j] = None
    return local


def moe(hidden, w13, w2, topk_weights, topk_ids, activation="silu", gated=True, b13=None, b2=None,
        on_input=False, capacity=None, expert_map=None):
    """out[t] = sum_j w[t,j] * expert_{e_j}(x_t), one token and one slot at a time, in float64."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    local = kept_slots(topk_ids, w13.shape[0], capacity, expert_map)
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = local[t][j]
            if e is None:
                continue
            wt = topk_weights[t, j].double()
            x = hidden[t].double() * (wt if on_input else 1.0)
            h = w13[e].double() @ x + (b13[e].double() if b13 is not None else 0.0)
            y = w2[e].double() @ act(h, activation, gated) + (b2[e].double() if b2 is not None else 0.0)
            out[t] += y if on_input else wt * y
    return out


def grouped_gemm(x, w, offsets, bias=None, trans_w=True):
    """Rows of each segment times the expert's weight, float64; rows outside segments are zero."""
    P = x.shape[0]
    N = w.shape[1] if trans_w else w.shape[2]
    y = torch.zeros(P, N, dtype=torch.float64)
    o = [int(v) for v in offsets]
    for e in range(w.shape[0]):
        we = w[e].double().t() if trans_w else w[e].double()
        for r in range(o[e], o[e + 1]):
            y[r] = x[r].double() @ we + (bias[e].double() if bias is not None else 0.0)
    return y
