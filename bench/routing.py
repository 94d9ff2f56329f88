"""The ``routing`` suite: ``topk_gating`` (plain, with fused statistics, forward+backward) and
``expert_choice_gating`` on router logits of four models, every backend beside the torch reference
and the same computation written here as a plain PyTorch chain, eager (``chain``) and under
``torch.compile`` (``chain_compiled``).

Every row's top-k ids are compared with the reference's: ``err_vs_ref`` is the fraction of ids that
differ (0 when identical), and the note also gives the relative error of the float outputs (weights,
score sums, logits gradient) when it is large. ``launches`` (T <= 128): the row's time over the
time of an empty launch measured once per run, i.e. how far a small batch is from launch-bound.
"""

from __future__ import annotations

import math
import time

import torch

import moe_kernels as mk

from . import costs
from .harness import Case, Progress, fill_ratios, flat_tensors, measure_ceilings, output_error, run_case, sig, time_fn
from .shapes import Shape, pick_models
from .suites import available_backends

ROUTING_MODELS = ("deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b", "kimi-k2")
TOKENS = {("cpu", False): (1, 16, 128, 1024, 4096), ("cpu", True): (1, 128, 1024),
          ("cuda", False): (1, 16, 128, 1024, 16384, 65536), ("cuda", True): (1, 128, 16384)}
OPS = ("topk_gating", "topk_gating+stats", "topk_gating.fwd+bwd", "expert_choice_gating")
BF16_OPS = ("topk_gating",)  # bf16 logits (GPU only): forward rows only
EC_BACKENDS = ("torch", "triton")  # backends with an expert_choice_gating implementation
LAUNCH_MAX_T = 128  # rows up to this many tokens get the ``launches`` column
TOL = 1e-4  # relative error of the float outputs (all fp32) above which the note says so
RATIOS = {"vs_ref": "torch", "vs_chain": "chain", "vs_compiled": "chain_compiled"}
TABLE = {"ratios": RATIOS, "extra": (("launches", "launches", ".3g", "x"),), "err_note": None}

try:
    import triton

    @triton.jit
    def _empty_kernel(ptr):
        pass
except Exception:  # pragma: no cover - triton missing or broken
    _empty_kernel = None


class GateShape(Shape):
    """A :class:`Shape` whose label leaves out H and I (gating sees only the logits [T, E])."""

    @property
    def label(self) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype).replace("torch.", ""))
        return f"{self.model} T{self.T} E{self.E} k{self.k} {dt}"


def gating_kwargs(cfg: dict) -> dict:
    """The routing options of a models.json entry, as keyword arguments of ``topk_gating``."""
    return dict(scoring=cfg.get("scoring", "softmax"), renormalize=bool(cfg.get("renormalize", True)),
                num_groups=int(cfg.get("num_groups", 1)), topk_groups=int(cfg.get("topk_groups", 1)),
                scaling_factor=float(cfg.get("scaling_factor", 1.0)))


def select_routing(models: list[str] | None, device: str, quick: bool,
                   tokens: list[int] | None) -> tuple[list[GateShape], str, list[str]]:
    """The shapes of one run, the source of the configs and run notes; unknown model names raise ValueError."""
    table, source, names, notes = pick_models(models, ROUTING_MODELS)
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" and not quick else (torch.float32,)
    shapes = [GateShape(n, T, int(table[n].get("hidden", 0)), int(table[n].get("intermediate", 0)),
                        int(table[n]["experts"]), int(table[n]["top_k"]), dt, cfg=dict(table[n]))
              for n in names for T in (tokens or TOKENS[(device, quick)]) for dt in dtypes]
    return shapes, source, notes


# ----- the baseline chain ----------------------------------------------------------------------------


def chain(logits, bias, top_k: int, *, scoring: str, renormalize: bool, num_groups: int, topk_groups: int,
          scaling_factor: float, stats: bool = False):
    """Top-k gating as plain PyTorch ops: ``(weights [T, k] fp32, ids [T, k] int32)`` (+ counts, score sums)."""
    s = torch.softmax(logits.float(), -1) if scoring == "softmax" else torch.sigmoid(logits.float())  # [T, E]
    sel = s if bias is None else s + bias
    T, E = s.shape
    if num_groups > 1:
        g = sel.view(T, num_groups, E // num_groups)
        gs = g.topk(2, -1).values.sum(-1) if bias is not None and E // num_groups >= 2 else g.amax(-1)  # [T, G]
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(topk_groups, -1, sorted=False).indices, True)
        sel = g.masked_fill(~keep[..., None], float("-inf")).view(T, E)
    ids = sel.topk(top_k, -1).indices  # [T, k], best first
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    w, ids = w * scaling_factor, ids.to(torch.int32)
    if not stats:
        return w, ids
    flat = ids.view(-1).long()
    counts = torch.zeros(E, dtype=torch.int64, device=s.device).scatter_add_(0, flat, torch.ones_like(flat))
    p = s if scoring == "softmax" else s / (s.sum(-1, keepdim=True) + 1e-20)
    return w, ids, counts, p.sum(0)


class Compiler:
    """``torch.compile(chain, dynamic=False)`` per shape, compile time excluded; remembers a failure."""

    def __init__(self, device: str):
        self.device, self.failed = device, None

    def __call__(self, inp: "Inputs"):
        """``(fn, note)``: ``fn`` is None when compiling failed, ``note`` says why (or the compile time)."""
        if self.failed:
            return None, self.failed
        torch._dynamo.reset()  # fresh cache per shape: dynamic=False recompiles would hit the recompile limit
        fn = torch.compile(chain, dynamic=False)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                fn(inp.logits, inp.bias, inp.s.k, **inp.kw)
            if self.device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            self.failed = f"skipped: torch.compile failed here ({type(exc).__name__}: {msg})"
            return None, self.failed
        return fn, f"compiled in {time.perf_counter() - t0:.1f} s"


# ----- inputs, cases, comparison ---------------------------------------------------------------------


class Inputs:
    """Logits [T, E] (the router's output), correction bias [E], grad of the weights [T, k]."""

    def __init__(self, s: GateShape, device: str):
        torch.manual_seed(0)
        self.s, self.kw = s, gating_kwargs(s.cfg)
        self.logits = torch.randn(s.T, s.E, device=device).to(s.dtype)
        self.bias = torch.empty(s.E, device=device).uniform_(-0.05, 0.05) if s.cfg.get("correction_bias") else None
        self.grad_w = torch.randn(s.T, s.k, device=device)
        self.leaf = self.logits.detach().clone().requires_grad_()
        x = self.logits.float()
        s_ = torch.softmax(x, -1) if self.kw["scoring"] == "softmax" else torch.sigmoid(x)
        self.sel = s_ if self.bias is None else s_ + self.bias  # [T, E] selection scores, to spot exact ties


def _fwd(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _cases(inp: Inputs, op: str, backends: list[str], compiled) -> list[Case]:
    """Backend rows (the torch reference first) then baseline rows of one op on one shape."""
    s, x, bias, kw, es = inp.s, inp.logits, inp.bias, inp.kw, inp.s.dtype.itemsize
    cases: list[Case] = []

    def add(backend, fn, nbytes, grads=(), note=""):
        cases.append(Case(op, s, backend, fn, 0, nbytes, grads, note))

    if op == "topk_gating":
        nbytes = costs.gating_bytes(s, es)
        for b in backends:
            add(b, _fwd(lambda b=b: mk.topk_gating(x, s.k, correction_bias=bias, backend=b, **kw)), nbytes)
        add("chain", _fwd(lambda: chain(x, bias, s.k, **kw)), nbytes)
        if compiled is not None:
            fn, note = compiled
            add("chain_compiled", fn and _fwd(lambda: fn(x, bias, s.k, **kw)), nbytes, note=note)
    elif op == "topk_gating+stats":
        nbytes = costs.gating_bytes(s, es, stats=True)
        for b in backends:
            add(b, _fwd(lambda b=b: mk.topk_gating(x, s.k, correction_bias=bias, return_stats=True, backend=b, **kw)),
                nbytes)
        add("chain", _fwd(lambda: chain(x, bias, s.k, stats=True, **kw)), nbytes)
    elif op == "topk_gating.fwd+bwd":
        leaf, nbytes = inp.leaf, costs.gating_bytes(s, es, bwd=True)

        def fwd_bwd(gate):
            w, ids = gate()
            w.backward(inp.grad_w)
            return ids, leaf.grad

        for b in backends:
            add(b, lambda b=b: fwd_bwd(lambda: mk.topk_gating(leaf, s.k, correction_bias=bias, backend=b, **kw)),
                nbytes, [leaf])
        add("chain", lambda: fwd_bwd(lambda: chain(leaf, bias, s.k, **kw)), nbytes, [leaf])
    elif op == "expert_choice_gating":
        cap = max(1, math.ceil(s.T * s.k / s.E))
        nbytes = costs.expert_choice_bytes(s, cap)
        for b in (b for b in backends if b in EC_BACKENDS):
            add(b, _fwd(lambda b=b: mk.expert_choice_gating(x, cap, scoring=kw["scoring"], backend=b)), nbytes,
                note=f"capacity {cap}" if b == "torch" else "")
    else:
        raise ValueError(f"unknown op {op!r}")
    return cases


def compare(row: dict, out, ref, sel: torch.Tensor | None = None) -> None:
    """Ids mismatch fraction into ``err_vs_ref``; the note says how many ids differ (and whether only at
    exact ties of the selection scores ``sel`` [T, E]) or how far the float outputs are."""
    a, b = flat_tensors(out), flat_tensors(ref)
    ia = next((t for t in a if not t.is_floating_point()), None)
    ib = next((t for t in b if not t.is_floating_point()), None)
    if ia is None or ib is None:
        return
    mismatch = (ia.long() != ib.long()).double().mean().item() if ia.shape == ib.shape else 1.0
    row["err_vs_ref"] = sig(mismatch)
    err = output_error([t for t in a if t is not ia], [t for t in b if t is not ib])
    if mismatch:
        more = f"ids differ from ref: {100 * mismatch:.3g}% of entries"
        if sel is not None and ia.shape == ib.shape:
            d = ia != ib
            if torch.equal(sel.gather(1, ia.long())[d], sel.gather(1, ib.long())[d]):
                more += " (only at exact score ties)"
    elif err is not None and err > TOL:
        more = f"rel err vs ref {err:.1e}"
    else:
        return
    row["note"] = f"{row['note']}; {more}" if row["note"] else more


# ----- the suite -------------------------------------------------------------------------------------


def measure_launch(device: str) -> dict:
    """Time of the cheapest launch: an empty Triton kernel on GPU (else a one-element add_), a no-op torch op on CPU."""
    x = torch.zeros(1, device=device)
    fn, what = (lambda: x.add_(1)), "torch add_ on one element"
    if device == "cuda" and _empty_kernel is not None:
        try:
            _empty_kernel[(1,)](x)
            fn, what = (lambda: _empty_kernel[(1,)](x)), "empty triton kernel"
        except Exception:
            pass
    fn()
    return {"ms": sig(time_fn(fn, device, False)[0]), "op": what}


def run_routing(shapes: list[GateShape], device: str, quick: bool, notes: list[str]) -> tuple[list[dict], dict]:
    """Measure every op of every shape; returns the rows and run facts for the metadata."""
    backends = available_backends()
    status = mk.backends()
    notes = notes + [f"{n} backend not run: {i.reason}" for n, i in status.items() if not i.available]
    if device == "cpu" and "triton" in backends:
        notes.append("triton rows run the Triton interpreter (TRITON_INTERPRET=1): a correctness check, not a speed path")
    ceilings = measure_ceilings(device)
    launch = measure_launch(device)
    notes.append(f"empty launch {launch['ms'] * 1e3:.3g} us ({launch['op']}); launches = row time / that (T <= "
                 f"{LAUNCH_MAX_T}); err_vs_ref = fraction of ids differing from backend=torch")
    compile_at = None  # every shape
    if device == "cpu" and quick:  # a CPU compile takes seconds: only the largest T of each model
        compile_at = {(s.model, s.dtype): max(t.T for t in shapes if t.model == s.model) for s in shapes}
        notes.append("--quick on CPU: chain_compiled only at the largest T of each model")
    compiler = Compiler(device)
    rows: list[dict] = []
    groups = [(s, op) for s in shapes for op in (OPS if s.dtype == torch.float32 else BF16_OPS)]
    progress = Progress(len(groups), "bench routing")
    try:
        inp = None
        for s, op in groups:
            if inp is None or inp.s is not s:
                inp = Inputs(s, device)
                compiled = compiler(inp) if compile_at is None or compile_at[(s.model, s.dtype)] == s.T else None
            group, ref = [], None
            for case in _cases(inp, op, backends, compiled):
                row, out = run_case(case, device, quick, ceilings, None, RATIOS)
                if case.backend == "torch":
                    ref = out
                elif out is not None and ref is not None:
                    compare(row, out, ref, None if op == "expert_choice_gating" else inp.sel)
                small = s.T <= LAUNCH_MAX_T and row["median_ms"]
                row["launches"] = sig(row["median_ms"] / launch["ms"], 4) if small else None
                group.append(row)
            fill_ratios(group, RATIOS)
            rows += group
            progress.update(f"{s.model} T{s.T} {op}")
    finally:
        progress.close()
        torch._dynamo.reset()
    if compiler.failed:
        notes.append(f"chain_compiled {compiler.failed}")
    facts = {
        "quick": quick, "backends": backends, "ceilings": ceilings, "launch": launch, "notes": notes,
        "backend_status": {n: i.reason for n, i in status.items()},
        "shapes": [{"model": s.model, "label": s.label, **gating_kwargs(s.cfg),
                    "correction_bias": bool(s.cfg.get("correction_bias"))} for s in shapes],
    }
    return rows, facts
