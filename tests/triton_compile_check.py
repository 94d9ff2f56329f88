"""Compile every Triton kernel of the package for a Hopper target (sm_90) with the real Triton
compiler, no GPU needed: catches what the interpreter accepts but the compiler rejects (non-constexpr
globals, loop-carried values changing shape, dtype mismatches). Run without TRITON_INTERPRET:

    python tests/triton_compile_check.py [name-substring]
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moe_kernels.triton_kernels import expert_choice, gating, grouped_gemm, lora, permute, plan  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def signature(kernel, types, consts):
    """Argument types by name: constexprs; ``*_ptr`` as given (fp32 by default); strides int64; ints int32."""
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


BF16_GEMM = {p: "*bf16" for p in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr")}
GEMM_INDEX = {"slots_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_row_ptr": "*i64", "offsets_ptr": "*i64",
              "num_tiles_ptr": "*i32"}
GEMM_FLAGS = dict(HAS_SLOTS=True, GATHER=False, SCATTER=False, IN_SCALE=False, OUT_SCALE=False, HAS_BIAS=False, ACT=0,
                  GATED=False, UPCAST=False, IEEE=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
PLAN_INDEX = {p: "*i32" for p in ("ids_ptr", "map_ptr", "rank_ptr", "hist_ptr", "base_ptr", "offsets_ptr", "rank_out_ptr",
                                  "slot_to_row_ptr", "sorted_slots_ptr")}

CASES = [
    ("topk_gating softmax", gating.topk_gating_kernel, {"logits_ptr": "*fp32", "ids_ptr": "*i32", "counts_part_ptr": "*i32",
                                                       "scaling": "fp32"},
     dict(HAS_BIAS=False, SCORING=0, RENORM=True, GROUPED=False, WITH_STATS=False,
          BLOCK_T=32, BLOCK_E=128, BLOCK_K=8, BLOCK_G=2)),
    ("topk_gating grouped+stats", gating.topk_gating_kernel, {"logits_ptr": "*bf16", "ids_ptr": "*i32",
                                                             "counts_part_ptr": "*i32", "scaling": "fp32"},
     dict(HAS_BIAS=True, SCORING=1, RENORM=True, GROUPED=True, WITH_STATS=True,
          BLOCK_T=16, BLOCK_E=256, BLOCK_K=8, BLOCK_G=8)),
    ("topk_gating backward", gating.topk_gating_backward_kernel, {"logits_ptr": "*bf16", "grad_logits_ptr": "*bf16",
                                                                 "ids_ptr": "*i32", "scaling": "fp32"},
     dict(SCORING=1, RENORM=True, HAS_GRAD_SUMS=True, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8)),
    ("topk_gating sqrtsoftplus grouped", gating.topk_gating_kernel, {"logits_ptr": "*fp16", "ids_ptr": "*i32",
                                                                   "counts_part_ptr": "*i32", "scaling": "fp32"},
     dict(HAS_BIAS=True, SCORING=2, RENORM=True, GROUPED=True, WITH_STATS=False,
          BLOCK_T=16, BLOCK_E=256, BLOCK_K=8, BLOCK_G=8)),
    ("topk_gating backward softmax", gating.topk_gating_backward_kernel, {"logits_ptr": "*fp32", "grad_logits_ptr": "*fp32",
                                                                         "ids_ptr": "*i32", "scaling": "fp32"},
     dict(SCORING=0, RENORM=True, HAS_GRAD_SUMS=True, BLOCK_T=32, BLOCK_E=128, BLOCK_K=8)),
    ("topk_gating backward sqrtsoftplus", gating.topk_gating_backward_kernel, {"logits_ptr": "*bf16",
                                                                              "grad_logits_ptr": "*bf16",
                                                                              "ids_ptr": "*i32", "scaling": "fp32"},
     dict(SCORING=2, RENORM=False, HAS_GRAD_SUMS=False, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8)),
    ("expert_choice", expert_choice.expert_choice_kernel, {"ids_ptr": "*i32"}, dict(SOFTMAX=True, BLOCK_C=256)),
    ("permute", permute.permute_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "slots_ptr": "*i32"},
     dict(HAS_WEIGHTS=True, BLOCK_R=4, BLOCK_H=1024)),
    ("unpermute", permute.unpermute_kernel, {"y_ptr": "*bf16", "out_ptr": "*bf16", "slot_to_row_ptr": "*i32"},
     dict(HAS_WEIGHTS=True, BLOCK_T=4, BLOCK_N=1024)),
    ("slot_dots", permute.slot_dots_kernel, {"rows_ptr": "*bf16", "tok_ptr": "*bf16", "slot_to_row_ptr": "*i32"},
     dict(BLOCK_S=32, BLOCK_N=128)),
    ("plan hist", plan.plan_hist_kernel, PLAN_INDEX, dict(PRIORITY=True, HAS_MAP=True, HAS_CAP=True, BLOCK_E=256, BLOCK=128)),
    ("plan rank", plan.plan_rank_kernel, PLAN_INDEX, dict(PRIORITY=False, HAS_MAP=True, HAS_CAP=True, FINAL=True,
                                                         BLOCK_E=256, BLOCK=128)),
    ("gemm plain", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX}, GEMM_FLAGS),
    ("gemm gather+gated silu+bias+in-scale", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX},
     {**GEMM_FLAGS, "GATHER": True, "IN_SCALE": True, "HAS_BIAS": True, "ACT": 1, "GATED": True}),
    ("gemm swiglu_oai", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX},
     {**GEMM_FLAGS, "GATHER": True, "ACT": 4, "GATED": True, "BLOCK_M": 16, "BLOCK_K": 128}),
    ("gemm scatter+out-scale fp32", grouped_gemm.grouped_gemm_kernel, GEMM_INDEX,
     {**GEMM_FLAGS, "SCATTER": True, "OUT_SCALE": True, "IEEE": True, "BLOCK_K": 32}),
    ("gemm gelu plain", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX}, {**GEMM_FLAGS, "ACT": 2}),
    ("wgrad", grouped_gemm.grouped_wgrad_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
                                                  "offsets_ptr": "*i32", "slots_ptr": "*i32"},
     dict(HAS_SLOTS=True, UPCAST=False, IEEE=False, BLOCK_A=64, BLOCK_B=64, BLOCK_M=32)),
    ("lora add_slot_sums", lora.add_slot_sums_kernel, {"base_ptr": "*bf16", "rows_ptr": "*bf16", "out_ptr": "*bf16",
                                                       "slot_to_row_ptr": "*i32"}, dict(BLOCK_T=4, BLOCK_N=512)),
]


def main(pattern: str = "") -> int:
    failed = []
    for name, kernel, types, consts in CASES:
        if pattern not in name:
            continue
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature(kernel, types, consts), constexprs=consts),
                           target=TARGET)
            print(f"ok      {name}")
        except Exception as exc:  # report every kernel, then fail
            failed.append(name)
            print(f"FAILED  {name}: {exc.__class__.__name__}: {str(exc)[:2000]}")
    print(f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
