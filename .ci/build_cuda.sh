#!/usr/bin/env bash
# CI compile check of the CUDA kernels (csrc/cuda/*.cu), on a machine without a GPU.
#
# CI has nvcc but a CPU-only torch, so this builds the extension against a CUDA torch wheel in a
# separate venv (reused between runs), from a copy of the repository (the CPU build of the main
# checkout is left alone), then checks that the CUDA kernels registered. Nothing runs on a GPU.
# Skips (exit 0) where nvcc is absent; fails (non-zero) where the CUDA sources do not compile.
#
# Environment: TASKROUTING_CUDA_VENV (default /tmp/taskrouting-cuda-venv),
# TASKROUTING_CUDA_TORCH (default torch==2.14.1), MAX_JOBS (default 2),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
START=$(date +%s)

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "build_cuda.sh: skipped: nvcc not found (CUDA_HOME=$CUDA_HOME, PATH has no nvcc)"
  exit 0
fi
echo "build_cuda.sh: $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"

VENV="${TASKROUTING_CUDA_VENV:-/tmp/taskrouting-cuda-venv}"
TORCH_SPEC="${TASKROUTING_CUDA_TORCH:-torch==2.14.1}"
PY="$VENV/bin/python"
WANT_VERSION=""  # a venv with another torch than an exact torch==X asks for is made anew
case "$TORCH_SPEC" in torch==*) WANT_VERSION="${TORCH_SPEC#torch==}" ;; esac
if ! "$PY" -c "import sys, torch, numpy, setuptools, wheel, ninja; assert torch.version.cuda
assert sys.argv[1] in ('', torch.__version__.split('+')[0]), torch.__version__" "$WANT_VERSION" >/dev/null 2>&1; then
  echo "build_cuda.sh: creating $VENV with $TORCH_SPEC (a CUDA build)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy setuptools wheel ninja
fi
"$PY" -c "import torch; print('build_cuda.sh: torch', torch.__version__, 'CUDA', torch.version.cuda)"

WORK="$(mktemp -d /tmp/taskrouting-cuda-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# The tracked and untracked (not ignored) files, without build outputs of the main checkout.
mkdir -p "$WORK/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] || continue
    mkdir -p "$WORK/src/$(dirname "$f")" && cp -p "$f" "$WORK/src/$f"
  done
else
  tar -C "$REPO" --exclude=.venv --exclude=build --exclude='*.so' --exclude='*.egg-info' --exclude=.git \
    -cf - . | tar -C "$WORK/src" -xf -
fi

cd "$WORK/src"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
echo "build_cuda.sh: building with TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
if ! TASKROUTING_BUILD_CUDA=1 "$VENV/bin/pip" install --no-build-isolation --no-deps -v . >"$WORK/build.log" 2>&1; then
  grep -E "error|Error" "$WORK/build.log" | head -n 60 || true
  tail -n 40 "$WORK/build.log"
  echo "build_cuda.sh: FAILED: the CUDA kernels do not compile"
  exit 1
fi
grep -E "warning" "$WORK/build.log" | grep -E "csrc/" | head -n 20 || true

cd "$WORK"  # import the installed package, not the source tree
"$PY" - <<'EOF'
import torch
import taskrouting
from taskrouting.ops import extension as _extension
assert _extension.loaded(), _extension.LOAD_ERROR
missing = [op for op in ("bn_relu_route", "bn_relu_route_backward", "bn_add_relu_route",
                         "bn_add_relu_route_backward", "channel_stats", "normalize_relu_route",
                         "backward_reduce", "backward_apply", "update_running_stats", "update_task_running_stats")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"taskrouting::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
assert torch._C._dispatch_has_kernel_for_dispatch_key("taskrouting::bn_relu_route", "CPU")
print("build_cuda.sh: CUDA kernels registered for every op")
EOF
echo "build_cuda.sh: OK in $(( $(date +%s) - START )) s"
