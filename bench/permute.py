"""The ``permute`` suite (issue 4): ``plan_routing``, ``permute`` and ``unpermute`` (weighted), forward and
forward+backward, every backend beside the torch reference and the same work as a plain PyTorch chain
(argsort + index_select + index_add), eager (``chain``) and under ``torch.compile`` (``chain_compiled``,
compile time excluded and given in the note).

Grid: T in {1, 64, 1024, 16384, 65536}, H in {2048, 4096, 7168}, k in {2, 8}, bf16 (GPU); CPU: T in
{1, 64, 1024}, H / 16, fp32. E = 256 experts for k = 8 (DeepSeek-V3-like), E = 8 for k = 2 (Mixtral-like);
top-k ids are k distinct uniformly random experts per token, block_size 1, no capacity. ``plan_routing``
sees only the ids [T, k]: its rows are per (T, k), not per H.

Bytes are the rows each op must read and write (S = T*k rows of H elements, plus the int32 indices and
fp32 weights): ``permute`` reads S rows (a gather) and writes S; its backward (an unweighted unpermute)
reads S, writes T; ``unpermute`` reads S, writes T; its backward reads the output gradient once per slot
(S rows) and ``y_sorted`` (S) for the weight gradients, and writes S rows. ``frac_ceiling`` is then the
fraction of the measured copy bandwidth. ``plan_routing`` rows give microseconds (``us``).

Goals on an H200 (the ``goal`` column, GPU only): ``plan_routing`` at T=65536, k=8, E=256 under 20 us;
``permute`` and ``unpermute`` forward at >= 85% of the measured copy bandwidth at T >= 16384.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import moe_kernels as mk

from . import costs
from .common import Compiler, add_note, goal, interpreted, measure, suite_backends
from .harness import Case, Progress, fill_ratios, measure_ceilings, sig
from .shapes import Shape

TOKENS = {("cuda", False): (1, 64, 1024, 16384, 65536), ("cuda", True): (1, 16384, 65536),
          ("cpu", False): (1, 64, 1024), ("cpu", True): (1, 1024)}
HIDDEN = {("cuda", False): (2048, 4096, 7168), ("cuda", True): (7168,),
          ("cpu", False): (128, 256, 448), ("cpu", True): (256,)}  # CPU: the GPU sizes / 16
TOPK = (2, 8)
EXPERTS = {2: 8, 8: 256}  # k -> E
OPS = ("permute", "permute.fwd+bwd", "unpermute", "unpermute.fwd+bwd")
PLAN_GOAL = dict(T=65536, k=8, E=256, max_us=20.0)
COPY_GOAL = dict(min_T=16384, frac=0.85)
INTERP_MAX_T = 64  # triton rows in the interpreter: only up to this many tokens
RATIOS = {"vs_ref": "torch", "vs_chain": "chain", "vs_compiled": "chain_compiled"}
TABLE = {"ratios": RATIOS, "extra": (("err", "err_vs_ref", ".1e", ""), ("us", "us", ".4g", ""), ("goal", "goal", "s", ""))}


@dataclass(frozen=True)
class PermShape(Shape):
    """T tokens of H elements routed to k of E experts (H = 0: the plan alone)."""

    @property
    def label(self) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype).replace("torch.", ""))
        return f"T{self.T} E{self.E} k{self.k}" if not self.H else f"T{self.T} H{self.H} E{self.E} k{self.k} {dt}"


def select_permute(device: str, quick: bool, tokens: list[int] | None = None, hidden: list[int] | None = None,
                   topk: list[int] | None = None) -> tuple[list[PermShape], str, list[str]]:
    """The shapes of one run (plan shapes have H = 0), their source and run notes."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    Ts, Hs, ks = tokens or TOKENS[(device, quick)], hidden or HIDDEN[(device, quick)], topk or TOPK
    bad = [k for k in ks if k not in EXPERTS]
    if bad:
        raise ValueError(f"--topk must be among {sorted(EXPERTS)}, got {bad}")
    shapes = []
    for k, T in itertools.product(ks, Ts):
        shapes.append(PermShape(f"k{k}-E{EXPERTS[k]}", T, 0, 0, EXPERTS[k], k, dtype))
        shapes += [PermShape(f"k{k}-E{EXPERTS[k]}", T, H, 0, EXPERTS[k], k, dtype) for H in Hs]
    notes = [f"E = {EXPERTS[2]} for k = 2, E = {EXPERTS[8]} for k = 8; random distinct top-k ids; block_size 1"]
    if device == "cpu":
        notes.append("CPU: H = the GPU sizes / 16, fp32")
    return shapes, "issue 4 grid", notes


# ----- the baseline chain ----------------------------------------------------------------------------


def chain_plan(ids: torch.Tensor, num_experts: int):
    """The plan as plain PyTorch: ``(sorted_slots, expert_offsets, tokens_per_expert, slot_to_row)``, int32."""
    flat = ids.reshape(-1).long()
    order = flat.argsort(stable=True)  # [S] slots grouped by expert, by slot index within one
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    slot_to_row = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=ids.device))
    return order.int(), offsets.int(), counts.int(), slot_to_row.int()


def chain_permute(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    return x.index_select(0, order.long() // k)  # [S, H]


def chain_unpermute(y: torch.Tensor, order: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    T, k = w.shape
    order = order.long()
    rows = y.float() * w.reshape(-1).float().index_select(0, order)[:, None]  # [S, H] weighted
    return y.new_zeros(T, y.shape[1], dtype=torch.float32).index_add(0, order // k, rows).to(y.dtype)


# ----- costs -----------------------------------------------------------------------------------------


def nbytes(s: PermShape, op: str) -> int:
    """Bytes of the rows read and written (see the module docstring), indices and weights included."""
    S, es, I32, F32 = s.T * s.k, s.dtype.itemsize, 4, 4
    row, tok = S * s.H * es, s.T * s.H * es
    return {
        "permute": 2 * row + S * I32,
        "permute.fwd+bwd": 2 * row + S * I32 + row + tok + S * I32,
        "unpermute": row + tok + S * (I32 + F32),
        "unpermute.fwd+bwd": row + tok + S * (I32 + F32) + 3 * row + S * (I32 + 2 * F32),
    }[op]


# ----- inputs and cases ------------------------------------------------------------------------------


class Inputs:
    """Ids [T, k] (k distinct experts per token), weights [T, k], x [T, H], the plan, y_sorted [S, H]
    and the gradients, with leaves for the backward rows."""

    def __init__(self, s: PermShape, device: str):
        torch.manual_seed(0)
        self.s = s
        self.ids = torch.rand(s.T, s.E, device=device).topk(s.k, dim=1).indices.to(torch.int32)
        self.w = torch.rand(s.T, s.k, device=device)
        self.plan = mk.plan_routing(self.ids, s.E, backend="torch")
        self.order = self.plan.sorted_slots  # equals chain_plan's order
        if s.H:
            self.x = torch.randn(s.T, s.H, device=device).to(s.dtype)
            self.y = torch.randn(s.T * s.k, s.H, device=device).to(s.dtype)
            self.g_sorted = torch.randn_like(self.y)  # grad of permute's output [S, H]
            self.g_tok = torch.randn_like(self.x)  # grad of unpermute's output [T, H]
            self.x_leaf = self.x.detach().clone().requires_grad_()
            self.y_leaf = self.y.detach().clone().requires_grad_()
            self.w_leaf = self.w.detach().clone().requires_grad_()


def _fwd(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _cases(inp: Inputs, op: str, backends: list[str], device: str, compiler: Compiler | None) -> list[Case]:
    """Backend rows (the torch reference first), then ``chain`` and ``chain_compiled``."""
    s, cases, leaves, grad_out = inp.s, [], [], None
    flops = 0
    b_ = costs.plan_routing(s)[1] if op == "plan_routing" else nbytes(s, op)

    def add(backend, fn, grads=(), note=""):
        if interpreted(backend, device) and s.T > INTERP_MAX_T:
            fn, note = None, f"skipped: interpreter rows at T <= {INTERP_MAX_T} only"
        cases.append(Case(op, s, backend, fn, flops, b_, grads, note))

    if op == "plan_routing":
        ours = lambda b: _fwd(lambda: mk.plan_routing(inp.ids, s.E, backend=b))  # noqa: E731
        chain, args = chain_plan, (inp.ids, s.E)
    elif op == "permute":
        ours = lambda b: _fwd(lambda: mk.permute(inp.x, inp.plan, backend=b))  # noqa: E731
        chain, args = chain_permute, (inp.x, inp.order, s.k)
    elif op == "unpermute":
        ours = lambda b: _fwd(lambda: mk.unpermute(inp.y, inp.plan, inp.w, backend=b))  # noqa: E731
        chain, args = chain_unpermute, (inp.y, inp.order, inp.w)
    elif op == "permute.fwd+bwd":
        leaves = [inp.x_leaf]

        def ours(b):
            def run():
                mk.permute(inp.x_leaf, inp.plan, backend=b).backward(inp.g_sorted)
                return inp.x_leaf.grad
            return run

        chain, args, grad_out = chain_permute, (inp.x_leaf, inp.order, s.k), inp.g_sorted
    elif op == "unpermute.fwd+bwd":
        leaves = [inp.y_leaf, inp.w_leaf]

        def ours(b):
            def run():
                mk.unpermute(inp.y_leaf, inp.plan, inp.w_leaf, backend=b).backward(inp.g_tok)
                return [inp.y_leaf.grad, inp.w_leaf.grad]
            return run

        chain, args, grad_out = chain_unpermute, (inp.y_leaf, inp.order, inp.w_leaf), inp.g_tok
    else:
        raise ValueError(f"unknown op {op!r}")
    bwd = op.endswith("bwd")
    grads = leaves

    def wrap(f):
        if not bwd:
            return _fwd(lambda: f(*args))

        def run():
            f(*args).backward(grad_out)
            return [t.grad for t in leaves] if len(leaves) > 1 else leaves[0].grad
        return run

    for b in backends:
        add(b, ours(b), grads)
    add("chain", wrap(chain), grads)
    if compiler is not None:
        def warm_up(c):
            wrap(c)()
            for t in grads:
                t.grad = None

        fn, note = compiler(chain, warm_up)
        add("chain_compiled", fn and wrap(fn), grads, note)
    return cases


# ----- the suite -------------------------------------------------------------------------------------


def _goal(row: dict, device: str) -> str | None:
    if device != "cuda" or row["kind"] != "kernel" or not row["median_ms"]:
        return None
    if row["op"] == "plan_routing":
        g = PLAN_GOAL
        if (row["T"], row["k"], row["E"]) == (g["T"], g["k"], g["E"]):
            return goal(row["us"] < g["max_us"], f"{row['us']:.3g} us vs < {g['max_us']:.0f} us")
    elif row["op"] in ("permute", "unpermute") and row["T"] >= COPY_GOAL["min_T"]:
        frac = row["frac_ceiling"]
        return goal(frac >= COPY_GOAL["frac"], f"{100 * frac:.0f}% of copy vs >= {100 * COPY_GOAL['frac']:.0f}%")
    return None


def run_permute(shapes: list[PermShape], device: str, quick: bool, notes: list[str]) -> tuple[list[dict], dict]:
    """Measure the plan on every (T, k) and the four permute ops on every (T, H, k); ``(rows, facts)``."""
    backends, more = suite_backends("permute", device)
    notes = notes + more
    ceilings = measure_ceilings(device)
    compile_at = None  # every shape
    if device == "cpu" and quick:  # a CPU compile takes seconds: only the largest T, forward rows
        compile_at = max(s.T for s in shapes)
        notes.append("--quick on CPU: chain_compiled only at the largest T, forward rows only")
    compiler = Compiler(device)
    groups = [(s, op) for s in shapes for op in (("plan_routing",) if not s.H else OPS)]
    rows: list[dict] = []
    progress = Progress(len(groups), "bench permute")
    try:
        inp = None
        for s, op in groups:
            if inp is None or inp.s is not s:
                del inp
                compiler.reset()
                if device == "cuda":
                    torch.cuda.empty_cache()
                inp = Inputs(s, device)
            use_compile = compile_at is None or (s.T == compile_at and not op.endswith("bwd"))
            group, ref = [], None
            for case in _cases(inp, op, backends, device, compiler if use_compile else None):
                row, out = measure(case, device, quick, ceilings, ref if case.backend != "torch" else None, RATIOS)
                if case.backend == "torch":
                    ref = out
                row["us"] = sig(1e3 * row["median_ms"], 4) if op == "plan_routing" and row["median_ms"] else None
                row["goal"] = _goal(row, device)
                if op == "plan_routing" and row["err_vs_ref"]:
                    add_note(row, "plan differs from the reference")
                group.append(row)
            fill_ratios(group, RATIOS)
            rows += group
            progress.update(f"{s.label} {op}")
    finally:
        progress.close()
        torch._dynamo.reset()
    if compiler.failed:
        notes.append(f"chain_compiled {compiler.failed}")
    if device != "cuda":
        notes.append("goals (plan < 20 us at T=65536 k=8 E=256; permute/unpermute >= 85% of copy at T >= 16384) "
                     "are checked on the GPU only")
    notes.append("bytes = rows read + written (see bench/permute.py); ceiling = fraction of the copy bandwidth; "
                 "err_vs_ref: relative error against backend=torch (plan rows: 0 when identical)")
    facts = {
        "quick": quick, "backends": backends, "ceilings": ceilings, "notes": notes, "experts": EXPERTS,
        "goals": {"plan_routing": PLAN_GOAL, "copy": COPY_GOAL},
        "backend_status": {n: i.reason for n, i in mk.backends().items()},
        "shapes": [{"label": s.label, "T": s.T, "H": s.H, "E": s.E, "k": s.k} for s in shapes],
    }
    return rows, facts
