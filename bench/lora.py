"""The ``lora`` suite: ``lora_moe`` (a frozen linear layer plus k of E LoRA adapters per token) on
Llama-like projections, forward and forward+backward, every backend beside two baselines:

- ``loop``: the plain PyTorch per-expert implementation (gather each expert's tokens, two matmuls,
  weighted ``index_add``; a host synchronisation per expert);
- ``base``: the frozen base layer alone, ``x @ W0.T + b0`` (and its input gradient in backward).

``over_base`` is the time a row adds to the base layer's (``row / base - 1``): the cost of the
adapters. Goal on an H200 (issue 8): at most 15% at T=8192, r=16, E=8, k=2. Backward rows train the
adapters, the router weights and the input (gradients of x, A, B and the routing weights); the base
weight is frozen. ``err_vs_ref``: relative error of the output (forward) or of the gradients
(backward) against backend ``torch``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moe_kernels as mk

from .harness import Case, Progress, fill_ratios, measure_ceilings, run_case, sig
from .shapes import Shape
from .suites import available_backends

# Llama-like projections (K -> N): attention (4096 -> 4096) and the MLP up projection (4096 -> 14336).
PROJECTIONS = {"attn-4096x4096": (4096, 4096), "mlp-4096x14336": (4096, 14336)}
GRID = {"E": (4, 8, 16), "r": (8, 16, 64), "k": (1, 2)}
QUICK_GRID = {"E": (8,), "r": (16,), "k": (2,)}
TOKENS = {("cuda", False): (16, 1024, 8192), ("cuda", True): (16, 1024, 8192),
          ("cpu", False): (16, 256), ("cpu", True): (16, 128)}
CPU_SCALE = 16  # K and N divided by this on CPU (fp32)
GOAL = dict(T=8192, r=16, E=8, k=2, max_over_base=0.15)
OPS = ("lora_moe", "lora_moe.fwd+bwd")
SCALING = 2.0
RATIOS = {"vs_ref": "torch", "vs_loop": "loop"}
TABLE = {"ratios": RATIOS, "extra": (("over base", "over_base", ".1f", "%"),)}


@dataclass(frozen=True)
class LoraShape(Shape):
    """A projection K -> N (stored as H=K, I=N) with E adapters of rank ``rank``, k per token."""

    rank: int = 0

    @property
    def label(self) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype).replace("torch.", ""))
        return f"{self.model} T{self.T} K{self.H} N{self.I} E{self.E} r{self.rank} k{self.k} {dt}"


def select_lora(device: str, quick: bool, tokens: list[int] | None = None) -> tuple[list[LoraShape], str, list[str]]:
    """The shapes of one run (the issue's grid; fewer with ``quick``; K and N scaled down on CPU), their
    source and run notes."""
    grid = QUICK_GRID if quick else GRID
    scale, dtype = (1, torch.bfloat16) if device == "cuda" else (CPU_SCALE, torch.float32)
    shapes = [
        LoraShape(name, T, K // scale, N // scale, E, k, dtype, scale=scale, rank=r)
        for name, (K, N) in PROJECTIONS.items()
        for E, r, k in itertools.product(grid["E"], grid["r"], grid["k"])
        for T in (tokens or TOKENS[(device, quick)])
    ]
    notes = [] if scale == 1 else [f"CPU: K and N divided by {scale}, fp32"]
    return shapes, "issue 8 grid (Llama-like projections)", notes


# ----- the baseline ----------------------------------------------------------------------------------


def loop_lora(x, w0, b0, a, b, weights, ids, scaling):
    """Plain per-expert PyTorch: the base layer, then for each expert its tokens' ``(x A^T) B^T``, weighted, index_add."""
    y = F.linear(x, w0, b0)
    for e in range(a.shape[0]):
        tok, slot = torch.where(ids == e)  # host synchronisation
        if tok.numel() == 0:
            continue
        h = x[tok] @ a[e].T  # [n_e, r]
        y = y.index_add(0, tok, (h @ b[e].T) * (scaling * weights[tok, slot, None]).to(x.dtype))
    return y


# ----- costs -----------------------------------------------------------------------------------------


def costs(s: LoraShape, op: str, backend: str) -> tuple[int, int]:
    """(FLOPs, bytes): matmuls only; bytes of an ideal kernel (inputs read once, outputs written once).

    Forward: base ``2TKN``, adapters ``2Sr(K + N)`` (S = T*k slots). Backward (the base weight is frozen,
    no dW0): base dX ``2TKN``; adapters ``2Sr(3K + 2N)`` (shrink recomputed, g @ B, dX, dA, dB).
    The ``base`` baseline counts the base layer only.
    """
    es, T, K, N, S, r, E = s.dtype.itemsize, s.T, s.H, s.I, s.T * s.k, s.rank, s.E
    flops = 2 * T * K * N
    nbytes = es * (T * K + N * K + N + T * N)  # x, W0, b0 in; y out
    bwd = op.endswith("fwd+bwd")
    if bwd:
        flops += 2 * T * K * N
        nbytes += es * (T * N + N * K + T * K)  # g, W0 in; dx out
    if backend != "base":
        flops += 2 * S * r * (K + N) + (2 * S * r * (3 * K + 2 * N) if bwd else 0)
        routing = S * (4 + 4)  # ids (int32) and weights (fp32)
        nbytes += es * E * r * (K + N) + routing  # A, B and the routing in
        if bwd:
            nbytes += es * T * K + 2 * es * E * r * (K + N) + routing + 4 * S  # x, A, B again; dA, dB, dw out
    return flops, nbytes


# ----- inputs and cases ------------------------------------------------------------------------------


class Inputs:
    """x [T, K], frozen W0 [N, K] and b0 [N], A [E, r, K], B [E, N, r], routing of T tokens, grad of y."""

    def __init__(self, s: LoraShape, device: str):
        torch.manual_seed(0)
        K, N, E, r = s.H, s.I, s.E, s.rank
        self.s = s
        self.x = torch.randn(s.T, K, device=device).to(s.dtype)
        self.w0 = (torch.randn(N, K, device=device) / K**0.5).to(s.dtype)
        self.b0 = torch.randn(N, device=device).to(s.dtype)
        self.a = (torch.randn(E, r, K, device=device) / K**0.5).to(s.dtype)
        self.b = (torch.randn(E, N, r, device=device) / r**0.5).to(s.dtype)
        self.weights, self.ids = mk.topk_gating(torch.randn(s.T, E, device=device), s.k, backend="torch")
        self.grad = torch.randn(s.T, N, device=device).to(s.dtype)
        self.leaves = [t.detach().clone().requires_grad_() for t in (self.x, self.a, self.b, self.weights)]


def _cases(inp: Inputs, op: str, backends: list[str]) -> list[Case]:
    """Backend rows (the torch reference first), then the loop and base-layer baselines."""
    s, cases = inp.s, []

    def lora(be):
        return lambda x, a, b, w: mk.lora_moe(x, inp.w0, a, b, w, inp.ids, scaling=SCALING, base_bias=inp.b0, backend=be)

    def loop(x, a, b, w):
        return loop_lora(x, inp.w0, inp.b0, a, b, w, inp.ids, SCALING)

    def base(x, a, b, w):
        return F.linear(x, inp.w0, inp.b0)

    fns = [(be, lora(be)) for be in backends + ["auto"]] + [("loop", loop), ("base", base)]  # auto: dense when E*r is small
    for name, fn in fns:
        flops, nbytes = costs(s, op, name)
        if op == "lora_moe":
            def run(fn=fn):
                with torch.no_grad():
                    return fn(inp.x, inp.a, inp.b, inp.weights)

            cases.append(Case(op, s, name, run, flops, nbytes))
        else:
            leaves = inp.leaves if name != "base" else inp.leaves[:1]

            def run(fn=fn, leaves=leaves):
                fn(*inp.leaves).backward(inp.grad)
                return [t.grad for t in leaves]

            cases.append(Case(op, s, name, run, flops, nbytes, inp.leaves))
    return cases


def run_lora(shapes: list[LoraShape], device: str, quick: bool, notes: list[str]) -> tuple[list[dict], dict]:
    """Measure both ops on every shape; returns the rows and run facts for the metadata."""
    backends = [b for b in available_backends() if b in mk._backends._IMPLS.get("lora_moe", {})]
    status = mk.backends()
    notes = notes + [f"{n} backend not run: {i.reason}" for n, i in status.items() if not i.available]
    notes.append("over_base = row time / base-layer time - 1 (the adapters' cost); err_vs_ref vs backend=torch")
    ceilings = measure_ceilings(device)
    rows: list[dict] = []
    groups = [(s, op) for s in shapes for op in OPS]
    progress = Progress(len(groups), "bench lora")
    try:
        inp = None
        for s, op in groups:
            if inp is None or inp.s is not s:
                inp = Inputs(s, device)
            group, ref = [], None
            for case in _cases(inp, op, backends):
                row, out = run_case(case, device, quick, ceilings, ref if case.backend not in ("torch", "base") else None,
                                    RATIOS)
                ref = out if case.backend == "torch" else ref
                row.update(r=s.rank, kind="baseline" if case.backend in ("loop", "base") else "kernel")
                group.append(row)
            fill_ratios(group, RATIOS)
            base_ms = next((r["median_ms"] for r in group if r["backend"] == "base"), None)
            for r in group:
                r["over_base"] = sig(100 * (r["median_ms"] / base_ms - 1), 4) if r["median_ms"] and base_ms else None
            rows += group
            progress.update(f"{s.label} {op}")
    finally:
        progress.close()
    notes += goal_notes(rows)
    facts = {
        "quick": quick, "backends": backends, "ceilings": ceilings, "notes": notes, "scaling": SCALING,
        "backend_status": {n: i.reason for n, i in status.items()}, "goal": GOAL,
        "shapes": [{"label": s.label, "K": s.H, "N": s.I, "E": s.E, "r": s.rank, "k": s.k, "T": s.T} for s in shapes],
    }
    return rows, facts


def goal_notes(rows: list[dict]) -> list[str]:
    """The issue's goal, checked on the rows of its shape (T=8192, r=16, E=8, k=2) when they were run."""
    out = []
    for r in rows:
        if (r["T"], r["r"], r["E"], r["k"]) == (GOAL["T"], GOAL["r"], GOAL["E"], GOAL["k"]) and r["kind"] == "kernel" \
                and r["over_base"] is not None:
            ok = r["over_base"] <= 100 * GOAL["max_over_base"]
            out.append(f"goal {'met' if ok else 'MISSED'}: {r['backend']} {r['op']} {r['model']} adds {r['over_base']:.1f}% "
                       f"to the base layer (goal <= {100 * GOAL['max_over_base']:.0f}%)")
    return out
