"""What only the CUDA backend has (csrc/cuda/): its launch shapes (split reduction and merge, one block per
channel, the 2-D channels-last grid), 64-bit indexing past 2^31 elements, launches on x's device, and
compute-sanitizer's memcheck over every op (tests/gpu_memcheck.py). Its behaviour as a backend is checked by
the conformance suite (test_bn_relu_route.py, target ``cuda``). Skipped without a CUDA GPU or CUDA kernels.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_cases import check_large_tensor, compare, make_case

from taskrouting import ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.NATIVE_KERNELS.get("cuda"),
                       reason="the extension was built without its CUDA kernels (TASKROUTING_BUILD_CUDA)"),
]
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TR = torch.ops.taskrouting


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Kernels launch on x's device (CUDAGuard), whatever the current device."""
    dev = torch.device("cuda", 1)
    case = make_case((4, 16, 8, 8), per_sample=True, device=str(dev))
    torch.cuda.set_device(0)
    got = compare("cuda", case)
    assert got["y"].device == dev


# ----------------------------------------------------------------------------- launch shapes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", [
    ((2, 3, 512, 512), False),   # few channels, many pixels: split reduction + merge kernel
    ((2, 3, 512, 512), True),    # channels-last, few channels: rows split over many chunks
    ((1, 2, 3, 100003), False),  # N = 1, odd huge plane: split along the spatial extent (scalar loads)
    ((8, 600, 7, 7), False),     # many channels, a channel fits shared memory: fused one-pass kernel
    ((16, 600, 28, 28), False),  # many channels, too big for shared memory: one block per channel
    ((32, 256, 14, 14), True),   # channels-last, many channels: 2-D grid
    ((4096, 96), False),         # [N, C] rows, many rows
], ids=str)
def test_launch_shapes(shape, channels_last, dtype):
    for per_sample, stats in ((False, "batch"), (True, "routed"), (True, "batch")):
        case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample,
                         device=DEV)
        compare("cuda", case, True, stats)
    compare("cuda", make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=True, device=DEV),
            False, "batch")


def _free_gb():
    free, _ = torch.cuda.mem_get_info()
    return free / 2 ** 30


@pytest.mark.parametrize("shape,channels_last", [
    ((1, 2, 2 ** 30 + 4096), False),      # planes, 128-bit loads, offsets past 2^31
    ((2, 8, 2 ** 13, 2 ** 14 + 1), True),  # rows (channels-last), 2^31 + 2^17 elements
    ((1, 1, 2 ** 31 + 3), False),          # planes, odd: scalar loads, one channel
], ids=["planes", "rows", "planes-odd"])
def test_more_than_2_31_elements(shape, channels_last):
    """64-bit indexing: bf16 x of > 2^31 elements; statistics of every channel, and y / grad_x of
    the last elements in memory."""
    if _free_gb() < 24:
        pytest.skip("needs ~24 GB of free GPU memory")
    assert math.prod(shape) > 2 ** 31
    x = torch.empty(shape, device=DEV, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.normal_().add_(0.5)
    check_large_tensor(x, TR.bn_relu_route, TR.bn_relu_route_backward, channels_last)


# ----------------------------------------------------------------------------- compute-sanitizer
def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "compute-sanitizer").exists():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


@pytest.mark.skipif(_compute_sanitizer() is None, reason="compute-sanitizer is not installed")
def test_memcheck():
    """tests/gpu_memcheck.py under compute-sanitizer --tool memcheck: no out-of-bounds access."""
    script = Path(__file__).with_name("gpu_memcheck.py")
    import taskrouting
    package_root = str(Path(taskrouting.__file__).resolve().parent.parent)  # the taskrouting under test
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1",  # every tensor its own allocation
           "PYTHONPATH": os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([_compute_sanitizer(), "--tool", "memcheck", "--error-exitcode", "99",
                           "--leak-check", "no", sys.executable, str(script)],
                          capture_output=True, text=True, env=env, timeout=900)
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, output
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr, output
    assert "gpu_memcheck: ok" in proc.stdout, output
