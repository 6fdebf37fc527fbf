#!/usr/bin/env bash
# The GPU check: one command for a short GPU lease (H100/H200, no internet; its python3 holds torch,
# triton and pytest). Stages in order of value, each under its own timeout, shrunk to what is left of
# the total budget; a one-page summary (OUTDIR/summary.txt, also printed) and at most 8 files in OUTDIR.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUTDIR]     (OUTDIR default: $OUT, else gpu-check)
#
# --dry-run runs every stage on CPU tensors with a tiny selection (the CI check of this script):
# no CUDA build, the conformance suite on the cpu and interpreted triton backends, a quick CPU bench,
# and memcheck reported as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
py=${PYTHON:-python3}
summary="$out/summary.txt"
: > "$summary"

# Stage budgets in seconds, in order of value. Their sum is the whole check's budget (<= 480 s = 8 min).
STAGES="build:150 conformance_cuda:100 conformance_triton:80 gpu_checks:50 bandwidth:50 tail_bandwidth:20 memcheck:30"
TOTAL=0
for s in $STAGES; do TOTAL=$((TOTAL + ${s#*:})); done
START=$(date +%s)

note() { echo "$*" >> "$summary"; }

budget_of() {  # the stage's budget, or what is left of the total when that is less
  local want=$1 left=$((TOTAL - ($(date +%s) - START)))
  if [ "$left" -lt "$want" ]; then echo "$left"; else echo "$want"; fi
}

# run_stage NAME LOG CMD...: runs CMD under the stage's timeout, appends its output to LOG, one summary line.
run_stage() {
  local name=$1 log=$2; shift 2
  local want t0 status secs last
  want=$(echo " $STAGES " | sed -E "s/.* $name:([0-9]+) .*/\1/")
  local limit
  limit=$(budget_of "$want")
  if [ "$limit" -lt 10 ]; then
    note "$(printf '%-20s %-8s %5s s  %s' "$name" skipped 0 "no time left of the ${TOTAL} s budget")"
    return 0
  fi
  t0=$(date +%s)
  echo "== $name (limit ${limit} s): $*" >> "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  status=$?
  secs=$(($(date +%s) - t0))
  last=$(grep -E "passed|failed|error|Error|OK|ok" "$log" | tail -n 1 | cut -c1-90)
  if [ "$status" -eq 0 ]; then
    note "$(printf '%-20s %-8s %5s s  %s' "$name" ok "$secs" "$last")"
  elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    note "$(printf '%-20s %-8s %5s s  %s' "$name" TIMEOUT "$secs" "killed at ${limit} s; $last")"
    FAILED=1
  else
    note "$(printf '%-20s %-8s %5s s  %s' "$name" FAIL "$secs" "exit $status; $last")"
    FAILED=1
  fi
}
FAILED=0

note "taskrouting GPU check $( [ $dry = 1 ] && echo '(dry run, CPU)' ) $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${TOTAL} s"
note "stages: $STAGES"
if [ $dry = 0 ]; then
  note "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
fi
note "$($py -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1)"

if [ $dry = 1 ]; then
  run_stage build "$out/build.log" "$py" -c \
    "import taskrouting.ops.extension as e; assert e.loaded(), e.LOAD_ERROR; print('extension ok')"
  conf_cuda=(env TASKROUTING_TEST_BACKENDS=cpu "$py" -m pytest -q -x -p no:cacheprovider
             tests/test_bn_relu_route.py tests/test_bn_add_relu_route.py -k "sharing_ratios and not routed")
  conf_triton=(env TASKROUTING_TEST_BACKENDS=triton_interp "$py" -m pytest -q -x -p no:cacheprovider
               tests/test_bn_relu_route.py tests/test_bn_add_relu_route.py
               -k "test_user_masks_momentum_eps or test_zero_variance_channels or test_zero_residual")
  gpu_checks=("$py" -m pytest -q -x -p no:cacheprovider tests/test_gpu_readiness.py -k "cpu and not compile")
  bench=("$py" -m taskrouting.bench --device cpu --quick --no-compile --no-plots --out "$out/bench")
  tail_bench=("$py" benchmarks/bench_bn_add_relu_route.py --device cpu --shapes 2x16x8x8 --repeats 2)
else
  # sm_90 only: the lent machines are H100/H200 (CI compiles sm_80 and sm_90 without running them).
  run_stage build "$out/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TASKROUTING_BUILD_CUDA=1 \
    "$py" setup.py build_ext --inplace
  conf_cuda=(env TASKROUTING_TEST_BACKENDS=cuda "$py" -m pytest -q -p no:cacheprovider
             tests/test_bn_relu_route.py tests/test_bn_add_relu_route.py -k "not random_shapes")
  conf_triton=(env TASKROUTING_TEST_BACKENDS=triton_cuda "$py" -m pytest -q -p no:cacheprovider
               tests/test_bn_relu_route.py tests/test_bn_add_relu_route.py -k "not random_shapes")
  # Strides, misalignment, > 2^31 elements, CUDA-graph capture, launch shapes; memcheck is its own stage.
  gpu_checks=("$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_readiness.py
              tests/test_cuda_kernels.py tests/test_triton_kernels.py -k "not memcheck")
  bench=("$py" -m taskrouting.bench --device cuda --sweeps shapes --modes train-fwd,train-fwdbwd
         --shapes 16x128x56x56,16x256x28x28,16x512x14x14 --repeats 10 --no-model --no-plots --out "$out/bench")
  tail_bench=("$py" benchmarks/bench_bn_add_relu_route.py --device cuda --shapes 32x256x56x56,32x1024x14x14
              --repeats 10 --no-compile)
fi

run_stage conformance_cuda "$out/conformance.log" "${conf_cuda[@]}"
run_stage conformance_triton "$out/conformance.log" "${conf_triton[@]}"
run_stage gpu_checks "$out/gpu_checks.log" "${gpu_checks[@]}"
run_stage bandwidth "$out/bandwidth.log" "${bench[@]}"
run_stage tail_bandwidth "$out/bandwidth.log" "${tail_bench[@]}"
if [ -d "$out/bench" ]; then  # keep the table and the JSON; the folder would add files past the limit
  [ -f "$out/bench/table.txt" ] && cp "$out/bench/table.txt" "$out/bandwidth.txt"
  [ -f "$out/bench/results.json" ] && cp "$out/bench/results.json" "$out/bandwidth.json"
  rm -rf "$out/bench"
  grep -E "^(device|==)|fused|compiled|plain" "$out/bandwidth.txt" 2>/dev/null | head -n 30 >> "$summary"
fi
sed -n '/== tail_bandwidth/,$p' "$out/bandwidth.log" | grep -E "^(device|shape)|fused|reference" | head -n 20 >> "$summary"
if [ $dry = 1 ]; then
  note "$(printf '%-20s %-8s %5s s  %s' memcheck skipped 0 'dry run: compute-sanitizer needs a GPU')"
else
  run_stage memcheck "$out/memcheck.log" "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k memcheck
fi

note "total $(($(date +%s) - START)) s of ${TOTAL} s; $( [ $FAILED = 0 ] && echo 'all stages ok' || echo 'SOME STAGES FAILED (see the logs)')"
echo
cat "$summary"
exit $FAILED
