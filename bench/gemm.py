"""The ``gemm`` suite (issue 5): the grouped expert GEMM of both layers of an MoE block, forward and backward
(dX and dW, each alone), every backend beside ``F.grouped_mm``, a per-expert loop of ``torch.matmul`` and the
torch reference.

Ops, with S = T*k rows grouped by expert (a :class:`RoutingPlan` of k distinct random experts per token):

- ``gate_up.fwd``: ``[S, H] x [E, 2I, H] -> [S, 2I]`` (``I`` when not gated); ``down.fwd``: ``[S, I] x [E, H, I] -> [S, H]``;
- ``*.dX``: the input gradient alone, ``*.dW``: the weight gradient alone, each through autograd
  (``torch.autograd.grad`` on a retained forward graph, so only the backward runs).

- ``*.fwd.<fmt>``: the forward with quantized weights (``bench/costs.py`` ``QUANT_FORMATS``): fp8 per tensor and
  128x128 blocks for every model; the weight-only int8 (per channel), int4 (groups of 128/64/32) and mxfp4 with
  bf16 activations for Mixtral and Qwen3-30B-A3B, mxfp4 for gpt-oss too.

Models: Mixtral-8x7B, DeepSeek-V3, Qwen3-30B-A3B, Qwen3-235B, gpt-oss-120b from models.json (no biases
here; gpt-oss's expert biases run in the ``moe`` suite). Tokens 1, 8, 16, 64, 512, 4096, 16384 in bf16 on GPU;
on CPU H and I are scaled down hard (about 2M expert parameters per model), fp32, tokens 1 and 64.

Columns: FLOPs ``2 S N K`` for every op; bytes: rows in and out plus the weights of the experts that have
rows (dW: the whole ``[E, N, K]`` gradient written). ``dense %``: TFLOP/s over the measured dense matmul
rate. ``w MB``: the weight bytes that must be read (experts with rows, packed formats with their scales; dW: the
gradient written). For decode (T <= 64): ``w GB/s``, those bytes over the time, and ``w copy %``, that against
the measured copy bandwidth. ``H200 ms``: the op's roofline time at the model's real size at the documented
H200 ceilings (a model, printed on CPU runs too).
Goals on an H200, bf16 (``goal`` column, GPU, non-reference backends): prefill (T >= 4096) forward
>= 75% of dense and >= 1.0x grouped_mm; decode (T <= 64) forward >= 80% of copy on the weight bytes;
dX and dW at T >= 4096 >= 65% of dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import moe_kernels as mk

from . import costs as _costs
from .common import (CPU_QUANT_NOTE, H200_NOTE, QUANT_NOTE, fill_vs_bf16, full_shape, goal, interpreted, measure,
                     per_shape, select_suite, suite_backends, suite_facts)
from .harness import MAIN_RATIOS, Case, Progress, fill_ratios, measure_ceilings, sig
from .shapes import Shape
from .suites import grouped_mm_reason

GEMM_MODELS = ("mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-120b")
QUICK_MODELS = ("mixtral-8x7b", "deepseek-v3", "gpt-oss-120b")
TOKENS = {("cuda", False): (1, 8, 16, 64, 512, 4096, 16384), ("cuda", True): (1, 64, 4096),
          ("cpu", False): (1, 64), ("cpu", True): (1, 64)}
LAYERS = ("gate_up", "down")
PASSES = ("fwd", "dX", "dW")
DENSE_OPS = tuple(f"{layer}.{p}" for layer in LAYERS for p in PASSES)


def ops_for(model: str) -> tuple[str, ...]:
    """The ops of one model: the dense ones, then the forward with each of its quantized formats
    (``bench/costs.py`` ``quant_rows``: fp8 for every model; int8 and int4 for Mixtral and Qwen3-30B-A3B; mxfp4
    for those and gpt-oss)."""
    return DENSE_OPS + tuple(f"{layer}.fwd.{q}" for layer in LAYERS for q in _costs.quant_rows(model))


DECODE_MAX_T, PREFILL_MIN_T = 64, 4096
GOALS = {"prefill_dense": 0.75, "prefill_vs_grouped_mm": 1.0, "decode_copy": 0.80, "bwd_dense": 0.65}
INTERP_MAX_T = 1  # triton rows in the interpreter: only at T = 1
TABLE = {"ratios": MAIN_RATIOS, "err_note": None,
         "extra": (("err", "err_vs_ref", ".1e", ""), ("dense", "dense_pct", ".1f", "%"), ("vs bf16", "vs_bf16", ".3g", "x"),
                   ("w MB", "w_mb", ".4g", ""), ("w GB/s", "w_gbps", ".4g", ""),
                   ("w copy", "w_copy_pct", ".1f", "%"), ("H200 ms", "h200_ms", ".3g", ""), ("goal", "goal", "s", ""))}


def select_gemm(models: list[str] | None, device: str, quick: bool,
                tokens: list[int] | None) -> tuple[list[Shape], str, list[str]]:
    """The shapes of one run (CPU: scaled down hard), the source of the configs and run notes."""
    # CPU: the quick parameter budget (about 2M expert parameters) whatever --quick says
    return select_suite(models, device, quick, tokens, defaults=GEMM_MODELS, quick_defaults=QUICK_MODELS,
                        token_table=TOKENS, small=True,
                        cpu_note="CPU: H and I scaled down to about 2M expert parameters per model, fp32")


# ----- baselines -------------------------------------------------------------------------------------


def loop_gemm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert ``torch.matmul`` over the segments (rows of every segment; a host sync for the bounds)."""
    bounds = offsets.tolist()
    ws = w.unbind(0)  # one stacked weight gradient instead of E full-size ones
    parts = [torch.matmul(xs[bounds[e]:bounds[e + 1]], ws[e].T) for e in range(w.shape[0])]
    return torch.cat(parts) if parts else xs.new_zeros(0, w.shape[1])


def grouped_mm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(xs, w.transpose(1, 2), offs=offsets[1:])


# ----- inputs and cases ------------------------------------------------------------------------------


class Inputs:
    """The plan of T tokens, and per layer: rows [S, K], weight [E, N, K] and the output gradient [S, N];
    quantized weights (``quantized``, formats of ``bench/costs.py`` ``QUANT_FORMATS``) made on first use."""

    def quantized(self, layer: str, name: str) -> mk.QuantizedWeight:
        key = (layer, name)
        if key not in self.fp8:
            fmt, kw = _costs.QUANT_FORMATS[name]
            self.fp8[key] = mk.quantize(self.layers[layer][1], fmt, **kw)
        return self.fp8[key]

    def __init__(self, s: Shape, device: str):
        torch.manual_seed(0)
        self.s = s
        ids = torch.rand(s.T, s.E, device=device).topk(s.k, dim=1).indices.to(torch.int32)
        self.plan = mk.plan_routing(ids, s.E, backend="torch")
        self.offsets = self.plan.expert_offsets
        self.active = int((self.plan.tokens_per_expert > 0).sum())
        S = s.T * s.k
        self.layers, self.fp8 = {}, {}
        for layer, (N, K) in (("gate_up", (s.I2, s.H)), ("down", (s.H, s.I))):
            x = torch.randn(S, K, device=device).to(s.dtype)
            w = (torch.randn(s.E, N, K, device=device) / K**0.5).to(s.dtype)
            self.layers[layer] = (x, w, torch.randn(S, N, device=device).to(s.dtype))


class _Grad:
    """``torch.autograd.grad`` of one leaf through a forward graph built on the first call and kept."""

    def __init__(self, forward, leaf: torch.Tensor, grad: torch.Tensor):
        self.forward, self.leaf, self.grad, self.y = forward, leaf, grad, None

    def __call__(self):
        if self.y is None:
            self.y = self.forward(self.leaf)
        return torch.autograd.grad(self.y, self.leaf, self.grad, retain_graph=True)[0]

    def release(self) -> None:
        self.y = None  # the graph and what it saved


def costs(s: Shape, op: str, active: int) -> tuple[int, int, int]:
    """``(flops, bytes, weight bytes)`` of one op (see the module docstring)."""
    layer, pas, *quant = op.split(".")
    N, K = (s.I2, s.H) if layer == "gate_up" else (s.H, s.I)
    S, es = s.T * s.k, s.dtype.itemsize
    w_read = active * _costs.weight_bytes(quant[0] if quant else None, N, K, es)  # packed bytes and scales
    rows = (S * K + S * N) * es
    if pas == "dW":
        return 2 * S * N * K, rows + s.E * N * K * es, s.E * N * K * es
    return 2 * S * N * K, rows + w_read, w_read


def _cases(inp: Inputs, op: str, backends: list[str], device: str) -> list[Case]:
    """Backend rows (the torch reference first), then ``loop`` and ``grouped_mm``."""
    s, plan, offs = inp.s, inp.plan, inp.offsets
    layer, pas, *quant = op.split(".")
    x, w, g = inp.layers[layer]
    flops, nbytes, _ = costs(s, op, inp.active)
    if quant:  # quantized weights (fp8 activations quantized in the kernel): every backend, no baselines
        why = _costs.quant_unsupported(quant[0], w.shape[1], w.shape[2])
        if why:
            return [Case(op, s, b, None, flops, nbytes, (), f"skipped: {why}") for b in backends]
        qw = inp.quantized(layer, quant[0])
        cases = []
        for b in backends:
            def call(b=b):
                with torch.no_grad():
                    return mk.grouped_gemm(x, qw, plan, backend=b)
            fn, note = call, ""
            if interpreted(b, device) and s.T > INTERP_MAX_T:
                fn, note = None, f"skipped: interpreter rows at T <= {INTERP_MAX_T} only"
            cases.append(Case(op, s, b, fn, flops, nbytes, (), note))
        return cases
    gmm_why = grouped_mm_reason(s, device)
    cases: list[Case] = []

    def run(fwd):
        """The case function of ``fwd(x, w)`` for this pass."""
        if pas == "fwd":
            def call():
                with torch.no_grad():
                    return fwd(x, w)
            return call
        if pas == "dX":
            return _Grad(lambda leaf: fwd(leaf, w), x.detach().requires_grad_(), g)
        return _Grad(lambda leaf: fwd(x, leaf), w.detach().requires_grad_(), g)

    for b in backends:
        fn, note = run(lambda a, b_, b=b: mk.grouped_gemm(a, b_, plan, backend=b)), ""
        if interpreted(b, device) and s.T > INTERP_MAX_T:
            fn, note = None, f"skipped: interpreter rows at T <= {INTERP_MAX_T} only"
        cases.append(Case(op, s, b, fn, flops, nbytes, (), note))
    cases.append(Case(op, s, "loop", run(lambda a, b_: loop_gemm(a, b_, offs)), flops, nbytes))
    if gmm_why:
        cases.append(Case(op, s, "grouped_mm", None, flops, nbytes, (), f"skipped: {gmm_why}"))
    else:
        cases.append(Case(op, s, "grouped_mm", run(lambda a, b_: grouped_mm(a, b_, offs)), flops, nbytes))
    return cases


# ----- the suite -------------------------------------------------------------------------------------


def _goal(row: dict, device: str) -> str | None:
    if device != "cuda" or row["backend"] in ("torch", "loop", "grouped_mm") or not row["median_ms"]:
        return None
    if row["op"].count(".") == 2:  # quantized rows: their goals are against bf16 and the fp8 matmul peak
        return None
    pas, T, dense = row["op"].split(".")[1], row["T"], row["dense_pct"] / 100
    if pas == "fwd" and T >= PREFILL_MIN_T:
        ratio = row["vs_grouped_mm"]
        ok = dense >= GOALS["prefill_dense"] and (ratio is None or ratio >= GOALS["prefill_vs_grouped_mm"])
        vs = f", {ratio:.2f}x grouped_mm vs >= {GOALS['prefill_vs_grouped_mm']:.1f}x" if ratio is not None else ""
        return goal(ok, f"{100 * dense:.0f}% dense vs >= {100 * GOALS['prefill_dense']:.0f}%{vs}")
    if pas == "fwd" and T <= DECODE_MAX_T:
        frac = row["w_copy_pct"] / 100
        return goal(frac >= GOALS["decode_copy"], f"{100 * frac:.0f}% of copy vs >= {100 * GOALS['decode_copy']:.0f}%")
    if pas in ("dX", "dW") and T >= PREFILL_MIN_T:
        return goal(dense >= GOALS["bwd_dense"], f"{100 * dense:.0f}% dense vs >= {100 * GOALS['bwd_dense']:.0f}%")
    return None


def run_gemm(shapes: list[Shape], device: str, quick: bool, notes: list[str]) -> tuple[list[dict], dict]:
    """Measure every op of every shape; ``(rows, facts)`` for the harness."""
    backends, more = suite_backends("grouped_gemm", device)
    notes = notes + more
    ceilings = measure_ceilings(device)
    rows: list[dict] = []
    groups = [(s, op) for s in shapes for op in ops_for(s.model)]
    progress = Progress(len(groups), "bench gemm")
    try:
        for s, op, inp in per_shape(groups, lambda s: Inputs(s, device), device):
            group, ref = [], None
            _, _, wbytes = costs(s, op, inp.active)
            big = full_shape(s)
            h200_ms = sig(_costs.roofline(*costs(big, op, inp.active)[:2]), 3)
            for case in _cases(inp, op, backends, device):
                fn = case.fn
                row, out = measure(case, device, quick, ceilings, ref if case.backend != "torch" else None, MAIN_RATIOS)
                if isinstance(fn, _Grad):
                    fn.release()
                ref = out if case.backend == "torch" else ref
                ms = row["median_ms"]
                row["active_experts"] = inp.active
                row["w_mb"] = sig(wbytes / 1e6, 4)
                row["h200_ms"] = h200_ms
                row["dense_pct"] = sig(100 * row["tflops"] / ceilings["matmul_tflops"], 4) if ms else None
                decode = ms and s.T <= DECODE_MAX_T
                row["w_gbps"] = sig(wbytes / (ms / 1e3) / 1e9) if decode else None
                row["w_copy_pct"] = sig(100 * row["w_gbps"] / ceilings["copy_gbps"], 4) if decode else None
                group.append(row)
                del case, out, fn
            fill_ratios(group, MAIN_RATIOS)
            for row in group:
                row["goal"] = _goal(row, device)
            fill_vs_bf16(group, rows, s, op.rsplit(".", 1)[0] if op.count(".") == 2 else None)
            rows += group
            del ref, inp  # per_shape holds the inputs for the shape's next op, and frees them before the next shape's
            progress.update(f"{s.model} T{s.T} {op}")
    finally:
        progress.close()
    if device != "cuda":
        notes.append("goals (prefill fwd >= 75% dense and >= 1.0x grouped_mm; decode fwd >= 80% of copy on the weight "
                     "bytes; dX/dW >= 65% dense) are checked on the GPU only")
    notes.append("err_vs_ref: relative error of the output (fwd), dX or dW against backend=torch; dense = TFLOP/s / "
                 "dense matmul ceiling; w GB/s, w copy (T <= 64): weight bytes of the experts with rows / time")
    notes.append(QUANT_NOTE.replace("{fmt}", "*.fwd.{fp8_tensor,fp8_block,int8,int4,mxfp4}"))
    notes.append("w MB: the weight bytes the op reads (experts with rows; packed formats with their scales)")
    notes.append(H200_NOTE)
    if device == "cpu":
        notes.append(CPU_QUANT_NOTE)
    return rows, suite_facts(quick, backends, ceilings, notes, GOALS, shapes)
