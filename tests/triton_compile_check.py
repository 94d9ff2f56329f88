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

from moe_kernels.triton_kernels import combine, expert_choice, gating, grouped_gemm, lora, permute, plan, schedule  # noqa: E402

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


BF16_GEMM = {p: "*bf16" for p in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "pre_ptr", "act_out_ptr", "tok_ptr")}
GEMM_INDEX = {"slots_ptr": "*i32", "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32", "offsets_ptr": "*i32",
              "num_tiles_ptr": "*i32"}
GEMM_FLAGS = dict(HAS_SLOTS=True, GATHER=False, SCATTER=False, IN_SCALE=False, OUT_SCALE=False, HAS_BIAS=False, ACT=0,
                  GATED=False, UPCAST=False, IEEE=False, STORE_PRE=False, ACT_BWD=False, ROW_DOT=False, BIAS_DOT=False,
                  BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=False, NUM_PROGS=1)
PLAN_INDEX = {p: "*i32" for p in ("ids_ptr", "map_ptr", "rank_ptr", "hist_ptr", "base_ptr", "offsets_ptr", "rank_out_ptr",
                                  "slot_to_row_ptr", "sorted_slots_ptr", "fill_ptr", "tile_seg_ptr", "tile_row_ptr",
                                  "num_tiles_ptr", "counts_ptr", "seg_ptr", "row_ptr", "num_ptr")}

CASES = [
    ("topk_gating softmax", gating.topk_gating_kernel, {"logits_ptr": "*fp32", "ids_ptr": "*i32", "counts_part_ptr": "*i32",
                                                       "scaling": "fp32"},
     dict(HAS_BIAS=False, SOFTMAX=True, RENORM=True, GROUPED=False, GROUP_TOP2=False, WITH_STATS=False,
          BLOCK_T=32, BLOCK_E=128, BLOCK_K=8, BLOCK_G=2)),
    ("topk_gating grouped+stats", gating.topk_gating_kernel, {"logits_ptr": "*bf16", "ids_ptr": "*i32",
                                                             "counts_part_ptr": "*i32", "scaling": "fp32"},
     dict(HAS_BIAS=True, SOFTMAX=False, RENORM=True, GROUPED=True, GROUP_TOP2=True, WITH_STATS=True,
          BLOCK_T=16, BLOCK_E=256, BLOCK_K=8, BLOCK_G=8)),
    ("topk_gating backward", gating.topk_gating_backward_kernel, {"logits_ptr": "*bf16", "grad_logits_ptr": "*bf16",
                                                                 "ids_ptr": "*i32", "scaling": "fp32"},
     dict(SOFTMAX=False, RENORM=True, HAS_GRAD_SUMS=True, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8)),
    ("expert_choice", expert_choice.expert_choice_kernel, {"ids_ptr": "*i32"}, dict(SOFTMAX=True, BLOCK_C=256)),
    ("permute", permute.permute_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "slots_ptr": "*i32"},
     dict(HAS_WEIGHTS=True, BLOCK_R=4, BLOCK_H=1024)),
    ("unpermute", permute.unpermute_kernel, {"y_ptr": "*bf16", "out_ptr": "*bf16", "slot_to_row_ptr": "*i32"},
     dict(HAS_WEIGHTS=True, BLOCK_T=4, BLOCK_N=1024)),
    ("slot_dots", permute.slot_dots_kernel, {"rows_ptr": "*bf16", "tok_ptr": "*bf16", "slot_to_row_ptr": "*i32"},
     dict(BLOCK_S=32, BLOCK_N=128)),
    ("plan hist", plan.plan_hist_kernel, PLAN_INDEX, dict(PRIORITY=True, HAS_MAP=True, HAS_CAP=True, BLOCK_E=256, BLOCK=128,
                                                         FILL=True)),
    ("plan scan", plan.plan_scan_kernel, PLAN_INDEX, dict(FINAL=True, BLOCK_E=256, BLOCK_P=32)),
    ("plan rank", plan.plan_rank_kernel, PLAN_INDEX, dict(PRIORITY=False, HAS_MAP=True, HAS_CAP=True, FINAL=True,
                                                         BLOCK_E=256, BLOCK=128, SCHEDULE=True, TILE_M=64, BLOCK_T=32)),
    ("tile schedule", schedule.tile_schedule_kernel, PLAN_INDEX, dict(TILE_M=16, BLOCK_E=512, BLOCK_T=16)),
    ("combine + dots", combine.combine_kernel, {"rows_ptr": "*bf16", "out_ptr": "*bf16", "slot_to_row_ptr": "*i32"},
     dict(HAS_PARTS=True, BLOCK_T=4, BLOCK_N=1024, BLOCK_P=16)),
    ("gemm plain", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX}, GEMM_FLAGS),
    ("gemm gather+gated silu+bias+in-scale", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX},
     {**GEMM_FLAGS, "GATHER": True, "IN_SCALE": True, "HAS_BIAS": True, "ACT": 1, "GATED": True}),
    ("gemm swiglu_oai", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX},
     {**GEMM_FLAGS, "GATHER": True, "ACT": 4, "GATED": True, "BLOCK_M": 16, "BLOCK_K": 128}),
    ("gemm scatter+out-scale fp32", grouped_gemm.grouped_gemm_kernel, GEMM_INDEX,
     {**GEMM_FLAGS, "SCATTER": True, "OUT_SCALE": True, "IEEE": True, "BLOCK_K": 32}),
    ("gemm gelu plain", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX}, {**GEMM_FLAGS, "ACT": 2}),
    ("gemm gated+store pre persistent", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX},
     {**GEMM_FLAGS, "GATHER": True, "ACT": 1, "GATED": True, "STORE_PRE": True, "PERSISTENT": True, "NUM_PROGS": 132}),
    ("gemm act backward+dots", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX},
     {**GEMM_FLAGS, "GATHER": True, "OUT_SCALE": True, "ACT": 4, "GATED": True, "ACT_BWD": True, "ROW_DOT": True,
      "BIAS_DOT": True}),
    ("gemm dX scatter+dots", grouped_gemm.grouped_gemm_kernel, {**BF16_GEMM, **GEMM_INDEX},
     {**GEMM_FLAGS, "SCATTER": True, "OUT_SCALE": True, "ROW_DOT": True}),
    ("wgrad", grouped_gemm.grouped_wgrad_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
                                                  "bias_out_ptr": "*bf16", "offsets_ptr": "*i32", "slots_ptr": "*i32"},
     dict(HAS_SLOTS=True, GATHER_A=True, GATHER_B=False, SCALE_A=True, SCALE_B=False, BIAS_A=True, UPCAST=False,
          IEEE=False, BLOCK_A=128, BLOCK_B=128, BLOCK_M=64, NUM_PROGS=132)),
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
