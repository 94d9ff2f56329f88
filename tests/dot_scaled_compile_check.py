"""Compile the MXFP4 ``tl.dot_scaled`` GEMMs for sm_100a as they launch, without a GPU: gpt-oss-120b's fused MoE
(decode and prefill) on meta tensors with the configs of sm_100 (``MOE_KERNELS_ASSUME_DEVICE``), each launch
recorded by the one launch path and specialised by Triton's own JIT binder, for both activation sides of
``DOT_SCALED`` (``bf16`` and ``mxfp8``). Prints the MMA instructions, shared memory, registers, stack and spilled bytes; exits 1 on a failure.
Run without TRITON_INTERPRET:

    python tests/dot_scaled_compile_check.py [name-substring]     # e.g. "gemm1"
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["MOE_KERNELS_ASSUME_DEVICE"] = "sm_100"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.triton_kernels import _launch, wna16_gemm  # noqa: E402
from triton_compile_check import _bin, _spill_bytes, specialise  # noqa: E402

CC = 100
H, I, E, K_TOP = 2880, 2880, 128, 4  # gpt-oss-120b
TOKENS = {"decode": 16, "prefill": 4096}


def _meta_mx(N, K):
    return mk.QuantizedWeight(data=torch.empty(E, N, K // 2, dtype=torch.uint8, device="meta"),
                              scale=torch.empty(E, N, K // 32, dtype=torch.uint8, device="meta"), fmt="mxfp4",
                              group_size=32)


def records(T: int) -> list:
    x = torch.empty(T, H, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(T, K_TOP, dtype=torch.int32, device="meta")
    w = torch.empty(T, K_TOP, dtype=torch.float32, device="meta")
    b13, b2 = torch.empty(E, 2 * I, device="meta"), torch.empty(E, H, device="meta")
    with _launch.record(op="fused_moe mxfp4") as rec:
        mk.fused_moe(x, _meta_mx(2 * I, H), _meta_mx(H, I), w, ids, activation="swiglu_oai", w13_bias=b13, w2_bias=b2,
                     backend="triton")
    return [r for r in rec if r.kernel is wna16_gemm.wna16_grouped_gemm_kernel]


def usage(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` of a compiled kernel (Triton's bundled cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def main(pattern: str = "") -> int:
    limit = _launch.TARGETS["sm_100"].smem_per_block
    failed = 0
    for side in ("bf16", "mxfp8"):
        os.environ[wna16_gemm.MX_DOT_ENV] = side
        for phase, T in TOKENS.items():
            for gemm, rec in zip(("gemm1", "gemm2"), records(T)):
                if pattern not in f"{side} {phase} {gemm}":
                    continue
                signature, constexprs, attrs, options = specialise(rec, CC)
                mode = next(v for k, v in constexprs.items() if rec.kernel.arg_names[k[0]] == "DOT_SCALED")
                src = ASTSource(fn=rec.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                c = triton.compile(src, target=GPUTarget("cuda", CC, 32), options=options)
                ptx = c.asm["ptx"]
                mma = sorted(set(re.findall(r"tcgen05\.mma[\w.:]*", ptx)))
                want = "kind::mxf8f6f4.block_scale" if side == "mxfp8" else "kind::f16"
                regs, stack = usage(c.asm["cubin"])
                spill = _spill_bytes(ptx, CC) if stack else 0  # a stack frame need not be a spill
                problems = [p for p, bad in ((f"DOT_SCALED={mode}", mode != wna16_gemm.DOT_SCALED_MODES[side]),
                                             (f"no tcgen05.mma {want}", not any(want in m for m in mma)),
                                             (f"shared {c.metadata.shared} > {limit}", c.metadata.shared > limit),
                                             (f"{spill} B spilled", spill != 0))
                            if bad]
                failed += bool(problems)
                tiles = {rec.kernel.arg_names[k[0]]: v for k, v in constexprs.items()
                         if rec.kernel.arg_names[k[0]].startswith("BLOCK_")}
                print(f"{'FAILED' if problems else 'ok    '} {side} {phase} {gemm} {tiles}: shared {c.metadata.shared} B "
                      f"(limit {limit}), regs {regs} stack {stack} spill {spill}, mma {mma}{'; ' + '; '.join(problems) if problems else ''}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
