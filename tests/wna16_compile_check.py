"""Compile the weight-only (int8 / int4 / mxfp4) grouped GEMM as it really launches, for sm_90a and sm_80,
without a GPU: the fused MoE's two GEMMs at model shapes run on meta tensors with the launch recorder of
``fp8_compile_check`` and each record is compiled with the JIT's launch-time specialisation. Printed per case:
the MMA instruction, shared memory against the architecture's limit, registers and spills. Run without
TRITON_INTERPRET:

    python tests/wna16_compile_check.py [name-substring]
"""

from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fp8_compile_check  # noqa: E402
from fp8_compile_check import Recorder, compile_call, resources  # noqa: E402
from moe_kernels.triton_kernels import fp8_gemm, wna16_gemm  # noqa: E402

fp8_compile_check.PTR.setdefault(torch.int8, "*i8")

# (name, model shape (H, I, E, k), tokens, fmt, group, zero points, capability)
CASES = [
    ("mixtral prefill int4 g128 zp sm90", (4096, 14336, 8, 2), 4096, "int4", 128, True, 90),
    ("qwen3-30b decode int4 g128 sm90", (2048, 768, 128, 8), 8, "int4", 128, False, 90),
    ("gpt-oss-120b decode mxfp4 sm90", (2880, 2880, 128, 4), 16, "mxfp4", 32, False, 90),
    ("mixtral prefill int8 per-channel sm80", (4096, 14336, 8, 2), 4096, "int8", 0, False, 80),
    ("qwen3-30b prefill mxfp4 sm80", (2048, 768, 128, 8), 2048, "mxfp4", 32, False, 80),
]


def weight(E, N, K, fmt, g, zp):
    meta = dict(device="meta")
    if fmt == "int8":
        data = torch.empty(E, N, K, dtype=torch.int8, **meta)
    else:
        data = torch.empty(E, N, K // 2, dtype=torch.uint8, **meta)
    sdt = torch.uint8 if fmt == "mxfp4" else torch.float32
    scale = torch.empty((E, N) if not g else (E, N, K // g), dtype=sdt, **meta)
    zero = torch.empty(E, N // 2, K // g, dtype=torch.uint8, **meta) if zp else None
    return data, scale, zero


def record_moe(H, I, E, k, T, fmt, g, zp, capability):
    rec = Recorder()
    empty = lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    P = T * k
    hidden = torch.empty(T, H, dtype=torch.bfloat16, device="meta")
    offsets = torch.empty(E + 1, dtype=torch.int32, device="meta")
    slots = torch.empty(P, dtype=torch.int32, device="meta")
    cap = fp8_gemm.TARGETS[f"sm_{capability}"]
    bits = 8 if fmt == "int8" else 4
    d13, s13, z13 = weight(E, 2 * I, H, fmt, g, zp)
    d2, s2, z2 = weight(E, H, I, fmt, g, zp)
    cfg1 = wna16_gemm.default_config(P, I, H, E, 2, bits, True, g, cap)
    h = wna16_gemm.wna16_grouped_gemm(hidden, d13, s13, z13, fmt, g, offsets, None, slots, gather_top_k=k,
                                      activation="silu", gated=True, config=cfg1, launch=rec, empty=empty)
    cfg2 = wna16_gemm.default_config(P, H, I, E, 2, bits, False, g, cap)
    wna16_gemm.wna16_grouped_gemm(h, d2, s2, z2, fmt, g, offsets, None, slots, row_weights=slots.float(),
                                  scatter_slots=P, config=cfg2, launch=rec, empty=empty)
    return [c for c in rec.calls if c[0] is wna16_gemm.wna16_grouped_gemm_kernel]


def main(pattern: str = "") -> int:
    failed = 0
    for name, (H, I, E, k), T, fmt, g, zp, capability in CASES:
        if pattern not in name:
            continue
        limit = fp8_gemm.TARGETS[f"sm_{capability}"].smem_per_block
        for gemm, (kernel, args, kwargs) in zip(("gemm1", "gemm2"), record_moe(H, I, E, k, T, fmt, g, zp, capability)):
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
            res = resources(c.asm["cubin"])
            problems = []
            stack = re.search(r"stack (\d+)", res)
            if stack and int(stack.group(1)) > 0:
                problems.append("register spills")
            if shared > limit:
                problems.append(f"shared {shared} B > {limit} B")
            if not any("bf16" in m for m in mma):
                problems.append("no bf16 tensor-core MMA")
            status = "ok     " if not problems else "FAILED "
            failed += bool(problems)
            print(f"{status} {label}: shared {shared} B (limit {limit}), {res}, mma {mma[:2]}"
                  f"{'; ' + '; '.join(problems) if problems else ''}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
