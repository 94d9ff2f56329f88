"""``python -m bench.cpu_gemm``: the CPU path's grouped GEMMs (``moe_kernels/_cpu_gemm.c``) against torch's.

For each model of the ``moe`` suite at its CPU shape (bench/shapes.py: H and I scaled down, fp32, E and k as the
model) and 1 to 64 rows per expert (every expert with rows): the three products of an expert layer, each
beside ``F.grouped_mm`` on the same tensors (MKL on x86):

- ``nt``: ``[rows, H] x w13[e]^T`` with w13 ``[E, 2I, H]`` (transformers' gate_up_proj; unit stride along K);
- ``nn``: ``[rows, 2I] x w13[e]`` (the backward's dX; unit stride along N);
- ``wgrad``: ``g[rows, 2I]^T x [rows, H]`` into a fresh ``[E, 2I, H]`` (the weight gradient).

Columns: median time (us), GFLOP/s, the weight bytes (read, or the gradient written) over the time against the
measured copy bandwidth (``bw %``), and ``C / grouped_mm`` as a speed ratio. The kernels take experts with at
most ``_cpu_gemm.MAX_ROWS`` rows in the CPU path; rows past that are measured here to show where BLAS
wins. Prints a markdown table and writes it to ``--out`` (default bench/results/<date>_cpu_gemm.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_kernels import _cpu_gemm

from .harness import collect_meta, measure_ceilings, time_fn
from .moe import MOE_MODELS, select_moe

ROWS = (1, 4, 16, 32, 64)


def _median_us(fn) -> float:
    fn()
    return time_fn(fn, "cpu", False)[0] * 1e3  # the suites' CPU timing: median ms after warmup


def rows_for(model: str, E: int, H: int, I: int, m: int, copy_gbps: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    b = [e * m for e in range(E + 1)]
    cb, offs = _cpu_gemm.bounds_array(b), torch.tensor(b[1:], dtype=torch.int32)
    x = torch.randn(E * m, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g)
    gh = torch.randn(E * m, 2 * I, generator=g)
    y_nt, y_nn = torch.empty(E * m, 2 * I), torch.empty(E * m, H)
    wt = w13.transpose(1, 2)
    cases = {
        "nt": (lambda: _cpu_gemm.gemm(x, wt, None, cb, y_nt, m), lambda: F.grouped_mm(x, wt, offs=offs)),
        "nn": (lambda: _cpu_gemm.gemm(gh, w13, None, cb, y_nn, m), lambda: F.grouped_mm(gh, w13, offs=offs)),
        "wgrad": (lambda: _cpu_gemm.wgrad(gh, x, cb, torch.empty(E, 2 * I, H), m),
                  lambda: F.grouped_mm(gh.t(), x, offs=offs)),
    }
    flops, wbytes = 2 * E * m * 2 * I * H, w13.numel() * 4
    out = []
    for kind, (ours, base) in cases.items():
        t_c, t_b = _median_us(ours), _median_us(base)
        out.append({"model": model, "E": E, "H": H, "I": I, "rows": m, "op": kind, "c_us": round(t_c, 1),
                    "grouped_mm_us": round(t_b, 1), "c_gflops": round(flops / t_c / 1e3, 1),
                    "c_bw_pct": round(100 * wbytes / t_c / 1e3 / copy_gbps, 1), "ratio": round(t_b / t_c, 2),
                    "in_path": m <= _cpu_gemm.MAX_ROWS})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_gemm", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MOE_MODELS))
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if _cpu_gemm.lib() is None:
        raise SystemExit("the CPU grouped GEMM kernels are not available here (see the warning above)")
    ceil = measure_ceilings("cpu")
    shapes, _, _ = select_moe(a.models.split(","), "cpu", False, [1])
    rows = [r for s in shapes for m in map(int, a.rows.split(",")) for r in rows_for(s.model, s.E, s.H, s.I, m,
                                                                                     ceil["copy_gbps"] / 2)]
    meta = collect_meta("cpu", "cpu_gemm", threads=torch.get_num_threads())
    head = ["model", "E", "H", "I", "rows", "op", "c_us", "grouped_mm_us", "c_gflops", "c_bw_pct", "ratio", "in_path"]
    lines = [f"# CPU grouped GEMMs: C kernels vs F.grouped_mm ({meta['date']}, {meta['device_name']}, torch "
             f"{meta['torch']}, commit {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}, "
             f"{meta['cpu_threads']} threads, load {meta['loadavg']:.2f}, "
             f"copy {ceil['copy_gbps'] / 2:.1f} GB/s each way)",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = a.out or Path(__file__).parent / "results" / f"{meta['date'][:10]}_cpu_gemm.md"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
