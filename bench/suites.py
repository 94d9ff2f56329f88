"""The ``main`` suite: the MoE layer, ``fused_moe`` and each op on every model shape and backend,
beside two baselines written here (a per-expert Python loop and ``F.grouped_mm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import moe_kernels as mk

from . import costs
from .harness import Case, Progress, fill_ratios, measure_ceilings, run_case
from .shapes import Shape

OPS = tuple(costs.COSTS)


def available_backends() -> list[str]:
    """moe_kernels backends that can run in this process; ``torch`` (the reference) first."""
    info = mk.backends()
    return [n for n in ("torch", "triton", "cuda") if info[n].available]


# ----- baselines -------------------------------------------------------------------------------------


def act(h: torch.Tensor, kind: str, gated: bool) -> torch.Tensor:
    """``act(gate) * up`` on ``h = [gate | up]`` (or ``act(h)``), in fp32, back in h's dtype."""
    g, u = h.float().chunk(2, -1) if gated else (h.float(), None)
    if kind == "swiglu_oai":
        g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
        return (g * torch.sigmoid(1.702 * g) * (u + 1)).to(h.dtype)
    a = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[kind](g)
    return (a if u is None else a * u).to(h.dtype)


def loop_moe(x, w13, w2, weights, ids, kind, gated, b13=None, b2=None):
    """Plain per-expert loop: gather each expert's tokens, two matmuls, weighted index_add (no capacity)."""
    T, k = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1).long()  # [S]
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat)).tolist()
    w13s, w2s = w13.unbind(0), w2.unbind(0)  # unbind: one stacked gradient instead of E full-size ones
    b13s = b13.unbind(0) if b13 is not None else None
    b2s = b2.unbind(0) if b2 is not None else None
    wflat = weights.reshape(-1).float()  # [S]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(E):
        if counts[e] == 0:
            continue
        slots = (flat == e).nonzero().squeeze(1)  # [n_e]
        tok = slots // k
        h = x[tok] @ w13s[e].T  # [n_e, I2]
        if b13s is not None:
            h = h + b13s[e]
        y = act(h, kind, gated) @ w2s[e].T  # [n_e, H]
        if b2s is not None:
            y = y + b2s[e]
        out.index_add_(0, tok, y.float() * wflat[slots, None])
    return out.to(x.dtype)


def loop_gemm(xs, w, offsets, bias=None):
    """Per-expert loop of ``xs[rows of e] @ w[e].T`` (+ bias[e]); rows outside every segment are zero."""
    bounds = offsets.tolist()
    y = xs.new_zeros(xs.shape[0], w.shape[1])  # [P, N]
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            y[lo:hi] = xs[lo:hi] @ w[e].T if bias is None else xs[lo:hi] @ w[e].T + bias[e]
    return y


def grouped_mm_reason(s: Shape, device: str) -> str | None:
    """Why ``F.grouped_mm`` cannot serve this shape here, or None."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no F.grouped_mm"
    if s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped_mm does not take {s.dtype}"
    if device == "cuda" and s.dtype != torch.bfloat16:
        return "grouped_mm on CUDA takes bf16 only"
    es = s.dtype.itemsize
    if any(d * es % 16 for d in (s.H, s.I, s.I2)):
        return "rows not 16-byte aligned"
    return None


def grouped_mm_moe(x, w13, w2, weights, ids, kind, gated, b13=None, b2=None):
    """Sort slots by expert, two ``F.grouped_mm`` calls around the activation, weighted index_add."""
    T, k = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1).long()  # [S]
    order = flat.argsort(stable=True)  # [S] slots grouped by expert
    row_e = flat[order]  # [S] expert of each sorted row
    ends = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat)).cumsum(0)
    ends = ends.to(torch.int32)  # [E]
    tok = order // k
    h = F.grouped_mm(x.index_select(0, tok), w13.transpose(1, 2), offs=ends)  # [S, I2]
    if b13 is not None:
        h = h + b13.index_select(0, row_e)
    y = F.grouped_mm(act(h, kind, gated), w2.transpose(1, 2), offs=ends)  # [S, H]
    if b2 is not None:
        y = y + b2.index_select(0, row_e)
    y = y.float() * weights.reshape(-1).float()[order, None]
    return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add(0, tok, y).to(x.dtype)


def route(moe: mk.MoE, x: torch.Tensor, backend: str = "torch"):
    """The layer's router on ``x [T, H]``: ``(logits [T, E] fp32, topk_weights [T, k], topk_ids [T, k])``."""
    bias = moe.router.bias.float() if moe.router.bias is not None else None
    logits = F.linear(x.float(), moe.router.weight.float(), bias)
    w, ids = mk.topk_gating(logits, moe.top_k, scoring=moe.scoring, renormalize=moe.renormalize,
                            correction_bias=moe.correction_bias, num_groups=moe.num_groups, topk_groups=moe.topk_groups,
                            scaling_factor=moe.scaling_factor, backend=backend)
    return logits, w, ids


def loop_layer(moe: mk.MoE, x: torch.Tensor, expert_fn=loop_moe, backend: str = "torch") -> torch.Tensor:
    """The MoE layer with its experts replaced by ``expert_fn`` (router, on ``backend``, and shared expert as in MoE)."""
    _, w, ids = route(moe, x, backend)
    out = expert_fn(x, moe.w13, moe.w2, w, ids, moe.activation, moe.gated, moe.b13, moe.b2)
    if moe.shared is not None:
        sh = moe.shared(x)
        out = out + (torch.sigmoid(moe.shared_gate(x)) * sh if moe.shared_gate is not None else sh)
    return out


# ----- inputs and cases ------------------------------------------------------------------------------


def make_layer(s: Shape, device: str) -> mk.MoE:
    """The benchmark layer of a shape (torch backend; a small random correction bias where the model has one)."""
    moe = mk.MoE(s.H, s.I, s.E, s.k, dtype=s.dtype, device=device, backend="torch", **s.moe_kwargs())
    if moe.correction_bias is not None:
        moe.correction_bias.uniform_(-0.05, 0.05)
    return moe


class Inputs:
    """Every tensor the cases of one shape need, built once."""

    def __init__(self, s: Shape, device: str):
        torch.manual_seed(0)
        self.s = s
        self.moe = make_layer(s, device)
        self.x = torch.randn(s.T, s.H, dtype=s.dtype, device=device)  # [T, H]
        with torch.no_grad():
            self.logits, self.weights, self.ids = route(self.moe, self.x)  # [T, E] fp32, [T, k], [T, k]
            self.plan = mk.plan_routing(self.ids, s.E, capacity=s.capacity)
            self.x_sorted = mk.permute(self.x, self.plan)  # [P, H]
        self.y_sorted = torch.randn_like(self.x_sorted)  # [P, H]
        self.grad_out = torch.randn_like(self.x)  # [T, H]

    def expert_args(self):
        m = self.moe
        return m.w13, m.w2, m.activation, m.gated, m.b13, m.b2


def _fwd(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _fwd_bwd(fn, grad_out):
    def run():
        fn().backward(grad_out)

    return run


def _cases(inp: Inputs, op: str, backends: list[str], device: str) -> list[Case]:
    """Kernel rows (one per backend) then baseline rows of one op on one shape."""
    s, m, x = inp.s, inp.moe, inp.x
    w13, w2, kind, gated, b13, b2 = inp.expert_args()
    flops, nbytes = costs.COSTS[op](s)
    gmm_why = grouped_mm_reason(s, device)
    no_cap = "no capacity drop in baseline" if s.capacity is not None else ""
    cases: list[Case] = []

    def add(backend, fn, grads=(), note=""):
        cases.append(Case(op, s, backend, fn, flops, nbytes, grads, note))

    if op == "topk_gating":
        c = s.moe_kwargs()
        kw = {n: c[n] for n in ("scoring", "renormalize", "num_groups", "topk_groups", "scaling_factor")}
        for b in backends:
            add(b, _fwd(lambda b=b: mk.topk_gating(inp.logits, s.k, correction_bias=m.correction_bias, backend=b, **kw)))
    elif op == "plan_routing":
        for b in backends:
            add(b, _fwd(lambda b=b: mk.plan_routing(inp.ids, s.E, capacity=s.capacity, backend=b)))
    elif op == "permute":
        for b in backends:
            add(b, _fwd(lambda b=b: mk.permute(x, inp.plan, backend=b)))
    elif op == "unpermute":
        for b in backends:
            add(b, _fwd(lambda b=b: mk.unpermute(inp.y_sorted, inp.plan, inp.weights, backend=b)))
    elif op == "grouped_gemm":
        xs, offs = inp.x_sorted, inp.plan.expert_offsets
        for b in backends:
            add(b, _fwd(lambda b=b: mk.grouped_gemm(xs, w13, inp.plan, bias=b13, backend=b)))
        add("loop", _fwd(lambda: loop_gemm(xs, w13, offs, b13)))
        if gmm_why:
            add("grouped_mm", None, note=f"skipped: {gmm_why}")
        else:
            def gmm():
                y = F.grouped_mm(xs, w13.transpose(1, 2), offs=offs[1:])  # [P, I2]
                if b13 is None:
                    return y
                rows = torch.arange(xs.shape[0], device=device, dtype=offs.dtype)
                row_e = torch.searchsorted(offs[1:], rows, right=True).clamp(max=s.E - 1)  # [P]
                return y + b13.index_select(0, row_e)

            gap = "rows of dropped slots not zeroed" if s.capacity is not None else ""
            add("grouped_mm", _fwd(gmm), note=gap)
    elif op.startswith("fused_moe"):
        bwd = op.endswith("bwd")
        xl = x.detach().clone().requires_grad_(bwd)
        wl = inp.weights.detach().clone().requires_grad_(bwd)
        ids, cap = inp.ids, s.capacity
        grads = [t for t in (xl, wl, w13, w2, b13, b2) if t is not None] if bwd else ()
        wrap = (lambda f: _fwd_bwd(f, inp.grad_out)) if bwd else _fwd
        for b in backends:
            add(b, wrap(lambda b=b: mk.fused_moe(xl, w13, w2, wl, ids, activation=kind, gated=gated, w13_bias=b13,
                                                 w2_bias=b2, capacity=cap, backend=b)), grads)
        add("loop", wrap(lambda: loop_moe(xl, w13, w2, wl, ids, kind, gated, b13, b2)), grads, no_cap)
        if gmm_why:
            add("grouped_mm", None, note=f"skipped: {gmm_why}")
        else:
            add("grouped_mm", wrap(lambda: grouped_mm_moe(xl, w13, w2, wl, ids, kind, gated, b13, b2)), grads, no_cap)
    elif op.startswith("MoE"):
        bwd = op.endswith("bwd")
        xl = x.detach().clone().requires_grad_(bwd)
        grads = [xl, *m.parameters()] if bwd else ()
        wrap = (lambda f: _fwd_bwd(f, inp.grad_out)) if bwd else _fwd

        def layer(b):
            m.backend = b
            return m(xl)

        for b in backends:
            add(b, wrap(lambda b=b: layer(b)), grads)
        add("loop", wrap(lambda: loop_layer(m, xl)), grads, no_cap)
        if gmm_why:
            add("grouped_mm", None, note=f"skipped: {gmm_why}")
        else:
            add("grouped_mm", wrap(lambda: loop_layer(m, xl, grouped_mm_moe)), grads, no_cap)
    else:
        raise ValueError(f"unknown op {op!r}")
    return cases


# ----- the suite -------------------------------------------------------------------------------------


def run_main(shapes: list[Shape], device: str, quick: bool) -> tuple[list[dict], dict]:
    """Measure every op of every shape; returns the rows and run facts for the metadata."""
    backends = available_backends()
    ceilings = measure_ceilings(device)
    rows: list[dict] = []
    progress = Progress(len(shapes) * len(OPS), "bench main")
    try:
        for s in shapes:
            inp = Inputs(s, device)
            for op in OPS:
                group, ref_out = [], None
                for case in _cases(inp, op, backends, device):
                    compare = ref_out if case.backend != "torch" and not case.note else None
                    row, out = run_case(case, device, quick, ceilings, compare)
                    if case.backend == "torch":
                        ref_out = out
                    group.append(row)
                fill_ratios(group)
                rows += group
                progress.update(f"{s.model} {op}")
            del inp, ref_out
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    facts = {
        "quick": quick, "backends": backends, "ceilings": ceilings,
        "backend_status": {n: i.reason for n, i in mk.backends().items()},
        "shapes": [{"model": s.model, "label": s.label, "cpu_scale": s.scale} for s in shapes],
    }
    return rows, facts
