"""``python -m bench tune``: tile configs of the Triton grouped GEMM for the model shapes, on this GPU.

For every model of models.json and every row count, times a small grid of candidate configs of the
two GEMMs of an MoE layer (``gemm_gated``: gather + gated activation, ``gemm``: weighted scatter)
and writes the fastest per row count to ``triton_kernels/configs/`` (see its ``configs.py``).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

TOKENS = (1, 8, 64, 512, 4096, 16384)
CANDIDATES = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st)
    for bm, bn, bk, wp, st in itertools.product((16, 32, 64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4))
    if not (bm == 128 and bn == 256 and bk == 128) and not (bm <= 32 and wp == 8)
]


def _problem(E, H, I, k, T, dtype, device):
    """Inputs of the two GEMMs of one layer with random routing: (gemm_gated args, gemm args)."""
    from moe_kernels import reference as ref

    ids = torch.randint(0, E, (T, k), device=device)
    slots, offsets, _, slot_to_row = ref.plan_routing(ids, E)
    x = torch.randn(T, H, device=device, dtype=dtype)
    w13 = torch.randn(E, 2 * I, H, device=device, dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, I, device=device, dtype=dtype) / I**0.5
    h = torch.randn(slots.shape[0], I, device=device, dtype=dtype)
    weights = torch.rand(T * k, device=device)
    gated = dict(x=x, w=w13, offsets=offsets, slots=slots, kw=dict(gather_top_k=k, activation="silu", gated=True))
    plain = dict(x=h, w=w2, offsets=offsets, slots=slots, kw=dict(row_weights=weights, scatter_slots=T * k))
    return gated, plain


def _time(problem, config):
    import triton.testing

    from moe_kernels.triton_kernels import grouped_gemm as gg

    def empty(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)

    def run():
        return gg.grouped_gemm(problem["x"], problem["w"], problem["offsets"], None, problem["slots"], True,
                               config=config, empty=empty, **problem["kw"])

    try:
        run()
    except Exception:  # a config the compiler rejects (e.g. out of shared memory)
        return float("inf")
    return triton.testing.do_bench(run, warmup=5, rep=20)


def run_tune(models: dict, tokens=TOKENS, dtype=torch.bfloat16, out_dir: Path | None = None, log=print) -> list[Path]:
    """Tune every model in ``models`` (name -> models.json entry); returns the files written."""
    from moe_kernels.triton_kernels import configs

    if not torch.cuda.is_available():
        sys.exit("bench tune: needs a GPU (tile configs are per device)")
    device = torch.device("cuda")
    out_dir = Path(out_dir or configs.CONFIG_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cfg in models.items():
        E, H, I, k = cfg["experts"], cfg["hidden"], cfg["intermediate"], cfg["top_k"]
        best = {"gemm_gated": {}, "gemm": {}}
        for T in tokens:
            gated, plain = _problem(E, H, I, k, T, dtype, device)
            for kernel, problem in (("gemm_gated", gated), ("gemm", plain)):
                times = [(_time(problem, c), c) for c in CANDIDATES]
                ms, c = min(times, key=lambda tc: tc[0])
                best[kernel][str(T * k)] = c
                log(f"{name} {kernel} T={T}: {ms * 1e3:.1f} us with {c}")
        for kernel, (N, K) in (("gemm_gated", (I, H)), ("gemm", (H, I))):
            path = out_dir / configs.config_file(kernel, E, N, K, dtype, configs.device_name(device)).name
            path.write_text(json.dumps(best[kernel], indent=1, sort_keys=True) + "\n")
            written.append(path)
    configs._load.cache_clear()
    return written
