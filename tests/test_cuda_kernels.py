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
    ((8, 64, 14, 14), False),    # S % 8 == 4: half/bfloat16 in 4-element (64-bit) packs, split reduction
    ((8, 2048, 14, 14), False),  # the same in the fused one-block-per-channel forward
    ((4, 8, 3, 6), False),       # S % 4 == 2: scalar loads (no 2-element packs are compiled)
    ((4, 36, 6, 6), True),       # channels-last, C % 8 == 4: half/bfloat16 in 4-element packs
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


# ----------------------------------------------------------------------------- bn_add_relu_route (the ResNet tail)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", [
    ((2, 3, 512, 512), False),   # split reduction + merge
    ((2, 3, 512, 512), True),    # rows split over many chunks
    ((1, 2, 3, 100003), False),  # odd plane: scalar loads
    ((8, 600, 7, 7), False),     # fused one-block-per-channel forward, residual read in the normalise loop
    ((8, 2048, 8, 8), False),    # fused forward with 128-bit loads (S % 8 == 0)
    ((32, 256, 14, 14), True),   # channels-last 2-D grid
    ((4096, 96), False),         # [N, C] rows
    ((8, 64, 14, 14), False),    # S % 8 == 4: half/bfloat16 in 4-element (64-bit) packs
    ((8, 2048, 14, 14), False),  # the same in the fused forward (stash and residual in 64-bit packs)
    ((4, 8, 3, 6), False),       # S % 4 == 2: scalar loads
    ((4, 36, 6, 6), True),       # channels-last, C % 8 == 4: half/bfloat16 in 4-element packs
], ids=str)
def test_add_launch_shapes(shape, channels_last, dtype):
    for per_sample, stats in ((False, "batch"), (True, "routed"), (True, "batch")):
        case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample, device=DEV,
                         residual=True)
        compare("cuda", case, True, stats)
    case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=True, device=DEV, residual=True)
    compare("cuda", case, False, "batch")


def _one_element_in(t, elements=1):
    """t's values and strides, `elements` elements into a larger storage: misaligned for 128-bit accesses."""
    out = torch.empty(t.numel() + elements, device=t.device, dtype=t.dtype)[elements:]
    out = out.as_strided(t.shape, t.stride()).copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


MISALIGNED_SHAPES = [((4, 64, 8, 8), False), ((4, 64, 8, 8), True), ((8, 2048, 8, 8), False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,channels_last", MISALIGNED_SHAPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_task", "sample_task"])
@pytest.mark.parametrize("which", ["residual", "y", "grad_y"])
def test_add_one_misaligned_operand(dtype, shape, channels_last, per_sample, which):
    """One operand misaligned, the others aligned and of vector-friendly sizes: every kernel of the op falls
    back to scalar accesses for all its operands (the reduce that stores g and the apply that reads it back
    included) and gives what the aligned call gives; grad_residual exactly."""
    _check_one_misaligned_operand(dtype, shape, channels_last, per_sample, which, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,channels_last", MISALIGNED_SHAPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_task", "sample_task"])
@pytest.mark.parametrize("which", ["residual", "y", "grad_y"])
def test_add_one_operand_8_byte_aligned(dtype, shape, channels_last, per_sample, which):
    """One half/bfloat16 operand 8- but not 16-byte aligned: every kernel of the op takes 4-element packs for
    all its operands instead of 8 (the reduce that stores g and the apply that reads it back the same)."""
    _check_one_misaligned_operand(dtype, shape, channels_last, per_sample, which, 4)


def _check_one_misaligned_operand(dtype, shape, channels_last, per_sample, which, elements):
    g = torch.Generator(device=DEV).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rand = lambda: torch.randn(shape, device=DEV, generator=g).to(dtype).contiguous(memory_format=fmt)
    x, r, dy = rand(), rand(), rand()
    n, c = shape[:2]
    route = torch.rand((n, c) if per_sample else (c,), device=DEV, generator=g) < 0.5
    w, b = torch.randn(c, device=DEV, generator=g), torch.randn(c, device=DEV, generator=g)
    fwd = TR.bn_add_relu_route(x, r, route, w, b, None, None, True, 1e-5, False, False)
    y, mean, invstd, _, count = fwd
    args = {"residual": r, "y": y, "grad_y": dy}
    args[which] = _one_element_in(args[which], elements)
    got_fwd = TR.bn_add_relu_route(x, args["residual"], route, w, b, None, None, True, 1e-5, False, False)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    for got, want in zip(got_fwd, fwd):
        torch.testing.assert_close(got, want, **tol)
    for training in (True, False):
        cnt = count if training else count[:0]
        for mask in ([True] * 4, [True, False, True, True], [True, True, False, False], [False, True, False, False]):
            want = TR.bn_add_relu_route_backward(dy, y, x, route, w, b, mean, invstd, cnt, training, False, mask)
            got = TR.bn_add_relu_route_backward(args["grad_y"], args["y"], x, route, w, b, mean, invstd, cnt,
                                                training, False, mask)
            assert torch.equal(got[1], want[1])  # grad_residual = g: no arithmetic
            for o, e in zip(got, want):
                torch.testing.assert_close(o, e, **tol)


@pytest.mark.parametrize("shape,channels_last", [
    ((1, 2, 2 ** 30 + 4096), False),       # planes, 128-bit loads, offsets past 2^31
    ((2, 8, 2 ** 13, 2 ** 14 + 1), True),  # rows (channels-last)
    ((1, 1, 2 ** 31 + 3), False),          # planes, odd: scalar loads
], ids=["planes", "rows", "planes-odd"])
def test_add_more_than_2_31_elements(shape, channels_last):
    """64-bit indexing of the residual, y, grad_residual: y, grad_residual and grad_x (eval) of the last
    elements in memory; grad_residual and grad_bias of the training backward (reduce storing g, apply
    reading it back)."""
    if _free_gb() < 40:
        pytest.skip("needs ~40 GB of free GPU memory")
    x = torch.empty(shape, device=DEV, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.normal_().add_(0.5)
    res = torch.empty_like(x).normal_()
    C = shape[1]
    route = torch.ones(C, dtype=torch.bool, device=DEV)
    if C > 1:
        route[0] = False
    y, mean, invstd, var, count = TR.bn_add_relu_route(x, res, route, None, None, None, None, True, 1e-5,
                                                       False, False)

    def tail(t):
        in_memory = t.permute(0, *range(2, t.dim()), 1) if channels_last else t
        return in_memory.reshape(-1)[-4096:].float()

    chan = (torch.arange(x.numel() - 4096, x.numel(), device=DEV) % C) if channels_last else \
        torch.full((4096,), C - 1, device=DEV)
    expect = torch.relu((tail(x) - mean[chan]) * invstd[chan] + tail(res)) * route[chan]
    torch.testing.assert_close(tail(y), expect, atol=3e-2, rtol=2e-2)
    del res
    gate = (tail(y) > 0).float() * route[chan]
    dy = torch.ones_like(x)
    gx, gr, _, _ = TR.bn_add_relu_route_backward(dy, y, x, route, None, None, mean, invstd, count[:0], False,
                                                 False, [True, True, False, False])
    assert torch.equal(tail(gr), gate)
    torch.testing.assert_close(tail(gx), gate * invstd[chan], atol=3e-2, rtol=2e-2)
    del gx, gr
    gx, gr, _, gb = TR.bn_add_relu_route_backward(dy, y, x, route, None, torch.zeros(C, device=DEV), mean,
                                                  invstd, count, True, False, [True, True, False, True])
    assert torch.equal(tail(gr), gate)
    positives = torch.stack([(y.select(1, c) > 0).sum() for c in range(C)]).float() * route
    torch.testing.assert_close(gb.float(), positives, rtol=1e-5, atol=0)  # float32 sums of ~2^30 ones
