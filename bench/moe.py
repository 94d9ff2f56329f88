"""The ``moe`` suite (issue 6): forward and forward+backward of one ``moe_kernels.MoE`` layer on model shapes,
every backend beside these baselines:

- ``hf_eager`` and ``hf_grouped_mm``: the transformers (>= 5.0) MoE block of the model's family with that
  experts implementation, built at the benchmark size and holding the layer's own parameters (see
  ``bench/hf_blocks.py``); skipped with the reason when transformers is missing;
- ``hf_moe_kernels``: the same block on our registered experts implementation (``register()``); a kernel row,
  whose goal on CPU is >= 1.0x ``hf_grouped_mm`` (a switch to our backend must never be slower). On CPU that
  ratio is also measured paired (``paired`` column, the goal's figure): calls of the two blocks alternate and
  the median of the per-pair time ratios is taken, so both see the same load of a shared machine; the run's
  notes list it for every shape;
- ``unfused``: our ops called one after another, each with ``backend="auto"``: router, ``topk_gating``,
  ``plan_routing``, ``permute``, ``grouped_gemm``, activation, ``grouped_gemm``, ``unpermute`` (+ shared expert).

Ops: ``MoE.fwd``, ``MoE.fwd+bwd``, and ``MoE.fwd.<fmt>``: the forward after ``MoE.quantize_`` with fp8 experts (per
tensor, 128x128 blocks) for every model, the weight-only int8, int4 and mxfp4 (bf16 activations) for Mixtral and
Qwen3-30B-A3B, mxfp4 for gpt-oss too (``bench/costs.py`` ``QUANT_FORMATS``); their bytes, ``w MB`` and ``w read``
count the packed weights and scales. ``H200 ms``: the experts' modelled roofline time at the model's real size and
the documented H200 ceilings (the account; printed on CPU runs too).

Models: Mixtral-8x7B, DeepSeek-V3, Qwen3-30B-A3B, gpt-oss-120b; tokens 1, 16, 64, 256, 4096, 16384 in bf16 (GPU);
CPU: fp32, H and I scaled down (bench/shapes.py), tokens 1, 16, 256. ``err_vs_ref``: relative error against
backend=torch of the output (fwd) or of the gradients of x, w13 and w2 (fwd+bwd).
``peak MB`` (GPU): ``torch.cuda.max_memory_allocated`` during one call over what was allocated before it;
``act MB``: that peak less what the call leaves allocated (its output, or the gradients), i.e. activations
and workspace. ``w read``: row time over the time to read the weights the batch needs (experts with rows,
router, shared expert) at the measured copy bandwidth.

Goals on an H200, bf16 (``goal`` column, GPU, non-reference backends): >= 1.3x ``hf_grouped_mm`` at
>= 4096 tokens, fwd and fwd+bwd; decode (T <= 16) forward within 1.2x of the weight-read time; fwd+bwd
``act MB`` <= 60% of ``unfused``'s. A PNG plot of time vs tokens per model is written beside the results
when matplotlib is installed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import moe_kernels as mk

from . import costs, hf_blocks
from .common import (CPU_QUANT_NOTE, H200_NOTE, QUANT_NOTE, add_note, fill_vs_bf16, full_shape, goal, interpreted,
                     measure, per_shape, select_suite, suite_backends, suite_facts)
from .harness import Case, Progress, fill_ratios, measure_ceilings, output_error, sig
from .shapes import Shape
from .suites import loop_layer, make_layer, route

MOE_MODELS = ("mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "gpt-oss-120b")
QUICK_MODELS = ("mixtral-8x7b", "deepseek-v3", "gpt-oss-120b")
TOKENS = {("cuda", False): (1, 16, 64, 256, 4096, 16384), ("cuda", True): (1, 256, 4096),
          ("cpu", False): (1, 16, 256), ("cpu", True): (1, 256)}
DENSE_OPS = ("MoE.fwd", "MoE.fwd+bwd")


def ops_for(model: str) -> tuple[str, ...]:
    """The dense ops, then the forward of the layer with its experts in each quantized format of the model
    (``bench/costs.py`` ``quant_rows``: fp8 for every model; int8 and int4 for Mixtral and Qwen3-30B-A3B; mxfp4 for
    those and gpt-oss), through ``MoE.quantize_``."""
    return DENSE_OPS + tuple(f"MoE.fwd.{q}" for q in costs.quant_rows(model))


HF_ROWS = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm", "hf_moe_kernels": "moe_kernels"}
HF_OURS = "hf_moe_kernels"  # the transformers block on our registered experts implementation: a kernel row
PREFILL_MIN_T, DECODE_MAX_T = 4096, 16
GOALS = {"vs_hf_grouped_mm": 1.3, "decode_vs_weight_read": 1.2, "act_vs_unfused": 0.6, "cpu_hf_vs_grouped_mm": 1.0}
INTERP_MAX_T = 1  # triton rows in the interpreter: only at T = 1
RATIOS = {"vs_ref": "torch", "vs_hf_gmm": "hf_grouped_mm", "vs_hf_eager": "hf_eager", "vs_unfused": "unfused"}
TABLE = {"ratios": RATIOS, "err_note": None,
         "extra": (("TFLOP/s", "tflops", ".3g", ""), ("err", "err_vs_ref", ".1e", ""), ("peak MB", "peak_mb", "", ""),
                   ("act MB", "act_mb", "", ""), ("vs bf16", "vs_bf16", ".3g", "x"),
                   ("w MB", "w_mb", ".4g", ""), ("w read", "vs_weight_read", ".2f", "x"), ("model ms", "model_ms", ".3g", ""),
                   ("H200 ms", "h200_ms", ".3g", ""), ("paired", "vs_hf_gmm_paired", ".2f", "x"), ("goal", "goal", "s", ""))}
PAIRED = {True: (0.4, 7, 200), False: (1.5, 15, 600)}  # (budget s, min pairs, max pairs), keyed by quick


def select_moe(models: list[str] | None, device: str, quick: bool,
               tokens: list[int] | None) -> tuple[list[Shape], str, list[str]]:
    """The shapes of one run (CPU: scaled down), the source of the configs and run notes."""
    return select_suite(models, device, quick, tokens, defaults=MOE_MODELS, quick_defaults=QUICK_MODELS,
                        token_table=TOKENS, small=False,
                        cpu_note="CPU: H and I scaled down (see meta.shapes cpu_scale), fp32; peak memory n/a")


# ----- the unfused pipeline --------------------------------------------------------------------------


def unfused_experts(x, w13, w2, w, ids, activation, gated, b13=None, b2=None) -> torch.Tensor:
    """What ``fused_moe`` fuses, as our ops called one by one (backend auto)."""
    plan = mk.plan_routing(ids, w13.shape[0])
    h = mk.grouped_gemm(mk.permute(x, plan), w13, plan, bias=b13)  # [S, 2I]
    a = mk.activation(h, activation, gated=gated)  # [S, I]
    return mk.unpermute(mk.grouped_gemm(a, w2, plan, bias=b2), plan, w)  # [T, H]


def unfused(moe: mk.MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer with router, unfused experts and shared expert, all on backend auto."""
    return loop_layer(moe, x, unfused_experts, backend="auto")


# ----- inputs and cases ------------------------------------------------------------------------------


class Inputs:
    """The layer, its input and output gradient, the transformers block (or why not), the weight bytes needed."""

    def __init__(self, s: Shape, device: str):
        torch.manual_seed(0)
        self.s = s
        self.moe = make_layer(s, device)
        self.x = torch.randn(s.T, s.H, device=device).to(s.dtype)
        self.grad_out = torch.randn_like(self.x)
        self.xl = self.x.detach().clone().requires_grad_()
        with torch.no_grad():
            ids = route(self.moe, self.x)[2]
        self.active = int(ids.unique().numel())
        m, es = self.moe, s.dtype.itemsize
        per_expert = (m.w13[0].numel() + m.w2[0].numel() + (m.b13[0].numel() + m.b2[0].numel() if m.b13 is not None else 0))
        shared = sum(p.numel() for p in m.shared.parameters()) if m.shared is not None else 0
        self.weight_bytes = (self.active * per_expert + shared + m.router.weight.numel()) * es
        self.idle_bytes = (s.E - self.active) * per_expert * es  # weights of experts without rows
        self.hf_why = hf_blocks.unavailable(s.model)
        self.block = None
        if self.hf_why is None:
            try:
                self.block = hf_blocks.build(s, self.moe)
            except Exception as exc:  # a transformers version whose classes or configs differ
                self.hf_why = f"building the transformers block failed ({type(exc).__name__}: {str(exc)[:120]})"
        self.quant = {}  # quantized copies of the layer, by format
        # bytes the experts with rows do not read in each quantized format (packed data and scales instead)
        dense = costs.expert_bytes(s, None)
        self.saved = {q: self.active * (dense - costs.expert_bytes(s, q)) for q in costs.QUANT_FORMATS}
        self.leaves = [self.xl, *self.moe.parameters()]
        if self.block is not None:
            seen = {id(t) for t in self.leaves}
            self.leaves += [p for p in self.block.parameters() if id(p) not in seen]


def _quant_cases(inp: Inputs, op: str, backends: list[str], device: str) -> list[tuple[Case, object]]:
    """The layer with quantized experts (``MoE.quantize_``), every backend; bytes with the packed expert weights."""
    import copy

    s, name = inp.s, op.rsplit(".", 1)[1]
    flops, nbytes = costs.COSTS["MoE.fwd"](s)
    nbytes -= inp.idle_bytes + inp.saved[name]
    why = costs.quant_unsupported(name, s.I2, s.H) or costs.quant_unsupported(name, s.H, s.I)
    if why:
        return [(Case(op, s, b, None, flops, nbytes, (), f"skipped: {why}"), None) for b in backends]
    if name not in inp.quant:
        fmt, kw = costs.QUANT_FORMATS[name]
        inp.quant[name] = copy.deepcopy(inp.moe).quantize_(fmt, **kw)
    m = inp.quant[name]
    cases = []
    for b in backends:
        def run(b=b):
            m.backend = b
            with torch.no_grad():
                return m(inp.x)
        skip = interpreted(b, device) and s.T > INTERP_MAX_T
        note = f"skipped: interpreter rows at T <= {INTERP_MAX_T} only" if skip else ""
        cases.append((Case(op, s, b, None if skip else run, flops, nbytes, (), note), None))
    return cases


def _cases(inp: Inputs, op: str, backends: list[str], device: str) -> list[tuple[Case, object]]:
    """``(case, post)`` pairs: backend rows (the torch reference first), then the baselines; ``post(out)``
    puts a row's output in the reference's layout."""
    if op.count(".") == 2:
        return _quant_cases(inp, op, backends, device)
    s, m, bwd = inp.s, inp.moe, op.endswith("bwd")
    flops, nbytes = costs.COSTS[op](s)
    if not bwd:
        nbytes -= inp.idle_bytes  # only experts with rows are read
    grads = inp.leaves if bwd else ()
    cases: list[tuple[Case, object]] = []

    def wrap(forward, grads_of=lambda: [m.w13.grad, m.w2.grad]):
        if not bwd:
            def run():
                with torch.no_grad():
                    return forward(inp.x)
            return run

        def run():
            forward(inp.xl).backward(inp.grad_out)
            return [inp.xl.grad, *grads_of()]
        return run

    def layer(b):
        def forward(x):
            m.backend = b
            return m(x)
        return forward

    def add(backend, fn, note="", post=None):
        cases.append((Case(op, s, backend, fn, flops, nbytes, grads, note), post))

    for b in backends:
        skip = interpreted(b, device) and s.T > INTERP_MAX_T
        add(b, None if skip else wrap(layer(b)), f"skipped: interpreter rows at T <= {INTERP_MAX_T} only" if skip else "")
    for name, impl in HF_ROWS.items():
        if inp.block is None:
            add(name, None, f"skipped: {inp.hf_why}")
        else:
            add(name, wrap(lambda x, impl=impl: hf_blocks.forward(inp.block, x, impl), lambda: hf_blocks.expert_grads(inp.block)),
                post=(lambda out: [out[0], *hf_blocks.moe_layout(inp.block, *out[1:])]) if bwd else None)
    add("unfused", wrap(lambda x: unfused(m, x)))
    return cases


def _memory(fn, grads) -> tuple[float, float]:
    """``(peak MB, transient MB)`` of one call on the GPU (see the module docstring)."""
    for g in grads:
        g.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak, kept = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    del out
    for g in grads:
        g.grad = None
    return sig(peak / 2**20, 4), sig((peak - kept) / 2**20, 4)


def paired_ratio(base: Case, row: Case, quick: bool) -> float:
    """Median over alternating calls of ``time(base) / time(row)`` (CPU): the two calls of a pair run back to
    back, in alternating order, so a load that comes and goes on a shared machine hits both alike."""
    budget, min_pairs, max_pairs = PAIRED[quick]
    leaves = list({id(t): t for t in (*base.grads, *row.grads)}.values())
    ratios: list[float] = []
    stop = time.perf_counter() + budget
    while len(ratios) < min_pairs or (len(ratios) < max_pairs and time.perf_counter() < stop):
        took = {}
        for name, fn in ((("b", base.fn), ("r", row.fn)) if len(ratios) % 2 else (("r", row.fn), ("b", base.fn))):
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - t0
        ratios.append(took["b"] / took["r"])
    for t in leaves:
        t.grad = None
    return statistics.median(ratios)


# ----- the suite -------------------------------------------------------------------------------------


def _goals(group: list[dict], device: str) -> None:
    unfused_act = next((r["act_mb"] for r in group if r["backend"] == "unfused" and r["median_ms"]), None)
    for r in group:
        ratio = r.get("vs_hf_gmm_paired") or r["vs_hf_gmm"]
        if r["backend"] == HF_OURS and r["median_ms"] and ratio is not None and device == "cpu":
            want = GOALS["cpu_hf_vs_grouped_mm"]  # on CPU a switch to our backend must never be slower
            how = "paired" if r.get("vs_hf_gmm_paired") else "medians"
            r["goal"] = goal(ratio >= want, f"{ratio:.2f}x hf_grouped_mm ({how}) vs >= {want}x")
            continue
        if device != "cuda" or r["kind"] != "kernel" or r["backend"] == "torch" or not r["median_ms"]:
            continue
        out, bwd = [], r["op"].endswith("bwd")
        if r["T"] >= PREFILL_MIN_T and r["vs_hf_gmm"] is not None:
            want = GOALS["vs_hf_grouped_mm"]
            out.append(goal(r["vs_hf_gmm"] >= want, f"{r['vs_hf_gmm']:.2f}x hf_grouped_mm vs >= {want}x"))
        if not bwd and r["T"] <= DECODE_MAX_T:
            want = GOALS["decode_vs_weight_read"]
            out.append(goal(r["vs_weight_read"] <= want, f"{r['vs_weight_read']:.2f}x weight read vs <= {want}x"))
        if bwd and unfused_act:
            frac, want = r["act_mb"] / unfused_act, GOALS["act_vs_unfused"]
            out.append(goal(frac <= want, f"act mem {100 * frac:.0f}% of unfused vs <= {100 * want:.0f}%"))
        r["goal"] = "; ".join(out) or None


def _h200_ms(s: Shape, op: str) -> float:
    """The experts' modelled roofline time (bench/costs.py account) at the model's real size and the documented
    H200 ceilings; quantized rows with their format."""
    big, fmt = full_shape(s), (op.rsplit(".", 1)[1] if op.count(".") == 2 else None)
    launches = costs.fused_account(big, "fwd", fmt=fmt) + (costs.fused_account(big, "bwd") if op.endswith("bwd") else [])
    return sig(costs.roofline_ms(launches), 3)


def _model_ms(s: Shape, op: str, ceilings: dict) -> float:
    """The experts' modelled roofline time (bench/costs.py account, at the measured ceilings), beside the
    measured layer row: a model, not a measurement (router and shared experts not included)."""
    launches = costs.fused_account(s, "fwd") + (costs.fused_account(s, "bwd") if op.endswith("bwd") else [])
    return sig(costs.roofline_ms(launches, ceilings["matmul_tflops"], ceilings["copy_gbps"] / 1e3), 3)


def run_moe(shapes: list[Shape], device: str, quick: bool, notes: list[str]) -> tuple[list[dict], dict]:
    """Measure both ops on every shape; ``(rows, facts)`` for the harness."""
    backends, more = suite_backends("fused_moe", device)
    notes = notes + more
    ceilings = measure_ceilings(device)
    rows: list[dict] = []
    groups = [(s, op) for s in shapes for op in ops_for(s.model)]
    progress = Progress(len(groups), "bench moe")
    hf_skips, cpu_goal = set(), []
    try:
        for s, op, inp in per_shape(groups, lambda s: Inputs(s, device), device):
            if inp.hf_why:
                hf_skips.add(inp.hf_why)
            group, ref, timed = [], None, {}
            h200_ms = _h200_ms(s, op)
            for case, post in _cases(inp, op, backends, device):
                fn = case.fn
                row, out = measure(case, device, quick, ceilings, None, RATIOS)
                out = post(out) if post is not None and out is not None else out
                if case.backend == "torch":
                    ref = out
                elif out is not None and ref is not None:
                    row["err_vs_ref"] = sig(output_error(out, ref))
                    if row["err_vs_ref"] > (1e-4 if s.dtype == torch.float32 else 3e-2):
                        add_note(row, f"rel err vs ref {row['err_vs_ref']:.1e}"
                                      + (" (HF routes in the layer dtype)" if case.backend.startswith("hf") else ""))
                row["kind"] = ("baseline" if case.backend in HF_ROWS and case.backend != HF_OURS or case.backend == "unfused"
                               else "kernel")
                row["peak_mb"] = row["act_mb"] = "n/a" if device != "cuda" else None
                if device == "cuda" and row["median_ms"]:
                    row["peak_mb"], row["act_mb"] = _memory(fn, case.grads)
                w_bytes = inp.weight_bytes - (inp.saved[op.rsplit(".", 1)[1]] if op.count(".") == 2 else 0)
                row["w_mb"] = sig(w_bytes / 1e6, 4)
                row["h200_ms"] = h200_ms if row["kind"] == "kernel" else None
                w_read_ms = w_bytes / (ceilings["copy_gbps"] * 1e9) * 1e3
                fwd = row["median_ms"] and not op.endswith("bwd")
                row["vs_weight_read"] = sig(row["median_ms"] / w_read_ms, 4) if fwd else None
                row["active_experts"] = inp.active
                row["model_ms"] = _model_ms(s, op, ceilings) if device == "cuda" and case.backend == "triton" else None
                row["goal"] = row["vs_hf_gmm_paired"] = None
                if row["median_ms"] and case.backend in ("hf_grouped_mm", HF_OURS):
                    timed[case.backend] = (case, row)
                group.append(row)
                del out, fn
            fill_ratios(group, RATIOS)
            if device == "cpu" and len(timed) == 2:
                (base, _), (ours, row) = timed["hf_grouped_mm"], timed[HF_OURS]
                row["vs_hf_gmm_paired"] = sig(paired_ratio(base, ours, quick), 3)
                cpu_goal.append((f"{s.model} T{s.T} {op.split('.', 1)[1]}", row["vs_hf_gmm_paired"]))
            del timed
            _goals(group, device)
            fill_vs_bf16(group, rows, s, "MoE.fwd" if op.count(".") == 2 else None)
            rows += group
            inp.moe.backend = "torch"
            del ref, inp  # per_shape holds the inputs for the shape's next op, and frees them before the next shape's
            progress.update(f"{s.model} T{s.T} {op}")
    finally:
        progress.close()
    notes += [f"hf rows skipped: {why}" for why in sorted(hf_skips)]
    if cpu_goal:
        want = GOALS["cpu_hf_vs_grouped_mm"]
        met = sum(ratio >= want for _, ratio in cpu_goal)  # the measured ratio (3 digits), not the printed one
        notes.append(f"CPU goal hf_moe_kernels >= {want}x hf_grouped_mm (paired: median time ratio of alternating "
                     f"calls) met at {met}/{len(cpu_goal)}: "
                     + ", ".join(f"{name} {ratio:.3f}x" for name, ratio in cpu_goal))
    if device == "cpu":
        from moe_kernels import _cpu_gemm

        notes.append("CPU path GEMMs: " + (f"C kernels (moe_kernels/_cpu_gemm.c) for experts with at most "
                                           f"{_cpu_gemm.MAX_ROWS} rows, torch's beyond" if _cpu_gemm.lib()
                                           else "torch's (the C kernels are off)"))
    if device != "cuda":
        notes.append("goals (>= 1.3x hf_grouped_mm at >= 4096 tokens; decode within 1.2x of the weight read; "
                     "fwd+bwd activation memory <= 60% of unfused) are checked on the GPU only")
    if device == "cuda":
        notes.append("model ms (triton rows): modelled roofline time of the fused experts' launches (python -m bench "
                     "account), not a measurement")
    notes.append("w read = row time / (weight bytes needed / copy bandwidth); err_vs_ref vs backend=torch "
                 "(fwd: output; fwd+bwd: grads of x, w13, w2)")
    notes.append(QUANT_NOTE.replace("{fmt}", "MoE.fwd.{fp8_tensor,fp8_block,int8,int4,mxfp4}") + " (the layer after "
                 "MoE.quantize_)")
    notes.append("w MB: the weight bytes the batch needs (experts with rows, router, shared expert; packed formats with "
                 "their scales)")
    notes.append(H200_NOTE + "; the experts' launches of the account (python -m bench account), kernel rows")
    if device == "cpu":
        notes.append(CPU_QUANT_NOTE)
    return rows, suite_facts(quick, backends, ceilings, notes, GOALS, shapes)


# ----- the plot --------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path) -> str:
    """Time vs tokens per model (one panel per model and op), one line per backend; returns what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    models = list(dict.fromkeys(r["model"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), len(models), figsize=(4 * len(models), 3.4 * len(ops)), squeeze=False)
    for j, model in enumerate(models):
        for i, op in enumerate(ops):
            ax = axes[i][j]
            mine = [r for r in rows if r["model"] == model and r["op"] == op and r["median_ms"]]
            for backend in dict.fromkeys(r["backend"] for r in mine):
                pts = sorted((r["T"], r["median_ms"]) for r in mine if r["backend"] == backend)
                ax.plot(*zip(*pts), marker="o", linestyle="--" if backend in HF_ROWS or backend == "unfused" else "-",
                        label=backend)
            ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms", title=f"{model} {op}")
            ax.grid(True, which="both", alpha=0.3)
            if mine:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
