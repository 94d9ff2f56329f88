"""The eager CPU path of the ``torch`` backend's ``fused_moe``: transformers' ``grouped_mm`` experts' work, no more.

On CPU tensors outside torch.compile a tensor's values are on the host already, so the plan reads them
there: one stable sort of the slots by expert and one ``searchsorted`` give the ``E + 1`` row bounds of the
experts (``bounds[e]:bounds[e + 1]``), read as Python ints. Slots of dropped ids (< 0 sort to the head, >= E
to the tail) are never gathered, computed or masked: only the kept rows ``[n = bounds[E] - bounds[0]]`` are.

=============== ==============================================================================================
step            ops
=============== ==============================================================================================
plan            ``sort``, ``searchsorted`` (bounds to the host), ``//`` k
gather          ``index_select`` of the kept rows (and of their routing weights)
GEMMs           experts with few rows (fp32/fp64): the C kernels of :mod:`moe_kernels._cpu_gemm`, all experts
                in one call (bias fused); larger experts: per expert ``mm``/``addmm`` (bias fused); one
                ``F.grouped_mm`` for all instead (bias: one ``index_select`` + ``add_``) when most experts with
                rows are larger and a third or more of the experts have rows (a CPU ``grouped_mm`` visits
                every expert, a loop only those with rows)
activation      ``silu(g) * u`` on views of ``h`` (fp32/fp64; other cases: the reference's, in fp32)
combine         one ``index_add_`` of the weighted rows into ``[T, H]`` (fp32; fp64 for fp64), rows in expert
                order: deterministic (CPU ``index_add_`` is sequential)
=============== ==============================================================================================

Under autograd a ``torch.autograd.Function`` keeps the plan and the forward's intermediates (gathered rows,
pre-activation, ``silu(g)``, activation, expert outputs), so the backward is two GEMMs for dX, two for dW (zeros
written once, for experts without rows: by the C kernel's call when it runs), the activation's backward and the
router gradient as one row-wise dot; only the gradients asked for (``needs_input_grad``) are computed.

Everything else (other devices, torch.compile, tensor subclasses) takes the registered op of
:mod:`moe_kernels._torch_moe`, which needs no host read on a GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _cpu_gemm
from . import reference as ref
from ._alloc import empty

_PLAIN = _cpu_gemm.PLAIN
LOOP_FRACTION = 3  # a per-expert loop when fewer than E / LOOP_FRACTION experts have rows, else grouped_mm


def serves(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """This path runs the call: plain CPU tensors, not traced."""
    return (hidden.device.type == "cpu" and type(hidden) in _PLAIN and type(w13) in _PLAIN and type(w2) in _PLAIN
            and not torch.compiler.is_compiling())


@functools.lru_cache(maxsize=64)
def _arange(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(n, dtype=dtype)  # read only


class Plan:
    """The kept slots sorted by expert: ``order [n]`` (slots), ``tok [n]`` (their tokens), ``row_e [n]`` (their
    experts), ``bounds`` (E + 1 Python ints, ``bounds[0] = 0``), the non-empty ``segs [(e, lo, hi)]``, ``offs``
    (segment ends ``[E]`` int32, for ``grouped_mm``) and whether the GEMMs loop over ``segs``."""

    __slots__ = ("order", "tok", "row_e", "bounds", "segs", "offs", "loop", "n", "E", "_over", "_cbounds")

    def __init__(self, topk_ids: torch.Tensor, E: int, capacity, expert_map):
        k = topk_ids.shape[1]
        if capacity is None and expert_map is None:
            key = topk_ids.reshape(-1)  # ids < 0 sort to the head, ids >= E to the tail: both dropped
            if key.dtype != torch.int64 and key.dtype != torch.int32:  # E + 1 bounds must fit the id dtype
                key = key.long()
        else:  # the reference plan decides which slots are kept; they keep their expert, the others get E
            _, offsets, _, slot_to_row = ref.plan_routing(topk_ids, E, 1, capacity, expert_map)
            rows_e = ref.row_experts(offsets, topk_ids.numel())
            key = torch.where(slot_to_row >= 0, rows_e.index_select(0, slot_to_row.clamp(min=0).long()), E)
        row_e, order = torch.sort(key, stable=True)
        pos = torch.searchsorted(row_e, _arange(E + 1, row_e.dtype), out_int32=True)  # [E + 1]
        bounds = pos.tolist()
        b0, bE = bounds[0], bounds[E]
        if b0 or bE < key.shape[0]:
            row_e, order = row_e[b0:bE], order[b0:bE]
        self.offs = pos[1:] if b0 == 0 else pos[1:] - b0
        self.bounds = bounds if b0 == 0 else [b - b0 for b in bounds]
        self.order, self.row_e, self.n, self.E = order, row_e, bE - b0, E
        self.tok = order if k == 1 else order // k
        b = self.bounds
        self.segs = [(e, b[e], b[e + 1]) for e in range(E) if b[e + 1] > b[e]]
        self.loop = len(self.segs) * LOOP_FRACTION < E
        self._over, self._cbounds = {}, None

    def cbounds(self):
        """``bounds`` for the C kernels (built once per plan)."""
        if self._cbounds is None:
            self._cbounds = _cpu_gemm.bounds_array(self.bounds)
        return self._cbounds

    def over(self, rows: int) -> list:
        """The segments with more than ``rows`` rows (those the C kernels leave to BLAS)."""
        if rows not in self._over:
            self._over[rows] = [s for s in self.segs if s[2] - s[1] > rows]
        return self._over[rows]


def _small_enough(plan: Plan, over: list, grouped: bool) -> bool:
    """The C kernels take the call: some expert with rows is within their row limit, and the experts over it
    (``over``, given to BLAS one by one) are at most half of those with rows, or one ``grouped_mm`` for all
    (``grouped``) is not on offer; otherwise that grouped_mm is cheaper than a long loop of ``mm`` calls."""
    return len(over) < len(plan.segs) and (not grouped or len(over) * 2 <= len(plan.segs))


def _gemm(plan: Plan, x: torch.Tensor, w: torch.Tensor, trans_w: bool, bias: torch.Tensor | None) -> torch.Tensor:
    """Row r of expert e: ``x[r] @ w[e].T`` (``trans_w``, w ``[E, N, K]``) or ``x[r] @ w[e]`` (w ``[E, K, N]``),
    plus ``bias[e]``: ``[n, N]``."""
    wt = w.transpose(1, 2) if trans_w else w  # [E, K, N]
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    segs, y = plan.segs, None
    rows = _cpu_gemm.gemm_rows(x, wt, bias)
    over = plan.over(rows) if rows else segs
    grouped = not plan.loop and ref._grouped_mm_ok(x, w)
    if _small_enough(plan, over, grouped):  # the C kernels for experts with few rows, BLAS for the others
        y = empty(x.shape[0], wt.shape[2], dtype=x.dtype, device=x.device)
        _cpu_gemm.gemm(x, wt, bias, plan.cbounds(), y, rows)
        segs = over
    elif grouped:
        y = F.grouped_mm(x if x.is_contiguous() else x.contiguous(), wt, offs=plan.offs)
        return y if bias is None else y.add_(bias.index_select(0, plan.row_e))
    else:
        y = empty(x.shape[0], wt.shape[2], dtype=x.dtype, device=x.device)
    for e, lo, hi in segs:
        if bias is None:
            torch.mm(x[lo:hi], wt[e], out=y[lo:hi])
        else:
            torch.addmm(bias[e], x[lo:hi], wt[e], out=y[lo:hi])
    return y


def _wgrad(plan: Plan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per expert ``a_e^T @ b_e`` ``[E, A, B]``; zeros for experts without rows, each element written once."""
    rows = _cpu_gemm.wgrad_rows(a, b)
    over = plan.over(rows) if rows else plan.segs
    grouped = not plan.loop and a.is_contiguous() and ref._grouped_mm_ok(a, b.new_empty(1, b.shape[1], a.shape[1]))
    if _small_enough(plan, over, grouped):  # zeros, and experts with few rows, in one call; BLAS for the others
        out = empty(plan.E, a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
        _cpu_gemm.wgrad(a, b, plan.cbounds(), out, rows)
        for e, lo, hi in over:
            torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
        return out
    if grouped:
        return F.grouped_mm(a.t(), b if b.is_contiguous() else b.contiguous(), offs=plan.offs)
    out = empty(plan.E, a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
    nxt = 0  # the first expert not written yet
    for e, lo, hi in plan.segs:
        if e > nxt:
            out[nxt:e].zero_()
        torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
        nxt = e + 1
    if nxt < plan.E:
        out[nxt:].zero_()
    return out


def _weight_grad(plan: Plan, g_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient of ``w [E, N, K]`` (rows ``g_out [n, N]``, ``x [n, K]``) laid out as ``w``: a transposed view
    (transformers' ``is_transposed`` weights) gets a transposed view, accumulated into ``.grad`` contiguously."""
    if not w.is_contiguous() and w.transpose(1, 2).is_contiguous():
        return _wgrad(plan, x, g_out).transpose(1, 2)
    return _wgrad(plan, g_out, x)


def _split(h: torch.Tensor, gated: bool, interleaved: bool):
    if interleaved:
        return h[:, 0::2], h[:, 1::2]
    inter = h.shape[1] // 2
    return h[:, :inter], h[:, inter:]


def _fast_act(kind: str, gated: bool, dtype: torch.dtype) -> bool:
    """SwiGLU and gpt-oss's clamped SwiGLU in the GEMM dtype (fp32/fp64: the reference computes in that dtype
    too), with what the backward reuses kept."""
    return (kind == "silu" or kind == "swiglu_oai") and gated and (dtype == torch.float32 or dtype == torch.float64)


def _activation(h, kind, gated, interleaved, keep: bool):
    """``(a [n, I], saved)``: ``saved`` (when ``keep``) is ``silu(g)`` for silu, ``(sigmoid(alpha * g_c),
    glu = g_c * sigmoid(alpha * g_c), u_c + 1)`` for swiglu_oai (``g_c``, ``u_c``: the clamped gate and up);
    None otherwise."""
    if not _fast_act(kind, gated, h.dtype):
        return ref.activation(h, kind, gated, interleaved), None
    g, u = _split(h, gated, interleaved)
    if kind == "silu":
        s = F.silu(g)
        return (s * u, s) if keep else (s.mul_(u), None)
    gc = g.clamp(max=ref.OAI_LIMIT)
    sg = torch.sigmoid(gc * ref.OAI_ALPHA)
    glu = gc.mul_(sg)
    up1 = u.clamp(-ref.OAI_LIMIT, ref.OAI_LIMIT).add_(1)
    return (glu * up1, (sg, glu, up1)) if keep else (glu.mul_(up1), None)


def _activation_backward(g_a, h, saved, kind, gated, interleaved):
    if saved is None:
        return ref.activation_backward(g_a, h, kind, gated, interleaved)
    g, u = _split(h, gated, interleaved)
    g_h = empty(*h.shape, dtype=h.dtype, device=h.device)
    dg, du = _split(g_h, gated, interleaved)
    if kind == "silu":
        torch.mul(g_a, saved, out=du)
        torch.mul(g_a, u, out=dg)
        torch.ops.aten.silu_backward.grad_input(dg, g, grad_input=dg)
        return g_h
    sg, glu, up1 = saved  # d a / d glu = u_c + 1, d glu / d g_c = sg + alpha * glu * (1 - sg), d a / d u_c = glu
    torch.mul(g_a, glu, out=du).mul_(u.abs() <= ref.OAI_LIMIT)  # no gradient past the clamps (nor for NaN)
    slope = torch.rsub(sg, 1).mul_(glu).mul_(ref.OAI_ALPHA).add_(sg)
    torch.mul(g_a, up1, out=dg).mul_(slope).mul_(g <= ref.OAI_LIMIT)
    return g_h


def _forward(hidden, w13, w2, topk_weights, topk_ids, kind, gated, b13, b2, on_input, capacity, expert_map,
             interleaved, save: bool):
    """``(out [T, H], saved)``; ``saved`` holds what the backward needs when ``save``."""
    T, H = hidden.shape
    acc = ref.acc_dtype(hidden.dtype)
    plan = Plan(topk_ids, w13.shape[0], capacity, expert_map)
    if plan.n == 0:
        return torch.zeros(T, H, dtype=hidden.dtype), (plan, None, None, None, None, None, None)
    w_rows = topk_weights.reshape(-1).index_select(0, plan.order).to(acc)  # [n]
    xs = hidden.index_select(0, plan.tok)  # [n, H]
    if on_input:
        xs = (xs * w_rows[:, None]).to(hidden.dtype)
    h = _gemm(plan, xs, w13, True, b13)  # [n, 2I]
    a, s = _activation(h, kind, gated, interleaved, save)  # [n, I]
    ys = _gemm(plan, a, w2, True, b2)  # [n, H]
    rows = ys if on_input else ys * w_rows[:, None]  # the product is in acc (w_rows is)
    out = torch.zeros(T, H, dtype=acc).index_add_(0, plan.tok, rows if rows.dtype == acc else rows.to(acc))
    out = out if out.dtype == hidden.dtype else out.to(hidden.dtype)
    return out, ((plan, w_rows, xs, h, s, a, ys) if save else None)


def _backward(need, grad_out, hidden, w13, w2, topk_weights, saved, kind, gated, b13_dtype, b2_dtype, on_input,
              interleaved):
    """Gradients ``(hidden, w13, w2, topk_weights, b13, b2)`` (None where not needed; ``b*_dtype`` None: no bias)."""
    plan, w_rows, xs, h, s, a, ys = saved
    has_b13, has_b2 = b13_dtype is not None, b2_dtype is not None
    T, H = hidden.shape
    acc = ref.acc_dtype(hidden.dtype)
    if plan.n == 0:
        z = torch.zeros
        return (z(T, H, dtype=hidden.dtype) if need[0] else None, z(w13.shape, dtype=w13.dtype) if need[1] else None,
                z(w2.shape, dtype=w2.dtype) if need[2] else None,
                z(topk_weights.shape, dtype=topk_weights.dtype) if need[3] else None,
                z(plan.E, w13.shape[1], dtype=b13_dtype) if has_b13 and need[4] else None,
                z(plan.E, w2.shape[1], dtype=b2_dtype) if has_b2 and need[5] else None)
    g_rows = grad_out.index_select(0, plan.tok)  # [n, H]
    g_ys = g_rows if on_input else (g_rows * w_rows[:, None]).to(hidden.dtype)
    need_h = need[0] or need[1] or (need[3] and on_input) or (has_b13 and need[4])
    g_h = g_xs = None
    if need_h:
        g_a = _gemm(plan, g_ys, w2, False, None)  # [n, I]
        g_h = _activation_backward(g_a, h, s, kind, gated, interleaved)  # [n, 2I]
    if need[0] or (need[3] and on_input):
        g_xs = _gemm(plan, g_h, w13, False, None)  # [n, H]
    g_hidden = g_w = None
    if need[0]:
        src = (g_xs * w_rows[:, None]) if on_input else g_xs
        g_hidden = torch.zeros(T, H, dtype=acc).index_add_(0, plan.tok, src if src.dtype == acc else src.to(acc))
        g_hidden = g_hidden.to(hidden.dtype)
    if need[3]:
        pa, pb = (g_xs, hidden.index_select(0, plan.tok)) if on_input else (ys, g_rows)
        dots = (pa * pb).sum(-1) if pa.dtype == acc else (pa.to(acc) * pb.to(acc)).sum(-1)  # [n]
        g_w = torch.zeros(topk_weights.numel(), dtype=acc).index_copy_(0, plan.order, dots)
        g_w = g_w.view(topk_weights.shape).to(topk_weights.dtype)
    g_w13 = _weight_grad(plan, g_h, xs, w13) if need[1] else None
    g_w2 = _weight_grad(plan, g_ys, a, w2) if need[2] else None
    g_b13 = g_b2 = None
    if has_b13 and need[4]:
        g_b13 = torch.zeros(plan.E, h.shape[1], dtype=acc).index_add_(0, plan.row_e, g_h.to(acc)).to(b13_dtype)
    if has_b2 and need[5]:
        g_b2 = torch.zeros(plan.E, H, dtype=acc).index_add_(0, plan.row_e, g_ys.to(acc)).to(b2_dtype)
    return g_hidden, g_w13, g_w2, g_w, g_b13, g_b2


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, w13, w2, topk_weights, b13, b2, topk_ids, kind, gated, on_input, capacity, expert_map,
                interleaved):
        out, saved = _forward(hidden, w13, w2, topk_weights, topk_ids, kind, gated, b13, b2, on_input, capacity,
                              expert_map, interleaved, True)
        ctx.save_for_backward(hidden, w13, w2, topk_weights)
        ctx.saved = saved
        ctx.cfg = (kind, gated, None if b13 is None else b13.dtype, None if b2 is None else b2.dtype, on_input, interleaved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, w13, w2, topk_weights = ctx.saved_tensors
        saved = ctx.saved  # kept: a graph retained for a second backward needs it again
        kind, gated, b13_dtype, b2_dtype, on_input, interleaved = ctx.cfg
        g = _backward(ctx.needs_input_grad[:6], grad_out, hidden, w13, w2, topk_weights, saved, kind, gated, b13_dtype,
                      b2_dtype, on_input, interleaved)
        return g + (None,) * 7


def fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
              apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved, grad: bool) -> torch.Tensor:
    """The CPU path (arguments of ``moe_kernels::fused_moe``); ``grad``: build the autograd graph."""
    if grad:
        return _FusedMoE.apply(hidden, w13, w2, topk_weights, w13_bias, w2_bias, topk_ids, activation, gated,
                               apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved)
    return _forward(hidden, w13, w2, topk_weights, topk_ids, activation, gated, w13_bias, w2_bias,
                    apply_router_weight_on_input, capacity, expert_map, gate_up_interleaved, False)[0]
