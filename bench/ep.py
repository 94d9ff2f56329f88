"""The ``ep`` suite: ``ExpertParallel.dispatch`` and ``combine`` across 2 and 4 ranks on CPU with gloo over
127.0.0.1, both paths (``exact``: uneven all-to-all after one host sync; ``capacity``: padded to a fixed
``capacity = T * min(k, E/W)`` rows per rank pair, no sync), forward and forward+backward.

Shapes keep the model's real hidden size (the exchange moves activations only, no weights), fp32, with
random distinct top-k experts per token. ``bytes``: what one rank sends to other ranks per call (mean
over ranks; padding included on the capacity path; the backward moves as much again); ``gbps`` is that
over the time of a call, the slowest rank's per repetition, median over repetitions. ``err_vs_ref``:
relative error of ``combine(dispatch(x))`` against ``x * sum_j w[:, j]`` (0 up to rounding).

``ep.experts.fwd+bwd`` rows run ``ExpertParallel.experts`` (expert GEMMs at ``I = BENCH_I``) with and without
FasterMoE shadowing of the ``SHADOW`` most loaded experts and the 2-chunk pipeline, on uniform and skewed (Zipf)
routing; their ``MB sent`` is what one rank sends off-rank with and without shadowing, the shadowed experts'
weights (forward) and gradients (backward) counted at the model's real expert size; ``err_vs_ref`` is against
the plain path.

Each rank runs one thread; with more ranks than cores (4 ranks on a 2-core machine) they share cores and
the timings include that. Gloo on loopback measures the software path (copies through the TCP stack),
not an interconnect: see ``docs/expert_parallel.md`` for H200-class links.

``python -m bench.ep [--quick] [--models A,B] [--tokens T,..] [--worlds 2,4] [--out DIR]`` runs it alone;
:func:`run_ep` is the suite's entry for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from .harness import QUANTILES, _quantile, collect_meta, format_table, measure_ceilings, sig, write_results
from .shapes import REPO, load_models

EP_MODELS = ("mixtral-8x7b", "deepseek-v3")
TOKENS = {True: (64,), False: (64, 256)}  # keyed by quick
WORLDS = (2, 4)
PATHS = ("exact", "capacity")
OPS = ("ep.dispatch", "ep.combine", "ep.dispatch+combine.fwd+bwd", "ep.experts.fwd+bwd")
BENCH_I = 16  # expert width of the ep.experts rows (their weight bytes are reported at the model's I)
SHADOW = 2  # experts shadowed by the FasterMoE rows
TABLE = {"ratios": {}, "extra": (("world", "world", "d", ""), ("MB sent", "mb_sent", ".3g", "")), "err_note": None}
JOIN_TIMEOUT_S = 600


def _timed(fn, budget_s: float, group=None) -> tuple[float, float, float]:
    """``(median, p20, p80)`` ms of one call on every rank together: barrier, call, the slowest rank's time."""
    import torch.distributed as dist

    fn()
    dist.barrier(group)
    t0 = time.perf_counter()
    fn()
    first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(first, op=dist.ReduceOp.MAX, group=group)  # every rank takes the same number of repetitions
    reps = int(min(50, max(3, budget_s / max(float(first), 1e-6))))
    times = []
    for _ in range(reps):
        dist.barrier(group)
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times.append(float(t) * 1e3)
    times.sort()
    return tuple(_quantile(times, q) for q in QUANTILES)  # type: ignore[return-value]


def _worker(rank: int, world: int, port: int, configs: list[dict], quick: bool, out_path: str) -> None:
    import torch.distributed as dist

    from moe_kernels.distributed import ExpertParallel

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    budget = 0.3 if quick else 1.0
    results = []
    for c in configs:
        T, H, E, k = c["T"], c["H"], c["E"], c["k"]
        g = torch.Generator().manual_seed(1000 * world + rank)
        x = torch.randn(T, H, generator=g)
        ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32)  # distinct experts per token
        w = torch.rand(T, k, generator=g)
        grad = torch.randn(T, H, generator=g)
        for path in PATHS:
            ep = ExpertParallel(None, E, capacity=None if path == "exact" else T * min(k, E // world))
            rows, handle = ep.dispatch(x, ids, w)
            want = x * w.sum(1, keepdim=True)
            err = float((ep.combine(rows, handle) - want).norm() / want.norm().clamp(min=1e-30))
            if path == "exact":
                off_rank = sum(handle.send_splits) - handle.send_splits[rank]
            else:
                off_rank = (world - 1) * ep.capacity
            sent = torch.tensor([off_rank * H * x.element_size(), err], dtype=torch.float64)
            dist.all_reduce(sent, op=dist.ReduceOp.SUM)
            bytes_sent, err = float(sent[0]) / world, float(sent[1]) / world
            xg = x.clone().requires_grad_()

            def both():
                r, h = ep.dispatch(xg, ids, w)
                ep.combine(r * 2.0, h).backward(grad)
                xg.grad = None

            fns = {"ep.dispatch": lambda: ep.dispatch(x, ids, w), "ep.combine": lambda: ep.combine(rows, handle),
                   "ep.dispatch+combine.fwd+bwd": both}
            for op, fn in fns.items():
                ms = _timed(fn, budget)
                moved = bytes_sent * (2 if op.startswith("ep.dispatch+") else 1) * (2 if op.endswith("bwd") else 1)
                results.append({**c, "world": world, "path": path, "op": op, "ms": ms, "bytes": moved, "err": err})
        results += _experts_rows(c, world, rank, x, ids, w, grad, budget, quick)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _skewed_ids(T: int, E: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Distinct experts per token drawn with Zipf(1) popularity over a fixed random order of the experts (the
    same hot experts on every rank, as with real text): a few experts take most of the slots."""
    order = torch.randperm(E, generator=torch.Generator().manual_seed(7))
    p = torch.empty(E).scatter_(0, order, 1.0 / torch.arange(1, E + 1, dtype=torch.float32))
    return torch.multinomial(p.expand(T, E), k, replacement=False, generator=g).to(torch.int32)


def _experts_rows(c: dict, world: int, rank: int, x, ids, w, grad, budget: float, quick: bool) -> list[dict]:
    """``ExpertParallel.experts`` forward+backward: plain, FasterMoE shadowing, chunked pipeline, both; uniform and
    skewed routing (quick: plain and shadowing only). Bytes: what one rank sends off-rank in the forward and backward
    (rows, plus shadowed weights and their gradients at the model's expert size), mean over ranks; the throughput
    is that of the bytes really moved (weights at ``BENCH_I``)."""
    import torch.distributed as dist

    from moe_kernels.distributed import ExpertParallel

    T, H, E, k, I = c["T"], c["H"], c["E"], c["k"], c["I"]
    El = E // world
    g = torch.Generator().manual_seed(5000 * world + rank)
    w13 = (torch.randn(El, 2 * BENCH_I, H, generator=g) / H**0.5).requires_grad_()
    w2 = (torch.randn(El, H, BENCH_I, generator=g) / BENCH_I**0.5).requires_grad_()
    per_expert_bench, per_expert_real = 3 * H * BENCH_I, 3 * H * I
    variants = (("plain", {}), (f"shadow{SHADOW}", {"shadow": SHADOW}), ("chunks2", {"chunks": 2}),
                (f"shadow{SHADOW}+chunks2", {"shadow": SHADOW, "chunks": 2}))[: 2 if quick else None]
    rows = []
    for routing, rids in (("uniform", ids), ("skewed", _skewed_ids(T, E, k, g))):
        xg = x.clone().requires_grad_()
        ref = None
        for name, opts in variants:
            ep = ExpertParallel(None, E, **opts)

            def run():
                out = ep.experts(xg, w13, w2, w, rids)
                out.backward(grad)
                xg.grad = w13.grad = w2.grad = None
                return out.detach()

            out = run()
            ref = out if ref is None else ref
            t = ep.last_traffic
            weights = t.weight_elements_sent // per_expert_bench * per_expert_real  # at the model's I
            mine = torch.tensor([2.0 * (t.rows_off_rank * H + weights) * x.element_size(),
                                 2.0 * (t.rows_off_rank * H + t.weight_elements_sent) * x.element_size(),
                                 float((out - ref).norm() / ref.norm().clamp(min=1e-30)), len(t.shadowed)],
                                dtype=torch.float64)
            dist.all_reduce(mine, op=dist.ReduceOp.SUM)
            moved, measured, err = float(mine[0]) / world, float(mine[1]) / world, float(mine[2]) / world
            shadowed = int(mine[3]) // world
            ms = _timed(run, budget)
            rows.append({**c, "world": world, "path": f"{name}/{routing}", "op": "ep.experts.fwd+bwd", "ms": ms,
                         "bytes": moved, "measured_bytes": measured, "err": err, "shadowed": shadowed})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, configs: list[dict], quick: bool) -> list[dict]:
    """Run the worker on ``world`` processes (killed after ``JOIN_TIMEOUT_S``); rank 0's results."""
    import torch.multiprocessing as mp

    mp.get_context("forkserver").set_forkserver_preload(["moe_kernels", __name__])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        procs = mp.start_processes(_worker, args=(world, _free_port(), configs, quick, out), nprocs=world,
                                   join=False, start_method="forkserver")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        try:
            while not procs.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bench ep: {world} ranks still running after {JOIN_TIMEOUT_S} s")
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
                    p.join(10)
        with open(out) as f:
            return json.load(f)


def _configs(args: argparse.Namespace) -> tuple[list[dict], str]:
    table, source = load_models()
    names = getattr(args, "models", None) or [m for m in EP_MODELS if m in table] or list(table)[:2]
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(table)}")
    tokens = getattr(args, "tokens", None) or TOKENS[bool(getattr(args, "quick", False))]
    configs = [{"model": m, "T": T, "H": int(table[m]["hidden"]), "E": int(table[m]["experts"]), "k": int(table[m]["top_k"]),
                "I": int(table[m]["intermediate"])} for m in names for T in tokens]
    return configs, source


def run_ep(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Measure dispatch/combine on CPU with gloo; ``(rows, facts)`` for the harness (``format_table(rows,
    facts["ceilings"], **TABLE)``, ``write_results``).

    Reads ``args.quick``, ``args.models``, ``args.tokens`` (None: the suite's defaults) and ``args.worlds``
    (default 2, 4) where present. Rows have the main suite's columns plus ``world``, ``path`` and ``mb_sent``.
    """
    quick = bool(getattr(args, "quick", False))
    configs, source = _configs(args)
    worlds = getattr(args, "worlds", None) or WORLDS
    notes = [f"models from {source}; real hidden sizes, fp32; capacity path: capacity = T * min(k, E/W) (never drops)",
             f"ep.experts: expert GEMMs at I={BENCH_I}, bytes at the model's I (shadowed weights and their gradients "
             f"included); shadow{SHADOW}: FasterMoE shadowing of the {SHADOW} most loaded experts; chunks2: 2-chunk "
             "pipeline; skewed: Zipf(1) expert popularity; err: vs the plain path"]
    cores = os.cpu_count() or 1
    if max(worlds) > cores:
        notes.append(f"{max(worlds)} ranks on {cores} cores: ranks share cores, timings include it")
    ceilings = measure_ceilings("cpu")
    rows = []
    for world in worlds:
        bad = [c["model"] for c in configs if c["E"] % world]
        if bad:
            notes.append(f"W={world}: skipped {', '.join(sorted(set(bad)))} (E not divisible by W)")
        for r in _run_world(world, [c for c in configs if c["E"] % world == 0], quick):
            p50, p20, p80 = r["ms"]
            gbps = r.get("measured_bytes", r["bytes"]) / (p50 / 1e3) / 1e9
            rows.append({
                "op": r["op"], "model": r["model"],
                "shape": f"{r['model']} W{world} T{r['T']} H{r['H']} E{r['E']} k{r['k']} fp32",
                "T": r["T"], "H": r["H"], "I": None, "E": r["E"], "k": r["k"], "dtype": "float32",
                "backend": f"gloo {r['path']}", "kind": "kernel", "world": world, "path": r["path"],
                "median_ms": sig(p50), "p20_ms": sig(p20), "p80_ms": sig(p80), "flops": 0, "bytes": int(r["bytes"]),
                "mb_sent": sig(r["bytes"] / 1e6, 4), "tflops": 0.0, "gbps": sig(gbps), "bound": "memory",
                "frac_ceiling": sig(gbps / ceilings["copy_gbps"]), "err_vs_ref": sig(r["err"]),
                "note": f"{r['shadowed']} shadowed" if "shadowed" in r else "",
            })
    rows.sort(key=lambda r: (r["model"], r["T"], r["world"], OPS.index(r["op"])))  # stable: paths in run order
    facts = {"quick": quick, "backends": ["gloo"], "ceilings": ceilings, "notes": notes, "worlds": list(worlds),
             "configs": configs}
    return rows, facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ep", description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(t) for t in s.split(",") if t.strip()]  # noqa: E731
    p.add_argument("--quick", action="store_true", help="T=64 only, shorter timing")
    p.add_argument("--models", type=lambda s: [t.strip() for t in s.split(",") if t.strip()], default=None,
                   help=f"model names from shared/models.json (default: {', '.join(EP_MODELS)})")
    p.add_argument("--tokens", type=ints, default=None, help="tokens per rank (default: 64,256; quick: 64)")
    p.add_argument("--worlds", type=ints, default=None, help="numbers of ranks (default: 2,4)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the CSV and JSON results")
    args = p.parse_args(argv)
    meta = collect_meta("cpu", "ep", argv=sys.argv[1:])
    t0 = time.perf_counter()
    try:
        rows, facts = run_ep(args)
    except ValueError as exc:
        sys.exit(f"bench ep: {exc}")
    meta.update(wall_s=round(time.perf_counter() - t0, 1), **facts)
    for note in facts["notes"]:
        print(f"note: {note}")
    print(format_table(rows, facts["ceilings"], **TABLE))
    csv_path, json_path = write_results(rows, meta, args.out)
    print(f"\n{len(rows)} rows; wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
