#!/usr/bin/env bash
# The GPU run: the checks most likely to find a defect first, inside 9 minutes of wall time on an H200
# (16 cores), each step under a hard cap and a global deadline; summary.md is rewritten after every step,
# so a kill keeps what finished.
#
# Usage: bash bench/gpu_check.sh [OUT_DIR]      (default: $OUT, else bench/results/gpu_check_<date>)
#        bash bench/gpu_check.sh --dry-run [OUT_DIR]   (plan, header and summary only; runs on CPU)
#
# Budget plan (seconds of wall time; a step gets min(cap, time left before the 540 s deadline), and is
# skipped with less than 15 s left):
#   1. environment record (date, GPU, driver, torch, triton, commit)      5
#   2. build moe_kernels._C for sm_90a (MAX_JOBS=16)                     150
#   3. kernels vs the float64 reference (grouped GEMM, TMA, fused MoE,
#      permute, gating, expert choice, NaN propagation, launch path,
#      the quantized CUDA decode)     100
#   4. torch.compile / CUDA graphs / opcheck, batch invariance            70
#   5. the rest of the suite (layer, LoRA, integrations, losses, ...)     60
#   6. compute-sanitizer memcheck on the CUDA kernel tests                50
#   7. compute-sanitizer racecheck on the CUDA gating and small GEMM      25
#   8. python -m bench main --quick                                       75
#                                                                total  535
# Designed for an offline machine with its own torch/triton: nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi
out=${1:-${OUT:-bench/results/gpu_check_$(date +%Y-%m-%d)}}
mkdir -p "$out"
summary="$out/summary.md"
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_BUDGET_S:-540}))
jobs=$(nproc)
workers=$((jobs < 8 ? jobs : 8))
results=()

write_summary() {
  {
    echo "# GPU check $(date -u -d "@$start" +%Y-%m-%dT%H:%MZ)"
    echo
    cat "$out/env.md" 2>/dev/null
    echo
    echo "| step | result | seconds | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${results[@]}"
    echo
    echo "Wall time so far: $(($(date +%s) - start)) s of a ${GPU_CHECK_BUDGET_S:-540} s budget."
    for f in "$out"/*.tail; do
      [ -e "$f" ] || continue
      echo
      echo "## $(basename "$f" .tail) (last lines)"
      echo
      echo '```'
      cat "$f"
      echo '```'
    done
  } > "$summary.tmp" && mv "$summary.tmp" "$summary"
}

# step NAME CAP_S COMMAND...: run under min(cap, time left), record exit status and time, rewrite the summary.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((deadline - $(date +%s)))
  local t=$((cap < left ? cap : left))
  local log="$out/$name.log"
  if [ "$dry" = 1 ]; then
    echo "$*" > "$log"
    results+=("| $name | dry run (cap ${cap} s) | 0 | $name.log |")
    write_summary
    return 0
  fi
  if [ "$t" -lt 15 ]; then
    results+=("| $name | skipped: ${left} s left | 0 | - |")
    write_summary
    return 0
  fi
  echo "== $name (cap ${t} s, $(date +%T))"
  local t0 rc
  t0=$(date +%s)
  timeout -k 5 "$t" "$@" > "$log" 2>&1
  rc=$?
  local status="ok"
  [ "$rc" -ne 0 ] && status="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMED OUT after ${t} s"
  results+=("| $name | $status | $(($(date +%s) - t0)) | $name.log |")
  tail -n 12 "$log" > "$out/$name.tail"
  write_summary
  return 0
}

{
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
  python - <<'PY' 2>&1
import torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"missing ({exc.__class__.__name__})"
print(f"- torch: {torch.__version__} (CUDA {torch.version.cuda}); triton: {tv}")
PY
  [ "$dry" = 1 ] && echo "- dry run: no step ran"
} > "$out/env.md"
results+=("| environment | ok | $(($(date +%s) - start)) | env.md |")
write_summary

step build 150 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MOE_KERNELS_BUILD_CUDA=1 MAX_JOBS="$jobs" \
  python -m pip install --no-build-isolation --no-deps -e .
[ "$dry" = 1 ] || python -c "import moe_kernels as m; [print('-', b) for b in m.backends().values()]" >> "$out/env.md" 2>&1

pytest_q() { python -m pytest -q -p no:cacheprovider -o addopts="" "$@"; }

step kernels 100 pytest_q -x -n "$workers" tests/test_gemm_kernels.py tests/test_tma.py tests/test_permute_kernels.py \
  tests/test_gating_kernels.py tests/test_expert_choice.py tests/test_nan_propagation.py tests/test_launch.py tests/test_cuda_fixes.py tests/test_cuda_quant_decode.py \
  --junitxml="$out/kernels.xml"
step compile_graphs_invariance 70 pytest_q -n "$workers" tests/test_batch_invariance.py \
  tests/test_gemm_kernels.py tests/test_tma.py tests/test_lora.py tests/test_gating_kernels.py tests/test_routing.py \
  -k "compile or graph or opcheck or invarian" --junitxml="$out/compile.xml"
step rest_of_suite 60 pytest_q -n "$workers" tests --junitxml="$out/suite.xml" \
  --ignore=tests/test_triton_compile.py --ignore=tests/test_gemm_kernels.py --ignore=tests/test_tma.py --ignore=tests/test_permute_kernels.py \
  --ignore=tests/test_gating_kernels.py --ignore=tests/test_expert_choice.py --ignore=tests/test_nan_propagation.py
step memcheck 50 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python -m pytest -q -x -p no:cacheprovider tests/test_gemm_kernels.py tests/test_permute_kernels.py \
  tests/test_gating_kernels.py tests/test_cuda_fixes.py tests/test_nan_propagation.py tests/test_cuda_quant_decode.py \
  -k "cuda and not compile and not graph"
step racecheck 25 compute-sanitizer --tool racecheck --error-exitcode 9 \
  python -m pytest -q -x -p no:cacheprovider tests/test_gemm_kernels.py tests/test_gating_kernels.py tests/test_cuda_fixes.py \
  -k "cuda and not compile and not graph and (small or 257 or k0)"
step bench_main 75 python -m bench main --quick --out "$out"

echo "wrote $out (summary: $summary), $(($(date +%s) - start)) s"
