"""FLOP and byte counts of every benchmarked op: ``op(shape) -> (flops, bytes)``.

Bytes are the compulsory traffic of an ideal kernel (each input read once, each output written
once, intermediates of fused ops kept on chip), so ``bytes / time`` is an effective bandwidth.
FLOPs count the matmuls only (2 per multiply-add); elementwise work is left out.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .shapes import Shape

I32, F32 = 4, 4


def _es(s: Shape) -> int:
    return s.dtype.itemsize


def _slots(s: Shape) -> int:
    return s.T * s.k


def _expert_weights(s: Shape) -> int:
    """Elements of w13 [E, I2, H] and w2 [E, H, I], plus biases."""
    n = s.E * (s.I2 * s.H + s.H * s.I)
    return n + (s.E * (s.I2 + s.H) if s.cfg.get("bias") else 0)


def _expert_flops(s: Shape) -> int:
    return 2 * _slots(s) * (s.I2 * s.H + s.H * s.I)


def gating_bytes(s: Shape, logits_bytes: int = F32, stats: bool = False, bwd: bool = False) -> int:
    """logits [T, E] in (+ correction bias [E] fp32); weights [T, k] fp32 and ids [T, k] int32 out;
    ``stats``: counts [E] int32 and score sums [E] fp32 out too; ``bwd``: then grad_weights [T, k] and
    ids in, logits read again and grad_logits [T, E] written."""
    n = s.T * s.E * logits_bytes + _slots(s) * (F32 + I32) + (s.E * F32 if s.cfg.get("correction_bias") else 0)
    n += s.E * (I32 + F32) if stats else 0
    return n + (_slots(s) * (F32 + I32) + 2 * s.T * s.E * logits_bytes if bwd else 0)


def expert_choice_bytes(s: Shape, capacity: int) -> int:
    # logits [T, E] in; weights [E, C] fp32 and token_ids [E, C] int32 out
    return s.T * s.E * _es(s) + s.E * capacity * (F32 + I32)


def topk_gating(s: Shape) -> tuple[int, int]:
    # the layer's logits are fp32 whatever the layer's dtype
    return 0, gating_bytes(s, F32)


def plan_routing(s: Shape) -> tuple[int, int]:
    # ids [T, k] in; sorted_slots [P], offsets [E+1], tokens [E], slot_to_row [S] out (P = S)
    return 0, _slots(s) * I32 + _slots(s) * I32 + (2 * s.E + 1) * I32 + _slots(s) * I32


def permute(s: Shape) -> tuple[int, int]:
    # x [T, H] in; x_sorted [P, H] out; sorted_slots [P] in
    return 0, s.T * s.H * _es(s) + _slots(s) * (s.H * _es(s) + I32)


def unpermute(s: Shape) -> tuple[int, int]:
    # y_sorted [P, H] in, weights [T, k] and slot_to_row [S] in; y [T, H] out
    return 2 * _slots(s) * s.H, _slots(s) * (s.H * _es(s) + F32 + I32) + s.T * s.H * _es(s)


def grouped_gemm(s: Shape) -> tuple[int, int]:
    # x_sorted [P, H] @ w13[e].T -> [P, I2]
    S, es = _slots(s), _es(s)
    return 2 * S * s.H * s.I2, (S * s.H + s.E * s.I2 * s.H + S * s.I2) * es + (s.E + 1) * I32


def fused_moe_fwd(s: Shape) -> tuple[int, int]:
    # hidden [T, H] in, expert weights in, routing [T, k] in, out [T, H]
    return _expert_flops(s), (2 * s.T * s.H + _expert_weights(s)) * _es(s) + _slots(s) * (F32 + I32)


def fused_moe_fwd_bwd(s: Shape) -> tuple[int, int]:
    # backward: data grad and weight grad each cost a forward's matmuls; weights read again and
    # their grads written, grad_out read and grad_hidden written
    flops, bytes_ = fused_moe_fwd(s)
    return 3 * flops, bytes_ + (2 * _expert_weights(s) + 2 * s.T * s.H) * _es(s) + _slots(s) * F32


# ----- quantized expert weights: the bytes a kernel must read -------------------------------------------

QUANT_FORMATS = {  # bench row suffix -> (moe_kernels.quantize fmt, its keywords)
    "fp8_tensor": ("fp8", {}), "fp8_block": ("fp8", {"block_shape": (128, 128)}),
    "int8": ("int8", {}), "int4": ("int4", {}), "mxfp4": ("mxfp4", {}),
}
WEIGHT_ONLY = ("int8", "int4", "mxfp4")
# the weight-only rows run for these models (every model gets the fp8 rows)
WEIGHT_ONLY_MODELS = {"int8": ("mixtral-8x7b", "qwen3-30b-a3b"), "int4": ("mixtral-8x7b", "qwen3-30b-a3b"),
                      "mxfp4": ("mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b")}


def quant_rows(model: str) -> tuple[str, ...]:
    """The quantized-weight row suffixes of ``model`` (see :data:`WEIGHT_ONLY_MODELS`)."""
    return ("fp8_tensor", "fp8_block") + tuple(f for f, ms in WEIGHT_ONLY_MODELS.items() if model in ms)


def int4_group(K: int) -> int:
    """The group ``moe_kernels.quantize(w, "int4")`` picks by default for K columns."""
    return 128 if K % 128 == 0 else 64 if K % 64 == 0 else 32


def quant_unsupported(name: str, N: int, K: int) -> str | None:
    """Why weights ``[E, N, K]`` cannot be held in format ``name``, or None."""
    if name in ("int4", "mxfp4") and K % 32:
        return f"{name} needs K divisible by 32, got K={K}"
    return None


def weight_bytes(name: str | None, N: int, K: int, es: int) -> int:
    """Bytes of one expert's ``[N, K]`` weight in format ``name`` (None: dense, ``es`` bytes an element), scales
    included: fp8 one byte an element (+ fp32 scale per tensor / per 128x128 block); int8 one byte (+ fp32 per
    channel); int4 half a byte (+ fp32 per group, :func:`int4_group`); mxfp4 half a byte (+ one e8m0 byte per 32)."""
    if name is None:
        return N * K * es
    if name == "fp8_tensor":
        return N * K + F32
    if name == "fp8_block":
        return N * K + F32 * -(-N // 128) * -(-K // 128)
    if name == "int8":
        return N * K + F32 * N
    if name == "int4":
        return N * K // 2 + F32 * N * (K // int4_group(K))
    if name == "mxfp4":
        return N * K // 2 + N * (K // 32)
    raise ValueError(f"unknown weight format {name!r}; expected one of {tuple(QUANT_FORMATS)}")


def expert_bytes(s: Shape, name: str | None) -> int:
    """One expert's w13 and w2 (and biases, in the layer dtype) in format ``name``."""
    n = weight_bytes(name, s.I2, s.H, _es(s)) + weight_bytes(name, s.H, s.I, _es(s))
    return n + ((s.I2 + s.H) * _es(s) if s.cfg.get("bias") else 0)


def roofline(flops: int, nbytes: int, c: dict | None = None) -> float:
    """``max(FLOPs / peak, bytes / bandwidth)`` in ms at ``c`` (default: the documented H200 ceilings)."""
    c = c or H200
    return max(flops / (c["tflops"] * 1e12), nbytes / (c["tbps"] * 1e12)) * 1e3


def _dense_extra(s: Shape) -> tuple[int, int]:
    """Router (fp32) and shared expert of the layer: (flops, bytes)."""
    rows = 3 if s.gated else 2
    flops = 2 * s.T * s.H * s.E + 2 * s.T * rows * s.H * s.shared_I
    bytes_ = s.E * s.H * F32 + rows * s.H * s.shared_I * _es(s) + s.T * s.E * F32
    return flops, bytes_


def layer_fwd(s: Shape) -> tuple[int, int]:
    f, b = fused_moe_fwd(s)
    df, db = _dense_extra(s)
    return f + df, b + db


def layer_fwd_bwd(s: Shape) -> tuple[int, int]:
    f, b = fused_moe_fwd_bwd(s)
    df, db = _dense_extra(s)
    return f + 3 * df, b + 3 * db


COSTS = {
    "topk_gating": topk_gating,
    "plan_routing": plan_routing,
    "permute": permute,
    "unpermute": unpermute,
    "grouped_gemm": grouped_gemm,
    "fused_moe.fwd": fused_moe_fwd,
    "fused_moe.fwd+bwd": fused_moe_fwd_bwd,
    "MoE.fwd": layer_fwd,
    "MoE.fwd+bwd": layer_fwd_bwd,
}


# ----- account of the fused paths: a model, not a measurement ----------------------------------------
#
# Per launch of a fused path: GEMM FLOPs executed (row tiles padded to BLOCK_M) against the minimum, and
# HBM bytes modelled from the tile order. The model: the GPU runs the grid in waves of
# ``W = SMs x resident programs`` consecutive tiles (program-id order: the kernel's GROUP_M order, or
# m-tile fastest for the order before it); the programs of a wave advance through K together, so L2
# serves every re-read *within* a wave and each distinct A row-block and weight tile of a wave is read
# from HBM once; across waves L2 is an LRU of such blocks (each over the whole K) of the L2's size.
# Outputs are written once. Roofline time per launch: max(FLOPs / peak, bytes / copy bandwidth) at the
# documented H200 ceilings (about 790 TFLOP/s bf16 dense, 4.3 TB/s), or measured ones; launch and
# tail effects are not modelled.

H200 = {"name": "H200 (documented)", "tflops": 790.0, "tbps": 4.3, "sms": 132, "l2_bytes": 50 * 2**20}


def _tiles_in_order(m_tiles: int, n_tiles: int, group_m: int):
    """(m, n) of every tile in program-id order: GROUP_M groups of m-tiles, n inside (group_m=0: m fastest)."""
    if group_m <= 0:
        return [(t % m_tiles, t // m_tiles) for t in range(m_tiles * n_tiles)]
    out = []
    for first in range(0, m_tiles, group_m):
        size = min(group_m, m_tiles - first)
        out += [(first + i % size, i // size) for i in range(size * n_tiles)]
    return out


class _L2:
    """LRU model of L2: blocks (an A row-block or a weight tile over the whole K) by key and size."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.blocks = capacity, 0, OrderedDict()

    def touch(self, key, size: int) -> int:
        """HBM bytes of reading block ``key``: 0 on a hit, ``size`` on a miss (which evicts the oldest)."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return 0
        self.blocks[key] = size
        self.used += size
        while self.used > self.capacity and len(self.blocks) > 1:
            self.used -= self.blocks.popitem(last=False)[1]
        return size


def gemm_hbm_bytes(rows: list[int], N: int, K: int, bm: int, bn: int, es: int, *, n_w: int = 1, group_m: int = 8,
                   wave: int = 132, l2_bytes: int = H200["l2_bytes"], w_es: float | None = None) -> int:
    """Modelled HBM bytes of the A rows and weight tiles one grouped GEMM launch reads (outputs not included):
    ``rows`` per expert, weights ``[E, n_w * N, K]`` of ``w_es`` bytes an element (default ``es``; packed
    formats: fractional, scales included); ``group_m=0``: the m-tile-fastest order."""
    w_es = es if w_es is None else w_es
    m_rows = [(e, min(bm, r - i)) for e, r in enumerate(rows) for i in range(0, r, bm)]  # (expert, rows) per m-tile
    order = _tiles_in_order(len(m_rows), -(-N // bn), group_m)
    l2, n = _L2(l2_bytes), 0
    for start in range(0, len(order), wave):
        tiles = order[start:start + wave]
        for m in dict.fromkeys(m for m, _ in tiles):
            n += l2.touch(("a", m), m_rows[m][1] * K * es)
        for key in dict.fromkeys((m_rows[m][0], nt) for m, nt in tiles):
            n += l2.touch(("w",) + key, int(n_w * min(bn, N) * K * w_es))
    return n


def wgrad_hbm_bytes(rows: list[int], A: int, B: int, ba: int, bb: int, es: int, *, group_a: int = 8, wave: int = 132,
                    l2_bytes: int = H200["l2_bytes"]) -> int:
    """Modelled bytes the dW kernel reads: tiles (expert, a-tile, b-tile) expert-major, GROUP_A a-tiles per
    group with the b-tiles inside; the blocks are an expert's rows of one a-tile or b-tile of columns."""
    na, nb = -(-A // ba), -(-B // bb)
    order = [(e, i, j) for e in range(len(rows)) if rows[e] for i, j in _tiles_in_order(na, nb, group_a)]
    l2, n = _L2(l2_bytes), 0
    for start in range(0, len(order), wave):
        tiles = order[start:start + wave]
        for e, i in dict.fromkeys((e, i) for e, i, _ in tiles):
            n += l2.touch(("a", e, i), rows[e] * min(ba, A) * es)
        for e, j in dict.fromkeys((e, j) for e, _, j in tiles):
            n += l2.touch(("b", e, j), rows[e] * min(bb, B) * es)
    return n


def _gemm_launch(name, rows, N, K, es, kernel, E, arch, out_bytes, extra_bytes=0, n_w=1, group_m=None, fmt=None,
                 **epilogue):
    from moe_kernels.triton_kernels import tiles, wna16_gemm

    t = tiles._launch.TARGETS[arch]
    smem, sms = t.smem_per_block, t.sm_count
    M = sum(rows)
    w_es = weight_bytes(fmt, N, K, es) / (N * K) if fmt else None
    if fmt in WEIGHT_ONLY:  # the weight-only kernel: its own tiles, GROUP_M order from the L2 size
        bits = 8 if fmt == "int8" else 4
        group = 0 if fmt == "int8" else 32 if fmt == "mxfp4" else int4_group(K)
        cfg = wna16_gemm.default_config(M, N, K, E, es, bits, n_w == 2, group, t, fmt)
        per_prog = wna16_gemm.smem_bytes(cfg, es, bits, n_w == 2)
        g = int(tiles.group_m(cfg["BLOCK_M"], K, es, tiles.L2.get(arch, tiles.L2["sm_86"])))
    else:
        cfg = tiles.gemm_config(kernel, M, N, K, E, {2: torch.bfloat16, 4: torch.float32}[es], torch.device("meta"),
                                **epilogue)  # the epilogue's tile adjustments (tiles._fit_epilogue)
        per_prog = tiles.smem_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], es, n_w)
        g = cfg["GROUP_M"]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    wave = sms * max(1, min(4, smem // per_prog))
    g = g if group_m is None else group_m
    executed = 2 * sum(-(-r // bm) * bm for r in rows) * n_w * N * K
    return dict(launch=name, tile=f"{bm}x{bn}", flops=executed, min_flops=2 * M * n_w * N * K,
                bytes=gemm_hbm_bytes(rows, N, K, bm, bn, es, n_w=n_w, group_m=g, wave=wave, w_es=w_es) + out_bytes
                + extra_bytes)


def _wgrad_launch(name, rows, A, B, es, arch, bias_bytes=0):
    from moe_kernels.triton_kernels import tiles

    sms = tiles._launch.TARGETS[arch].sm_count
    E = len(rows)
    cfg = tiles.wgrad_config(A, B, {2: torch.bfloat16, 4: torch.float32}[es], torch.device("meta"), sum(rows) // E)
    return dict(launch=name, tile=f"{cfg['BLOCK_A']}x{cfg['BLOCK_B']}", flops=2 * sum(rows) * A * B,
                min_flops=2 * sum(rows) * A * B,
                bytes=wgrad_hbm_bytes(rows, A, B, cfg["BLOCK_A"], cfg["BLOCK_B"], es, group_a=cfg["GROUP_A"], wave=sms)
                + E * A * B * es + bias_bytes)


def fused_account(s: Shape, path: str, *, arch: str = "sm_90", rows: list[int] | None = None,
                  group_m: int | None = None, fmt: str | None = None) -> list[dict]:
    """The launches of one fused path (``fwd``, ``bwd``: recompute, ``bwd_saved``: save_preactivation) on
    ``arch`` with balanced routing (or ``rows`` per expert): ``[{launch, tile, flops, min_flops, bytes}]``.
    ``group_m=0`` models the GEMMs in the m-tile-fastest order instead of the kernel's GROUP_M order.
    ``fmt`` (forward only): expert weights in that format (:data:`QUANT_FORMATS`; the weight-only ones with the
    weight-only kernel's tiles, fp8 with the bf16 tiles and one byte a weight)."""
    if fmt is not None and path != "fwd":
        raise ValueError(f"fused_account: quantized experts are inference only, got path={path!r} with fmt={fmt!r}")
    import os

    old = os.environ.get("MOE_KERNELS_ASSUME_DEVICE")
    os.environ["MOE_KERNELS_ASSUME_DEVICE"] = arch
    try:
        S, H, I, E, es = _slots(s), s.H, s.I, s.E, _es(s)
        rows = rows or [S // E + (1 if e < S % E else 0) for e in range(E)]
        n_w = 2 if s.gated else 1
        g1 = "gemm_gated" if s.gated else "gemm"
        plan = [dict(launch=f"plan {n}", tile="", flops=0, min_flops=0, bytes=b) for n, b in
                (("histogram", S * I32), ("scan", 0), ("rank + schedule", S * I32 * 3))]
        out = list(plan)
        if path == "fwd":
            out.append(_gemm_launch("GEMM1 gather+act", rows, I, H, es, g1, E, arch, S * I * es, n_w=n_w, group_m=group_m,
                                    fmt=fmt))
            out.append(_gemm_launch("GEMM2 weight+scatter", rows, H, I, es, "gemm", E, arch, S * H * es, group_m=group_m,
                                    fmt=fmt))
            out.append(dict(launch="combine", tile="", flops=0, min_flops=0, bytes=S * H * es + s.T * H * es))
            return out
        if path == "bwd":
            out.append(_gemm_launch("GEMM1 recompute h", rows, n_w * I, H, es, "gemm", E, arch, S * n_w * I * es, group_m=group_m,
                                    bias=bool(s.cfg.get("bias")), gather=True))
        out.append(_gemm_launch("dA + act bwd + dots", rows, I, H, es, "gemm_act_bwd", E, arch,
                                S * (n_w + 1) * I * es + S * F32, extra_bytes=S * n_w * I * es, group_m=group_m,
                                activation=s.activation))
        out.append(_gemm_launch("dX scatter", rows, H, n_w * I, es, "gemm", E, arch, S * H * es, group_m=group_m))
        out.append(dict(launch="combine + dw", tile="", flops=0, min_flops=0, bytes=S * H * es + s.T * H * es + 2 * S * F32))
        out.append(_wgrad_launch("dW13 (+db13)", rows, n_w * I, H, es, arch))
        out.append(_wgrad_launch("dW2 (+db2)", rows, H, I, es, arch))
        return out
    finally:
        if old is None:
            os.environ.pop("MOE_KERNELS_ASSUME_DEVICE", None)
        else:
            os.environ["MOE_KERNELS_ASSUME_DEVICE"] = old


def roofline_ms(launches: list[dict], tflops: float = H200["tflops"], tbps: float = H200["tbps"]) -> float:
    """Sum over launches of max(compute, memory) time at the given ceilings, in ms (a model)."""
    return sum(max(r["flops"] / (tflops * 1e12), r["bytes"] / (tbps * 1e12)) for r in launches) * 1e3


PATHS = {"forward": "fwd", "backward": "bwd", "backward (save_preactivation)": "bwd_saved"}


def account_rows(s: Shape, arch: str = "sm_90", ceilings: dict | None = None, fmts: tuple[str, ...] = ()) -> list[dict]:
    """One row per fused path of ``s`` (decode is the forward at a small T), then one forward row per quantized
    format of ``fmts`` (bf16 activations): launches, GEMM FLOPs executed / minimum, modelled HBM bytes,
    roofline time at ``ceilings`` (``tflops``, ``tbps``; default H200)."""
    c = ceilings or H200
    F1 = 2 * _slots(s) * s.H * s.I2
    out = []
    runs = [(label, path, None) for label, path in PATHS.items()]
    runs += [(f"forward {f}", "fwd", f) for f in fmts if not quant_unsupported(f, s.I2, s.H)
             and not quant_unsupported(f, s.H, s.I)]
    for label, path, fmt in runs:
        launches = fused_account(s, path, arch=arch, fmt=fmt)
        flops = sum(r["flops"] for r in launches)
        minimum = 1.5 * F1 if path == "fwd" else 3.0 * F1
        m_fastest = fused_account(s, path, arch=arch, group_m=0, fmt=fmt)
        decode = f"decode {fmt}" if fmt else "decode"
        out.append(dict(model=s.model, T=s.T, path=(decode if path == "fwd" and s.T <= 64 else label),
                        launches=len(launches), gemm_f1=round(flops / F1, 2), vs_min_flops=round(flops / minimum, 3),
                        hbm_gb=round(sum(r["bytes"] for r in launches) / 1e9, 3),
                        hbm_gb_m_fastest=round(sum(r["bytes"] for r in m_fastest) / 1e9, 3),
                        model_ms=round(roofline_ms(launches, c["tflops"], c["tbps"]), 4)))
    return out


def print_account(shapes: list[Shape], arch: str = "sm_90", ceilings: dict | None = None,
                  quantized: bool = True) -> list[dict]:
    """Print (and return) :func:`account_rows` of every shape; ``quantized``: with the rows of the model's
    quantized formats (:func:`quant_rows`)."""
    c = ceilings or H200
    rows = [r for s in shapes for r in account_rows(s, arch, c, quant_rows(s.model) if quantized else ())]
    print(f"account of the fused paths on {arch}: a MODEL (waves of SMs x resident programs, reuse within a wave "
          f"through L2, roofline at {c['tflops']:.0f} TFLOP/s and {c['tbps']:.1f} TB/s), not a measurement")
    print("GEMM F1: tl.dot FLOPs executed (row tiles padded) / FLOPs of the first GEMM; vs min: executed / minimum "
          "(fwd 1.5 F1, bwd 3.0 F1); HBM GB (m-fastest): the same launches in the m-tile-fastest order")
    if quantized:
        print("decode/forward <fmt>: quantized experts with bf16 activations, packed weight bytes and scales read; "
              "int8/int4/mxfp4 on the weight-only kernel's tiles, fp8 on the bf16 tiles")
    print(f"{'model':16} {'T':>6} {'path':31} {'launches':>8} {'GEMM F1':>8} {'vs min':>7} {'HBM GB':>8} "
          f"{'(m-fastest)':>11} {'model ms':>9}")
    for r in rows:
        print(f"{r['model']:16} {r['T']:>6} {r['path']:31} {r['launches']:>8} {r['gemm_f1']:>8} {r['vs_min_flops']:>7} "
              f"{r['hbm_gb']:>8} {r['hbm_gb_m_fastest']:>11} {r['model_ms']:>9}")
    return rows
