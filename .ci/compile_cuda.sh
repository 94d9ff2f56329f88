#!/usr/bin/env bash
# Compile every csrc/*.cu to an object for sm_90a and sm_80 (and every csrc/*.cpp with g++): a compile check only.
# The CPU torch wheel has no CUDA libraries to link against, so nothing here is linked or run.
set -euo pipefail
cd "$(dirname "$0")/.."
inc=$(python -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')
out=$(mktemp -d)
status=0
# One nvcc per core: each .cu takes a minute or two.
export inc out
if compgen -G "csrc/*.cu" > /dev/null && ! printf '%s\n' csrc/*.cu | xargs -P "$(nproc)" -I{} sh -c '
    echo "nvcc sm_90a + sm_80: {}"
    nvcc -c -std=c++20 -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=sm_80 -O3 \
      -diag-suppress 3306 -Icsrc -Icsrc/include -I.ci/cuda_shims $inc \
      -o "$out/$(basename {}).o" {} || { echo "FAILED to compile {}"; exit 1; }'; then
  status=1
fi
pyinc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
for f in csrc/*.cpp; do
  [ -e "$f" ] || continue
  echo "g++: $f"
  # shellcheck disable=SC2086
  if ! g++ -c -std=c++20 -O1 -fPIC -Icsrc -Icsrc/include -I"$pyinc" $inc -o "$out/$(basename "$f").o" "$f"; then
    echo "FAILED to compile $f"
    status=1
  fi
done
rm -rf "$out"
exit $status
