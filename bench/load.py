"""The ``load`` suite: the load per expert over a run, from ``MoE.run_stats`` (counts and routing entropy
accumulated across calls), with a bar plot of tokens per expert.

Each model's layer (real E and top_k; H and I scaled down on CPU) routes ``batches`` batches of synthetic tokens
drawn from a mixture of a few Gaussian clusters, so the load is uneven as with real text; once with top-k routing and
once hierarchically (G = 4 groups where E allows). Rows report the forward time with statistics on, the imbalance
(``max load / mean load``), the load entropy (nats; ``log E`` when even) and the mean per-token routing entropy;
``tokens_per_expert`` holds the counts. ``python -m bench load [--quick] [--models A,B] [--out DIR]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import moe_kernels as mk

from .harness import measure_ceilings, sig, time_fn
from .shapes import load_models

LOAD_MODELS = ("mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b")
TABLE = {"ratios": {}, "extra": (("imbalance", "imbalance", ".3g", ""), ("load H", "load_entropy", ".3g", ""),
                                 ("route H", "route_entropy", ".3g", "")), "err_note": None}


def select_load(models: list[str] | None, quick: bool) -> tuple[list[dict], str]:
    table, source = load_models()
    names = models or [m for m in LOAD_MODELS if m in table][: 2 if quick else None] or list(table)[:2]
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(table)}")
    return [{"model": m, "E": int(table[m]["experts"]), "k": int(table[m]["top_k"])} for m in names], source


def _variants(E: int, k: int) -> list[tuple[str, dict]]:
    out = [("topk", {})]
    kg = 2 if k % 2 == 0 else 1
    if E % 4 == 0 and k // kg <= E // 4:
        out.append(("hierarchical", dict(routing="hierarchical", num_groups=4, topk_groups=kg)))
    return out


def run_load(configs: list[dict], device: str, quick: bool, H: int = 128, I: int = 64, T: int = 256
             ) -> tuple[list[dict], dict]:
    """Route ``batches`` batches per layer; ``(rows, facts)`` for the harness."""
    batches = 4 if quick else 16
    rows = []
    ceilings = measure_ceilings(device)
    for c in configs:
        E, k = c["E"], c["k"]
        for name, extra in _variants(E, k):
            torch.manual_seed(0)
            moe = mk.MoE(H, I, E, k, device=device, **extra)
            centers = torch.randn(8, H, device=device) * 2.0  # clusters of tokens: an uneven load
            g = torch.Generator(device="cpu").manual_seed(1)
            data = [centers[torch.randint(0, 8, (T,), generator=g)].to(device) + torch.randn(T, H, generator=g).to(device)
                    for _ in range(batches)]
            moe.run_stats.reset()
            with torch.no_grad():
                for x in data:
                    moe(x)
                st = moe.run_stats.stats()
                counts = moe.run_stats.tokens_per_expert.tolist()
                route_h = float(moe.run_stats.mean_entropy)
                p50, p20, p80 = time_fn(lambda: moe(data[0]), device, quick)
            flops = 2 * T * k * 3 * H * I  # the experts' GEMMs of one batch (gated)
            tflops = flops / (p50 / 1e3) / 1e12
            rows.append({
                "op": "MoE.run_stats", "model": c["model"], "shape": f"{c['model']} E{E} k{k} {name} T{T}x{batches} H{H}",
                "T": T * batches, "H": H, "I": I, "E": E, "k": k, "dtype": "float32", "backend": name, "kind": "layer",
                "median_ms": sig(p50), "p20_ms": sig(p20), "p80_ms": sig(p80), "flops": flops, "bytes": 0,
                "tflops": sig(tflops), "gbps": 0.0, "bound": "compute", "frac_ceiling": sig(tflops / ceilings["matmul_tflops"]),
                "err_vs_ref": None, "note": "one batch, statistics on",
                "imbalance": sig(float(st.imbalance), 4), "load_entropy": sig(float(st.load_entropy), 4),
                "max_entropy": sig(math.log(E), 4), "route_entropy": sig(route_h, 4), "tokens_per_expert": counts,
            })
    facts = {"quick": quick, "backends": sorted({r["backend"] for r in rows}), "ceilings": ceilings,
             "notes": [f"synthetic clustered tokens, H={H} I={I} (scaled down), real E and top_k; "
                       "load H: entropy of the load over experts (log E when even); route H: mean per-token routing entropy"]}
    return rows, facts


def plot(rows: list[dict], path: Path) -> str:
    """One bar chart per layer: share of the routed slots per expert, against the even share 1/E."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        counts = r["tokens_per_expert"]
        total = max(sum(counts), 1)
        ax.bar(range(len(counts)), [n / total for n in counts], width=1.0, color="tab:blue")
        ax.axhline(1 / len(counts), color="tab:red", linestyle="--", linewidth=1, label="even load 1/E")
        ax.set(xlim=(-0.5, len(counts) - 0.5), xlabel="expert", ylabel="share of slots",
               title=f"{r['model']} ({r['backend']}): imbalance {r['imbalance']:.3g}, load entropy "
                     f"{r['load_entropy']:.3g} of {r['max_entropy']:.3g} nats, routing entropy {r['route_entropy']:.3g}")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
