#!/usr/bin/env bash
# The GPU checks and benchmarks in three commands of under 10 minutes each, for a session that
# is lent a GPU machine (no internet there; its python3 holds torch, triton, pytest, hypothesis).
# Results go to $OUT (default gpu-results/), a few files per stage.
#
#   bash benchmarks/gpu_session.sh test     build for the machine's torch, GPU tests, memcheck
#   bash benchmarks/gpu_session.sh shapes   the op over VGG-11's activations
#   bash benchmarks/gpu_session.sh sweeps   tasks, sigma and the VGG-11 step
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
py=${PYTHON:-python3}

case "${1:-}" in
  test)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
    # sm_90 only: the machine is an H100 or H200 (the CI check builds sm_80 and sm_90).
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TASKROUTING_BUILD_CUDA=1 \
      $py -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
      || { tail -50 "$out/build.log"; exit 1; }
    $py -m pytest -q -m gpu tests/test_bn_relu_route.py tests/test_cuda_kernels.py tests/test_triton_kernels.py -s \
      > "$out/gpu-tests.log" 2>&1
    status=$?
    tail -30 "$out/gpu-tests.log"
    exit $status
    ;;
  shapes)
    $py -m taskrouting.bench --device cuda --sweeps shapes --out "$out/shapes" --no-plots \
      > "$out/shapes.log" 2>&1
    status=$?
    rm -f "$out/shapes/results.csv"   # results.json holds the same rows
    grep -E "^(device|torch|headline)" "$out/shapes.log"
    exit $status
    ;;
  sweeps)
    $py -m taskrouting.bench --device cuda --sweeps tasks,sharing_ratio,model --out "$out/sweeps" \
      > "$out/sweeps.log" 2>&1
    status=$?
    rm -f "$out/sweeps/results.csv"
    grep -E "^(device|torch|headline)" "$out/sweeps.log"
    exit $status
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh test|shapes|sweeps  (results in \$OUT)" >&2
    exit 2
    ;;
esac
