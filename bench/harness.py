"""The benchmark harness: timing, device ceilings, running cases, the table, CSV/JSON results."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .shapes import REPO, Shape

QUANTILES = [0.5, 0.2, 0.8]
# recorded in the metadata when set
ENV_VARS = ("MOE_KERNELS_POISON", "MOE_KERNELS_CHECK_VALUES", "MOE_KERNELS_CPU_GEMM", "TRITON_INTERPRET",
            "OMP_NUM_THREADS")
BASELINES = ("loop", "grouped_mm", "chain", "chain_compiled")  # non-kernel rows; "torch" (the reference) is one more
# ratio column -> the backend whose time it divides by the row's (the main suite's; other suites pass their own)
MAIN_RATIOS = {"vs_ref": "torch", "vs_loop": "loop", "vs_grouped_mm": "grouped_mm"}


# ----- timing ----------------------------------------------------------------------------------------


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], device: str, quick: bool, grads: Sequence[torch.Tensor] = ()) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of one call of ``fn`` in ms; ``grads``: leaves whose .grad is reset per call.

    GPU: ``triton.testing.do_bench``. CPU: ``time.perf_counter`` after warmup, for a short time budget.
    """
    if device == "cuda":
        import triton.testing

        warmup, rep = (10, 40) if quick else (25, 100)
        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grads) or None,
                                                quantiles=QUANTILES)
        return float(p50), float(p20), float(p80)

    def call():
        _clear(grads)
        fn()

    t0 = time.perf_counter()
    call()  # warmup (the caller's first call was one too); a second one only where it is cheap
    if time.perf_counter() - t0 < 0.05:
        call()
    budget, min_reps, max_reps = (0.15, 3, 100) if quick else (0.3, 5, 300)
    times: list[float] = []
    stop = time.perf_counter() + budget
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() < stop):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return tuple(_quantile(times, q) for q in QUANTILES)  # type: ignore[return-value]


def _best_ms(fn: Callable[[], object], device: str) -> float:
    """Fastest observed call in ms: a ceiling is what the device can do, not what it usually does."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="min"))
    fn()
    best, reps, stop = float("inf"), 0, time.perf_counter() + 0.6
    while reps < 3 or time.perf_counter() < stop:
        t0 = time.perf_counter()
        fn()
        best, reps = min(best, (time.perf_counter() - t0) * 1e3), reps + 1
    return best


def measure_ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written) and dense matmul rate, measured once per run (CPU: ~2 s)."""
    if device == "cuda":
        n_copy, n_mm, dtype = 1 << 29, 8192, torch.bfloat16  # 1 GiB each way; bf16 tensor-core matmul
    else:
        n_copy, n_mm, dtype = 1 << 24, 1536, torch.float32  # 64 MiB each way
    src = torch.randn(n_copy, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms_copy = _best_ms(lambda: dst.copy_(src), device)
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device).to(dtype)
    b = torch.randn(n_mm, n_mm, device=device).to(dtype)
    ms_mm = _best_ms(lambda: a @ b, device)
    return {
        "copy_gbps": 2 * n_copy * dtype.itemsize / ms_copy / 1e6,
        "matmul_tflops": 2 * n_mm**3 / ms_mm / 1e9,
        "copy_bytes": 2 * n_copy * dtype.itemsize,
        "matmul_n": n_mm,
        "dtype": str(dtype).replace("torch.", ""),
        "stat": "fastest call",
    }


# ----- cases and rows --------------------------------------------------------------------------------


@dataclass
class Case:
    """One row to measure: ``fn()`` runs the op once on prepared inputs."""

    op: str
    shape: Shape
    backend: str  # a moe_kernels backend, or a baseline in BASELINES
    fn: Callable[[], object] | None  # None: skipped, ``note`` says why
    flops: int = 0
    bytes: int = 0
    grads: Sequence[torch.Tensor] = ()
    note: str = ""


def flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_tensors(o)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for f in out.__dataclass_fields__ for t in flat_tensors(getattr(out, f))]
    return []


def output_error(out, ref) -> float | None:
    """Largest relative error (norm of difference over norm of reference) over the output tensors."""
    a, b = flat_tensors(out), flat_tensors(ref)
    if not a or len(a) != len(b):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, ((x - y).norm() / y.norm().clamp(min=1e-30)).item())
    return worst


def _clear(grads: Sequence[torch.Tensor]) -> None:
    for g in grads:
        g.grad = None


def run_case(case: Case, device: str, quick: bool, ceilings: dict, ref_out=None,
             ratios: dict = MAIN_RATIOS) -> tuple[dict, object]:
    """Measure one case; returns its result row (with empty ``ratios`` columns) and its output."""
    s = case.shape
    row = {
        "op": case.op, "model": s.model, "shape": s.label, "T": s.T, "H": s.H, "I": s.I, "E": s.E, "k": s.k,
        "dtype": str(s.dtype).replace("torch.", ""), "backend": case.backend,
        "kind": "baseline" if case.backend in BASELINES else "kernel",
        "median_ms": None, "p20_ms": None, "p80_ms": None, "flops": case.flops, "bytes": case.bytes,
        "tflops": None, "gbps": None, "bound": None, "frac_ceiling": None,
        **dict.fromkeys(ratios), "err_vs_ref": None, "note": case.note,
    }
    if case.fn is None:
        return row, None
    out = None
    try:
        _clear(case.grads)
        out = case.fn()  # also the first warmup; forward rows return their output
        if ref_out is not None and out is not None:
            row["err_vs_ref"] = output_error(out, ref_out)
        row["median_ms"], row["p20_ms"], row["p80_ms"] = time_fn(case.fn, device, quick, case.grads)
    except Exception as exc:  # a backend refusing these inputs, or a failing baseline: keep going
        msg = str(exc).splitlines()[0] if str(exc) else ""
        if "cannot serve these inputs: " in msg:
            row["note"] = "skipped: " + msg.split("cannot serve these inputs: ", 1)[1][:160]
        else:
            row["note"] = f"error: {type(exc).__name__}: {msg[:160]}"
        return row, None
    finally:
        _clear(case.grads)  # gradients of full-size models are large: free them between rows
    row.update({c: sig(row[c]) for c in ("median_ms", "p20_ms", "p80_ms", "err_vs_ref")})
    sec = row["median_ms"] / 1e3
    row["tflops"] = case.flops / sec / 1e12
    row["gbps"] = case.bytes / sec / 1e9
    t_flop = case.flops / (ceilings["matmul_tflops"] * 1e12)
    t_byte = case.bytes / (ceilings["copy_gbps"] * 1e9)
    row["bound"] = "compute" if t_flop >= t_byte else "memory"
    row["frac_ceiling"] = max(t_flop, t_byte) / sec
    row.update({c: sig(row[c]) for c in ("tflops", "gbps", "frac_ceiling")})
    return row, out


def sig(v: float | None, digits: int = 5) -> float | None:
    return None if v is None else float(f"{v:.{digits}g}")


def fill_ratios(rows: list[dict], ratios: dict = MAIN_RATIOS) -> None:
    """Speedups of each row of one (op, shape) group against the reference and the baselines."""
    by_backend = {r["backend"]: r["median_ms"] for r in rows if r["median_ms"]}
    for r in rows:
        if not r["median_ms"]:
            continue
        for col, base in ratios.items():
            if by_backend.get(base):
                r[col] = sig(by_backend[base] / r["median_ms"], 4)


# ----- progress --------------------------------------------------------------------------------------


class Progress:
    """tqdm when it is installed, else a counter on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.n, self.desc = total, 0, desc
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.tty = sys.stderr.isatty()

    def update(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        elif self.tty:
            sys.stderr.write(f"\r\x1b[K{self.desc} [{self.n}/{self.total}] {what}")
            sys.stderr.flush()
        elif self.n == self.total or self.n % max(1, self.total // 10) == 0:
            sys.stderr.write(f"{self.desc} [{self.n}/{self.total}] {what}\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# ----- table and files -------------------------------------------------------------------------------


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def rel_err_note(r: dict) -> str | None:
    """The main suite's note for a forward output far from the reference's."""
    err = r["err_vs_ref"]
    if err is not None and err > (1e-4 if r["dtype"] in ("float32", "float64") else 3e-2):
        return f"rel err vs ref {err:.1e}"
    return None


def format_table(rows: list[dict], ceilings: dict, ratios: dict = MAIN_RATIOS, extra: Sequence[tuple] = (),
                 err_note: Callable[[dict], str | None] | None = rel_err_note) -> str:
    """Aligned text table: one line per row, a blank line between shapes.

    ``ratios``: the ratio columns; ``extra``: more columns as ``(header, key, format spec, suffix)``;
    ``err_note(row)``: text added to the note (None: nothing).
    """
    head = ["op", "model/shape", "backend", "median ms", "throughput", "ceiling",
            *(c.replace("_", " ", 1) for c in ratios), *(e[0] for e in extra), "note"]
    lines, prev = [], None
    for r in rows:
        if prev is not None and r["shape"] != prev:
            lines.append(None)
        prev = r["shape"]
        if r["median_ms"] is None:
            thr = "-"
        elif r["bound"] == "compute":
            thr = f"{r['tflops']:.3g} TFLOP/s"
        else:
            thr = f"{r['gbps']:.3g} GB/s"
        note, more = r["note"], err_note(r) if err_note else None
        if more:
            note = f"{note}; {more}" if note else more
        ms = r["median_ms"]
        lines.append([r["op"], r["shape"], r["backend"], "-" if ms is None else f"{ms:.4g}", thr,
                      _fmt(None if r["frac_ceiling"] is None else 100 * r["frac_ceiling"], ".1f", "%"),
                      *(_fmt(r[c], ".2f", "x") for c in ratios), *(_fmt(r.get(key), spec, suf) for _, key, spec, suf in extra),
                      note])
    body = [row for row in lines if row is not None]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) if body else len(head[i]) for i in range(len(head))]
    widths[-1] = 0
    right = set(range(3, len(head) - 1))

    def render(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, {ceilings['dtype']} matmul {ceilings['matmul_tflops']:.3g} TFLOP/s "
           "(ceiling = roofline time at these rates / measured time; vs X = time of X / time of the row)",
           render(head), render(["-" * w for w in widths[:-1]] + ["----"])]
    out += ["" if row is None else render(row) for row in lines]
    return "\n".join(out)


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def collect_meta(device: str, suite: str, **extra) -> dict:
    """Run metadata stored with the results."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "suite": suite,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "cpu_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        **extra,
    }


def device_tag(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or device


CSV_META = ("date", "device_name", "torch", "triton", "git_commit")


def write_results(rows: list[dict], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    """``<date>_<device>_<suite>.csv`` (one line per row, run metadata repeated in columns) and ``.json``
    (``{"meta": ..., "rows": [...]}``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date'][:10]}_{device_tag(meta['device'])}_{meta['suite']}"
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    cols = list(rows[0].keys()) + list(CSV_META) if rows else list(CSV_META)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: meta[k] for k in CSV_META}})
    with open(json_path, "w") as f:
        finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        json.dump({"meta": meta, "rows": finite}, f, indent=1, default=str)
        f.write("\n")
    return csv_path, json_path
