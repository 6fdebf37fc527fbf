"""Triton backend on a CUDA GPU, compiled (not interpreted): realistic and huge shapes.

Skipped without CUDA. ``TRITON_INTERPRET`` is removed for these tests (``test_triton.py`` sets it
for the whole process) so CUDA tensors run the compiled kernels; the tests of the
>2^31-element paths need ~20 GB of free GPU memory and are skipped where it is missing.
Run with ``-s`` to see the bandwidth report.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

pytest.importorskip("triton")

from op_cases import check_large_tensor  # noqa: E402

from taskrouting import ops  # noqa: E402
from taskrouting.nn.masks import make_masks
from taskrouting.ops.route import select_route  # noqa: E402

T = pytest.importorskip("taskrouting.ops.triton.ops")

DEV = "cuda"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=4e-2)}


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _layout(x, cl):
    if not cl or x.dim() < 4:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _compare(shape, cl=False, dtype=torch.float32, task="batch", stats="batch", training=True,
             offset=0.0):
    torch.manual_seed(0)
    N, C = shape[:2]
    x0 = _layout(torch.randn(shape, device=DEV) * 2 + offset, cl).to(dtype)
    g = _layout(torch.randn(shape, device=DEV), cl).to(dtype)
    masks = make_masks(4, C, 0.5, torch.Generator().manual_seed(1)).to(DEV)
    task = 1 if task == "batch" else torch.arange(N, device=DEV) % 4
    w = torch.rand(C, device=DEV) + 0.5
    b = torch.randn(C, device=DEV) * 0.2
    rm0, rv0 = torch.randn(C, device=DEV) * 0.1, torch.rand(C, device=DEV) + 0.5
    out = {}
    for backend in ("reference", "triton"):
        x = x0.clone().requires_grad_()
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = rm0.clone(), rv0.clone()
        y = ops.bn_relu_route(x, masks, task, ww, bb, rm, rv, training=training, stats=stats,
                              backend=backend)
        y.backward(g)
        out[backend] = (y, x.grad, ww.grad, bb.grad, rm, rv)
    ref, tri = out["reference"], out["triton"]
    assert tri[0].stride() == ref[0].stride()
    torch.testing.assert_close(tri[0], ref[0], **TOL[dtype])
    torch.testing.assert_close(tri[1], ref[1], **TOL[dtype])
    gtol = dict(atol=1e-3 * math.prod(shape) ** 0.5, rtol=1e-3)
    torch.testing.assert_close(tri[2], ref[2], **gtol)
    torch.testing.assert_close(tri[3], ref[3], **gtol)
    torch.testing.assert_close(tri[4], ref[4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri[5], ref[5], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (8, 32, 8, 8), (2, 3, 256, 256), (1024, 256),
                                   (4, 16, 8, 16, 16), (64, 512, 7, 7)])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(shape, cl, dtype):
    for task, stats, training in (("batch", "batch", True), ("sample", "routed", True),
                                  ("sample", "batch", False)):
        _compare(shape, cl, dtype, task, stats, training)


def test_split_fills_the_gpu():
    """Few channels, many pixels: the reduction is split over many chunks per channel."""
    x = torch.randn(2, 3, 512, 512, device=DEV)
    p = T._Problem(x, torch.ones(3, dtype=torch.bool, device=DEV), "test")
    assert p.fused_plan() is None
    plan = p.split_plan()
    assert plan.P * plan.CB >= 2 * torch.cuda.get_device_properties(0).multi_processor_count
    _compare((2, 3, 512, 512))


def test_large_mean_offset_precision():
    """Welford / Chan merges: a large common offset must not wreck the variance."""
    torch.manual_seed(0)
    x = torch.randn(16, 8, 128, 128, device=DEV) + 1000.0
    route = torch.ones(8, dtype=torch.bool, device=DEV)
    _, mean, invstd, var, count = torch.ops.taskrouting.triton_bn_relu_route(
        x, route, None, None, None, None, True, 1e-5, False, True)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), atol=0, rtol=2e-3)


def test_torch_compile_fullgraph():
    masks = make_masks(2, 16, 0.5, torch.Generator().manual_seed(0)).to(DEV)

    def f(x, w, b):
        return ops.bn_relu_route(x, masks, 1, w, b, backend="triton")

    x = torch.randn(4, 16, 8, 8, device=DEV, requires_grad=True)
    w = torch.rand(16, device=DEV, requires_grad=True)
    b = torch.randn(16, device=DEV, requires_grad=True)
    y = torch.compile(f, fullgraph=True)(x, w, b)
    y.sum().backward()
    torch.testing.assert_close(y, f(x, w, b))


def _free_gb():
    free, _ = torch.cuda.mem_get_info()
    return free / 2 ** 30


@pytest.mark.parametrize("cl", [False, True])
def test_more_than_2_31_elements(cl):
    """int64 offsets: bf16 x with 2^31 + 8192 elements; checks the stats and the tail of y / grad_x."""
    if _free_gb() < 24:
        pytest.skip("needs ~24 GB of free GPU memory")
    if cl:
        shape = (2, 8, 2 ** 13, 2 ** 14 + 1)   # channels_last, 2^31 + 2^17 elements
    else:
        shape = (1, 2, 2 ** 30 + 4096)        # NCHW, 2^31 + 8192 elements
    assert math.prod(shape) > 2 ** 31
    x = _layout(torch.empty(shape, device=DEV, dtype=torch.bfloat16), cl)
    x.normal_().add_(0.5)
    tr = torch.ops.taskrouting
    check_large_tensor(x, tr.triton_bn_relu_route, tr.triton_bn_relu_route_backward, cl)


def test_bandwidth_report():
    """Not a pass/fail benchmark: prints effective GB/s (bytes the op must move / time)."""
    for shape, cl in (((64, 256, 56, 56), False), ((64, 256, 56, 56), True), ((2, 3, 1024, 1024), False)):
        x = _layout(torch.randn(shape, device=DEV, dtype=torch.float16), cl)
        C = shape[1]
        route = torch.ones(C, dtype=torch.bool, device=DEV)
        w, b = torch.ones(C, device=DEV), torch.zeros(C, device=DEV)
        fwd = lambda: torch.ops.taskrouting.triton_bn_relu_route(  # noqa: E731
            x, route, w, b, None, None, True, 1e-5, False, False)
        _, mean, invstd, _, count = fwd()
        g = torch.randn_like(x)
        bwd = lambda: torch.ops.taskrouting.triton_bn_relu_route_backward(  # noqa: E731
            g, x, route, w, b, mean, invstd, count, True, False, [True, True, True])
        for name, fn, passes in (("fwd", fwd, 3), ("bwd", bwd, 5)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            gbs = passes * x.numel() * x.element_size() / ms / 1e6
            print(f"{name} {shape} cl={cl}: {ms * 1e3:.1f} us, {gbs:.0f} GB/s (x{passes} tensor passes)")
            assert math.isfinite(gbs)


def test_route_selection_on_gpu():
    """Per-sample routes on the GPU through the public op."""
    masks = make_masks(3, 8, 0.5, torch.Generator().manual_seed(0)).to(DEV)
    task = torch.tensor([0, 1, 2, 1], device=DEV)
    route = select_route(masks, task, 4, torch.device(DEV))
    assert route.shape == (4, 8)
    _compare((4, 8, 5, 5), task="sample", stats="routed")
