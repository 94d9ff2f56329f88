#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA extension, run the whole test suite on the GPU,
# compute-sanitizer over selected kernel tests, the device ceilings and the benchmark suites.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default: $OUT, else bench/results/gpu_check_<date>)
# Designed for an offline H200 with its own torch/triton: nothing is downloaded. Budget: < 10 min.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu_check_$(date +%Y-%m-%d)}}
mkdir -p "$out"
summary="$out/summary.md"
jobs=$(nproc)
step() { echo "== $1 ($(date +%T))" | tee -a "$out/steps.log"; }
record() { echo "- $1: exit $2" >> "$summary"; }

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
  python - <<'PY'
import torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"missing ({exc})"
print(f"- torch: {torch.__version__} (CUDA {torch.version.cuda}); triton: {tv}")
PY
  echo
} > "$summary"

step "build moe_kernels._C for sm_90a"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MOE_KERNELS_BUILD_CUDA=1 MAX_JOBS=$jobs \
  timeout 300 python -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
record "build" $?
python -c "import moe_kernels as m; [print(b) for b in m.backends().values()]" > "$out/backends.txt" 2>&1
cat "$out/backends.txt" >> "$summary"

step "test suite on the GPU"
timeout 240 python -m pytest -q -n "$((jobs < 8 ? jobs : 8))" tests --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
record "tests" $?
tail -n 15 "$out/tests.log" | sed 's/^/    /' >> "$summary"

step "compute-sanitizer (memcheck, racecheck) over selected kernel tests"
sel="tests/test_gating_kernels.py tests/test_permute_kernels.py tests/test_gemm_kernels.py"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python -m pytest -q -x $sel -k "cuda and not compile" -p no:cacheprovider > "$out/memcheck.log" 2>&1
record "memcheck" $?
timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 \
  python -m pytest -q -x tests/test_gating_kernels.py -k "cuda and matches_reference and 257" -p no:cacheprovider > "$out/racecheck.log" 2>&1
record "racecheck" $?

step "benchmarks"
for suite in main routing permute gemm moe lora; do
  if python -m bench "$suite" --help > /dev/null 2>&1; then
    timeout 120 python -m bench "$suite" --out "$out" > "$out/bench_$suite.log" 2>&1
    record "bench $suite" $?
  fi
done

step "done"
echo "wrote $out (summary: $summary)"
