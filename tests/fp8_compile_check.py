"""Compile the FP8 grouped GEMM as it really launches, for sm_90a and sm_80, without a GPU.

The launcher runs on meta tensors of model shapes with a launch hook that records (kernel, arguments,
constexprs, warps, stages) instead of launching; each record is compiled with the JIT's launch-time
specialisation (ints equal to 1 become constants, ints divisible by 16 and the pointers get
``tt.divisibility=16``). Printed per case: the MMA instruction and its operand types, shared memory against
the architecture's limit, registers and spills. Run without TRITON_INTERPRET:

    python tests/fp8_compile_check.py [name-substring]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moe_kernels.quant import quantize  # noqa: E402,F401
from moe_kernels.triton_kernels import fp8_gemm  # noqa: E402

PTR = {torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e5m2: "*fp8e5", torch.bfloat16: "*bf16", torch.float16: "*fp16",
       torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}


class Recorder:
    """``launch=recorder``: ``recorder(kernel)[grid](*args, **kwargs)`` stores the call instead of running it."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: rec.calls.append((kernel, args, kwargs))

        return _Grid()


def compile_call(kernel, args, kwargs, capability: int):
    sig, consts, attrs = {}, {}, {}
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in opts})
    for i, name in enumerate(kernel.arg_names):
        v = values[name]
        if i in kernel.constexprs:
            sig[name] = "constexpr"
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = PTR[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or v is None:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)


def resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return f"regs {m.group(1)} stack {m.group(2)}" if m else ""


# (name, model shape (H, I, E, k), tokens, layout, capability)
CASES = [
    ("deepseek-v3 prefill block128 sm90", (7168, 2048, 256, 8), 4096, "block", 90),
    ("mixtral prefill per-tensor sm90", (4096, 14336, 8, 2), 4096, "tensor", 90),
    ("qwen3-30b prefill per-channel sm90", (2048, 768, 128, 8), 4096, "channel", 90),
    ("qwen3-30b decode block128 sm90", (2048, 768, 128, 8), 8, "block", 90),
    ("mixtral prefill weight-only sm80", (4096, 14336, 8, 2), 4096, "tensor", 80),
    ("deepseek-v3 prefill block128 weight-only sm80", (7168, 2048, 256, 8), 4096, "block", 80),
]


def weight(E, N, K, layout):
    data = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device="meta")
    if layout == "block":
        return data, torch.empty(E, -(-N // 128), -(-K // 128), device="meta"), 128, 128
    if layout == "channel":
        return data, torch.empty(E, N, 1, device="meta"), 1, K
    return data, torch.empty(E, 1, 1, device="meta"), N, K


def record_moe(H, I, E, k, T, layout, capability):
    """Both GEMMs of the FP8 fused MoE at these shapes, configs of ``capability``."""
    rec = Recorder()
    meta = dict(device="meta")
    empty = lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    P = T * k
    hidden = torch.empty(T, H, dtype=torch.bfloat16, **meta)
    offsets = torch.empty(E + 1, dtype=torch.int32, **meta)
    slots = torch.empty(P, dtype=torch.int32, **meta)
    w13, s13, bn13, bk13 = weight(E, 2 * I, H, layout)
    w2, s2, bn2, bk2 = weight(E, H, I, layout)
    tgt = fp8_gemm.TARGETS[f"sm_{capability}"]
    mode = "none" if capability < 89 else {"block": "group", "channel": "token", "tensor": "tensor"}[layout]
    out_amax = mode if mode in ("token", "tensor") else ""
    cfg1 = fp8_gemm.default_config(P, I, H, E, 2, True, 128 if layout == "block" else None, tgt)
    h, a2 = fp8_gemm.fp8_grouped_gemm(hidden, w13, s13, bn13, bk13, offsets, None, slots, mode, None, gather_top_k=k,
                                      activation="silu", gated=True, out_amax=out_amax, config=cfg1,
                                      weight_bits=capability < 89, launch=rec, empty=empty)
    cfg2 = fp8_gemm.default_config(P, H, I, E, 2, False, 128 if layout == "block" else None, tgt)
    fp8_gemm.fp8_grouped_gemm(h, w2, s2, bn2, bk2, offsets, None, slots, mode, a2, row_weights=slots.float(),
                              scatter_slots=P, config=cfg2, weight_bits=capability < 89, launch=rec,
                              empty=empty)
    return [c for c in rec.calls if c[0] is fp8_gemm.fp8_grouped_gemm_kernel]


def main(pattern: str = "") -> int:
    failed = 0
    for name, (H, I, E, k), T, layout, capability in CASES:
        if pattern not in name:
            continue
        limit = fp8_gemm.TARGETS[f"sm_{capability}"].smem_per_block
        for gemm, (kernel, args, kwargs) in zip(("gemm1", "gemm2"), record_moe(H, I, E, k, T, layout, capability)):
            label = f"{name} {gemm} (BM={kwargs['BLOCK_M']} BN={kwargs['BLOCK_N']} BK={kwargs['BLOCK_K']} " \
                    f"warps={kwargs['num_warps']} stages={kwargs['num_stages']})"
            try:
                c = compile_call(kernel, args, kwargs, capability)
            except Exception as exc:  # report every case, then fail
                failed += 1
                print(f"FAILED  {label}: {exc.__class__.__name__}: {str(exc)[:1500]}")
                continue
            ptx = c.asm["ptx"]
            mma = sorted(set(re.findall(r"(wgmma\.mma_async[.\w]*|mma\.sync[.\w]*)", ptx)))
            shared = c.metadata.shared
            problems = []
            stack = re.search(r"stack (\d+)", resources(c.asm["cubin"]))
            if stack and int(stack.group(1)) > 0:
                problems.append("register spills")
            if shared > limit:
                problems.append(f"shared {shared} B > {limit} B")
            if capability >= 90 and T >= 1024 and not any("wgmma" in m and "e4m3" in m for m in mma):
                problems.append("no wgmma with e4m3 operands")
            if capability == 80 and not any("mma.sync" in m and "bf16" in m for m in mma):
                problems.append("no bf16 mma.sync")
            status = "ok     " if not problems else "FAILED "
            failed += bool(problems)
            print(f"{status} {label}: shared {shared} B (limit {limit}), {resources(c.asm['cubin'])}, "
                  f"mma {mma[:2]}{'; ' + '; '.join(problems) if problems else ''}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
