"""Compile table of the GEMM-path kernels for a GPU target, without a GPU.

The real launchers run on meta tensors at a model's shapes with a launch hook that records every
launch (kernel, arguments, constexprs, warps, stages) instead of running it; each distinct record is
then compiled as the JIT would specialise it at launch (ints equal to 1 become constants, ints
divisible by 16 and the tensors, 16-byte aligned on a GPU, get ``tt.divisibility=16``), and the table
reports shared memory (against the target's limit), registers, spills and the instructions that matter:
``wgmma.mma_async`` (Hopper MMA), ``mma.sync`` (Ampere MMA), ``cp.async`` (pipelined loads),
``cp.async.bulk.tensor`` (TMA).

    python -m bench.compile_table [--arch sm_90|sm_80|sm_86|sm_89] [--model mixtral-8x7b] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

ARCH_CC = {"sm_90": 90, "sm_80": 80, "sm_86": 86, "sm_89": 89}
_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
       torch.float8_e4m3fn: "fp8e4nv"}


class Recorder:
    """``launch=`` hook of the launchers: ``recorder(kernel)[grid](*args, **kwargs)`` records, runs nothing."""

    def __init__(self):
        self.records = []
        self.label = ""  # what the next launches are for (set by the caller)

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    rec.records.append((kernel, grid, args, kwargs, rec.label))
                return run

        return _Grid()


def _specialise(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch, as the JIT would build them."""
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(kernel.arg_names, args))
    bound.update(kwargs)
    sig, consts, attrs = {}, {}, {}
    declared = {kernel.arg_names[p.num] for p in kernel.params if p.is_constexpr}
    for i, name in enumerate(kernel.arg_names):
        v = bound[name]
        if name in declared:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TL[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v is None:
            sig[name], consts[name] = "constexpr", None
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {name} of type {type(v).__name__}")
    return sig, consts, attrs, opts


def _resources(cubin: bytes) -> tuple[int, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.findall(r"(?:STACK|LOCAL):(\d+)", out)
    return int(regs.group(1)) if regs else -1, max((int(s) for s in spill), default=0)


def compile_records(records, cc: int):
    """One row per distinct launch: name, key constexprs, smem, regs, spills and instruction flags."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows, seen = [], set()
    for kernel, grid, args, kwargs, label in records:
        sig, consts, attrs, opts = _specialise(kernel, args, dict(kwargs))
        key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())), tuple(sorted(sig.items())),
               tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", cc, 32), options=opts)
        ptx = compiled.asm["ptx"]
        regs, spills = _resources(compiled.asm["cubin"])
        tiles = {k: v for k, v in consts.items() if k.startswith("BLOCK") or k in ("GROUP_M", "PERSISTENT", "NUM_PROGS")}
        rows.append(dict(kernel=kernel.fn.__name__, label=label, grid=grid[0] if isinstance(grid, tuple) else grid, tiles=tiles,
                         warps=opts.get("num_warps", 4), stages=opts.get("num_stages", 3), smem=compiled.metadata.shared,
                         regs=regs, spills=spills, wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx,
                         cp_async="cp.async.cg" in ptx or "cp.async.ca" in ptx, tma="cp.async.bulk.tensor" in ptx))
    return rows


def fused_moe_records(T: int, H: int, I: int, E: int, k: int, dtype=torch.bfloat16, bias=False, on_input=False):
    """The launches of the fused MoE forward and training backward at these shapes (meta tensors)."""
    from moe_kernels.triton_kernels import combine, grouped_gemm as gg, plan, tiles

    rec = Recorder()
    meta = dict(device="meta")
    kw = dict(launch=rec, empty=lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    x = torch.empty(T, H, dtype=dtype, **meta)
    w13 = torch.empty(E, 2 * I, H, dtype=dtype, **meta)
    w2 = torch.empty(E, H, I, dtype=dtype, **meta)
    ids = torch.empty(T, k, dtype=torch.int32, **meta)
    wf = torch.empty(T * k, dtype=torch.float32, **meta)
    b13 = torch.empty(E, 2 * I, dtype=dtype, **meta) if bias else None
    b2 = torch.empty(E, H, dtype=dtype, **meta) if bias else None
    bm = tiles.fused_block_m(T * k, E, dtype, x.device, I, H)
    rec.label = "plan"
    slots, offsets, _, s2r, sched = plan.plan_schedule(ids, E, 1, None, None, bm, **kw)
    rec.label = "fwd GEMM1"
    a = gg.grouped_gemm(x, w13, offsets, b13, slots, True, gather_top_k=k, activation="silu", gated=True,
                        row_weights=wf if on_input else None, scale_input=True, schedule=sched, **kw)
    rec.label = "fwd GEMM2"
    ys = gg.grouped_gemm(a, w2, offsets, b2, slots, True, row_weights=wf, scatter_slots=T * k, schedule=sched, **kw)
    rec.label = "combine"
    combine.combine(ys, s2r, k, **kw)
    rec.label = "bwd GEMM1 (recompute)"
    h = gg.grouped_gemm(x, w13, offsets, b13, slots, True, gather_top_k=k, schedule=sched, **kw)
    rec.label = "bwd dA + act bwd"
    dh, a, parts = gg.grouped_gemm(x, w2, offsets, None, slots, False, gather_top_k=k, activation="silu", gated=True,
                                   row_weights=wf, schedule=sched, act_grad_of=h, row_dots=True, bias_dot=b2, **kw)
    rec.label = "bwd dX"
    gs = gg.grouped_gemm(dh, w13, offsets, None, slots, False, slot_top_k=k, scatter_slots=T * k, schedule=sched, **kw)
    rec.label = "combine + dw"
    combine.combine(gs, s2r, k, parts, **kw)
    rec.label = "bwd dW13"
    gg.grouped_wgrad(dh, x, offsets, slots, gather_top_k=k, gather_b=True, row_weights=wf, bias_a=bias, **kw)
    rec.label = "bwd dW2"
    gg.grouped_wgrad(x, a, offsets, slots, gather_top_k=k, gather_a=True, row_weights=wf, scale_a=True, bias_a=bias, **kw)
    return rec.records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sm_90", choices=sorted(ARCH_CC))
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--filter", default="grouped", help="kernel-name substring to compile")
    a = p.parse_args(argv)
    os.environ["MOE_KERNELS_ASSUME_DEVICE"] = a.arch
    from .shapes import load_models

    m = load_models()[0][a.model]
    records = [r for r in fused_moe_records(a.tokens, m["hidden"], m["intermediate"], m["experts"], m["top_k"])
               if a.filter in r[0].fn.__name__]
    from moe_kernels.triton_kernels._launch import TARGETS

    limit = TARGETS[a.arch].smem_per_block
    print(f"{a.model} T={a.tokens} on {a.arch} (shared memory limit {limit} B); compiled, never run")
    print(f"{'launch':22} {'tiles':58} {'w':>2} {'st':>2} {'smem':>7} {'regs':>4} {'spill':>5} wgmma mma cp.async tma")
    bad = 0
    for r in compile_records(records, ARCH_CC[a.arch]):
        tiles = " ".join(f"{k.replace('BLOCK_', '')}={int(v)}" for k, v in r["tiles"].items())
        ok = r["smem"] <= limit and r["spills"] == 0
        bad += not ok
        print(f"{r['label']:22} {tiles:58} {r['warps']:>2} {r['stages']:>2} {r['smem']:>7} {r['regs']:>4} {r['spills']:>5} "
              f"{'yes' if r['wgmma'] else '-':>5} {'yes' if r['mma'] else '-':>3} {'yes' if r['cp_async'] else '-':>8} "
              f"{'yes' if r['tma'] else '-':>3}{'' if ok else '  <-- over the limit or spilling'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
