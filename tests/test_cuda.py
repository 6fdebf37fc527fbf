"""The CUDA kernels of the fused op (backend="cuda", csrc/cuda/) against the reference, on a GPU.

Skipped where there is no CUDA GPU or the extension was built without its CUDA kernels.
Results are compared with the pure-PyTorch reference run in float64 on the same device, with
tolerances for the kernel's dtype; grad_x is not compared at the few elements whose float64
pre-activation lies within a hair of the ReLU kink (where float32 may take the other side).
The float64 tests compare the CUDA ops with the CPU ops on identical inputs, tightly.

TASKROUTING_CUDA_TESTS_ON_CPU=1 runs these tests on the CPU kernels instead: a check of the
tests themselves on a machine without a GPU (the GPU-only tests then skip).
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_cases import check_large_tensor, make_case, opcheck_cases, run

from taskrouting import BNReLURoute2d, make_masks, ops
from taskrouting.ops import reference as R

ON_CPU = os.environ.get("TASKROUTING_CUDA_TESTS_ON_CPU") == "1"
DEV = "cpu" if ON_CPU else "cuda"
BACKEND = "cpu" if ON_CPU else "cuda"
if ON_CPU:
    pytestmark = pytest.mark.skipif(not ops.NATIVE_KERNELS.get("cpu"), reason="the CPU kernels are not built")
else:
    pytestmark = [
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        pytest.mark.skipif(not ops.NATIVE_KERNELS.get("cuda"),
                           reason="the extension was built without its CUDA kernels (TASKROUTING_BUILD_CUDA)"),
    ]
gpu_only = pytest.mark.skipif(ON_CPU, reason="runs on a GPU only")
TR = torch.ops.taskrouting

# (rtol, atol) of element-wise outputs against the float64 reference
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
KINK = {torch.float64: 0.0, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(4, 6, 5, 7), (3, 5), (6, 3, 11), (2, 4, 3, 3, 2), (5, 70, 3, 3), (9, 1, 4, 4), (8, 5, 1, 1),
          (1, 3, 17, 19), (2, 16, 8, 8), (3, 8, 4, 4, 4), (7, 24), (2, 9, 1, 33)]


# ----------------------------------------------------------------------------- helpers
def gpu_case(shape, dtype=torch.float32, **kw):
    return make_case(shape, dtype=dtype, device=DEV, **kw)


def pre_activation64(case, training, stats, eps=1e-5, track=True):
    """The float64 reference's batch_norm output (before ReLU) for ``case``."""
    x = case["x"].double()
    route = ops.select_route(case["masks"], case["task"], x.shape[0], x.device)
    w = None if case["weight"] is None else case["weight"].double()
    b = None if case["bias"] is None else case["bias"].double()
    if training and stats == "routed":
        return R._routed_batch_norm(x, route, w, b, None, None, 0.0, eps)
    rm = case["running_mean"].double() if track or not training else None
    rv = case["running_var"].double() if track or not training else None
    return R._batch_norm(x, rm, rv, w, b, training, 0.0, eps)


def assert_matches(got, want, dtype, per_channel_count, kink=None, slack=None):
    """Each output within the dtype's tolerance of the float64 reference; the sums over a
    channel (grad_weight, grad_bias) get an absolute tolerance that grows with sqrt(count), plus
    ``slack[key]`` per channel: what the elements at the ReLU kink (``kink``) could change."""
    rtol, atol = TOL[dtype]
    for key, expected in want.items():
        actual = got[key]
        if expected is None:
            assert actual is None, key
            continue
        assert actual is not None and actual.shape == expected.shape, key
        actual = actual.to(expected.dtype)
        r, a = rtol, atol
        if key in ("grad_weight", "grad_bias"):
            r, a = max(rtol, 1e-4), max(atol, 1e-4) * max(1.0, math.sqrt(per_channel_count))
        if key in ("running_mean", "running_var"):
            r, a = max(rtol, 1e-5), max(atol, 1e-5)
        if key == "grad_x" and kink is not None:
            keep = ~kink
            actual, expected = actual[keep], expected[keep]
        extra = None if slack is None else slack.get(key)
        if extra is None:
            torch.testing.assert_close(actual, expected, rtol=r, atol=a, msg=lambda m: f"{key}: {m}")
            continue
        assert torch.equal(actual.isnan(), expected.isnan()), f"{key}: NaN at different places"
        bound = a + r * expected.abs() + extra
        bad = ((actual - expected).abs() > bound) & ~expected.isnan()
        assert not bad.any(), (f"{key}: channels {bad.nonzero().flatten().tolist()[:8]}: got "
                               f"{actual[bad][:8].tolist()}, expected {expected[bad][:8].tolist()}, "
                               f"bound {bound[bad][:8].tolist()}")


def kink_slack(case, pre, kink):
    """Per channel, how much grad_bias / grad_weight may move if the elements at the kink take the
    other side of the ReLU: sum |dy| and sum |dy * xhat| over them (dy where routed)."""
    x = case["x"]
    route = ops.select_route(case["masks"], case["task"], x.shape[0], x.device)
    dy = case["grad"].double() * R.route_view(route, x).double()
    view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    w = torch.ones(x.shape[1], dtype=torch.float64, device=x.device) if case["weight"] is None \
        else case["weight"].double()
    b = torch.zeros_like(w) if case["bias"] is None else case["bias"].double()
    xhat = (pre - b.view(view)) / w.view(view)
    dims = [0] + list(range(2, x.dim()))
    at_kink = kink.double()
    return {"grad_bias": (dy.abs() * at_kink).sum(dims), "grad_weight": ((dy * xhat).abs() * at_kink).sum(dims)}


def compare(case, training=True, stats="batch", track=True, momentum=0.1, eps=1e-5):
    """The kernel against the float64 reference on the same device."""
    dtype = case["x"].dtype
    kw = dict(training=training, stats=stats, track=track, momentum=momentum, eps=eps)
    got = run(BACKEND, case, **kw)
    want = run("reference", case, dtype=torch.float64, **kw)
    kink = slack = None
    if KINK[dtype]:
        pre = pre_activation64(case, training, stats, eps, track)
        kink = pre.abs() < KINK[dtype]
        slack = kink_slack(case, pre, kink)
    per_channel = case["x"].numel() / max(case["x"].shape[1], 1)
    assert_matches(got, want, dtype, per_channel, kink, slack)
    assert got["y"].stride() == case["x"].stride()
    assert got["grad_x"].stride() == case["x"].stride()
    return got


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_task", "sample_task"])
@pytest.mark.parametrize("training,stats", [(True, "batch"), (True, "routed"), (False, "batch")],
                         ids=["train-batch", "train-routed", "eval"])
def test_matches_reference_float32(shape, channels_last, per_sample, training, stats):
    for affine, track in ((True, True), (False, True), (True, False)):
        if not training and not track:
            continue
        case = gpu_case(shape, channels_last=channels_last, affine=affine, per_sample=per_sample)
        compare(case, training, stats, track)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training,stats", [(True, "batch"), (True, "routed"), (False, "batch")],
                         ids=["train-batch", "train-routed", "eval"])
def test_dtypes(dtype, channels_last, training, stats):
    # vectorised (C or H*W a multiple of 8) and scalar paths, odd sizes, one sample
    for shape in [(4, 16, 8, 8), (6, 3, 11), (10, 7), (16, 64), (3, 24, 5, 5), (1, 8, 6, 6), (5, 7, 3, 5)]:
        for per_sample in (False, True):
            case = gpu_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample)
            compare(case, training, stats)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float32_parameters_with_reduced_input(dtype):
    """weight/bias/running stats in float32 (or x's dtype) while x is half."""
    for param_dtype in (torch.float32, dtype):
        case = gpu_case((4, 16, 6, 6), dtype=dtype, per_sample=True)
        for key in ("weight", "bias", "running_mean", "running_var"):
            case[key] = case[key].to(param_dtype)
        compare(case, True, "batch")
        compare(case, False, "batch")


@pytest.mark.parametrize("sharing_ratio", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("stats", ["batch", "routed"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_sharing_ratios(sharing_ratio, stats, channels_last):
    for per_sample in (False, True):
        case = gpu_case((6, 12, 4, 4), sharing_ratio=sharing_ratio, num_tasks=5, seed=3,
                        channels_last=channels_last, per_sample=per_sample)
        compare(case, True, stats)
        compare(case, False, "batch")


def test_user_masks_momentum_eps():
    case = gpu_case((5, 4, 3, 3))
    case["masks"] = torch.tensor([[True, False, False, True], [False, True, True, True]], device=DEV)
    case["task"] = 1
    for momentum, eps in ((0.0, 1e-3), (1.0, 1e-5), (0.3, 0.5)):
        compare(case, True, "batch", momentum=momentum, eps=eps)
        compare(case, True, "routed", momentum=momentum, eps=eps)
    case["task"] = torch.tensor([0, 1, 1, 0, 1], device=DEV)
    compare(case, True, "routed")


def test_empty_batch_single_sample_one_channel_one_pixel():
    masks = make_masks(3, 4, 0.5, torch.Generator().manual_seed(0)).to(DEV)
    for shape in ((0, 4, 3, 3), (0, 4), (0, 4, 5)):
        for task in (1, torch.zeros(0, dtype=torch.long, device=DEV)):
            x = torch.randn(shape, device=DEV, requires_grad=True)
            rm, rv = torch.zeros(4, device=DEV), torch.ones(4, device=DEV)
            y = ops.bn_relu_route(x, masks, task, None, None, rm, rv, True, 0.1, 1e-5, "batch", BACKEND)
            y.sum().backward()
            assert y.shape == shape and x.grad.shape == shape
            assert torch.equal(rm, torch.zeros(4, device=DEV)) and torch.equal(rv, torch.ones(4, device=DEV))
            y = ops.bn_relu_route(x, masks, task, None, None, rm, rv, False, 0.1, 1e-5, "batch", BACKEND)
            assert y.shape == shape
    x = torch.randn(1, 4, 1, 1, device=DEV)
    y = ops.bn_relu_route(x, masks, 0, None, None, torch.zeros(4, device=DEV), torch.ones(4, device=DEV), False,
                          backend=BACKEND)
    torch.testing.assert_close(y, torch.relu(x / math.sqrt(1 + 1e-5)) * masks[0].view(1, 4, 1, 1))
    # N = 1 (training over the pixels), C = 1, H*W = 1, and both together with N > 1
    for shape in ((1, 4, 3, 5), (6, 1, 4, 4), (7, 1), (6, 4, 1, 1), (5, 3, 1, 1, 1), (1, 1, 9)):
        for channels_last in (False, True):
            for per_sample in (False, True):
                case = gpu_case(shape, channels_last=channels_last, per_sample=per_sample,
                                num_tasks=min(shape[1], 3), sharing_ratio=1.0 if shape[1] == 1 else 0.5)
                compare(case, True, "batch")
                compare(case, True, "routed")
                compare(case, False, "batch")


def test_zero_variance_and_large_offset():
    x = torch.full((4, 3, 5, 5), 2.5, device=DEV, requires_grad=True)
    masks = torch.ones(1, 3, dtype=torch.bool, device=DEV)
    rm, rv = torch.zeros(3, device=DEV), torch.ones(3, device=DEV)
    y = ops.bn_relu_route(x, masks, 0, None, torch.ones(3, device=DEV), rm, rv, backend=BACKEND)
    torch.testing.assert_close(y, torch.ones_like(y))
    torch.testing.assert_close(rv, torch.full((3,), 0.9, device=DEV))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Welford/Chan: a large common offset must not wreck the variance (no E[x^2] - E[x]^2)
    g = torch.Generator(device=DEV).manual_seed(0)
    for channels_last in (False, True):
        x = torch.randn(16, 8, 64, 64, device=DEV, generator=g) + 1000.0
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        route = torch.ones(8, dtype=torch.bool, device=DEV)
        mean, var, count = TR.channel_stats(x, route, False, True)
        xd = x.double()
        torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), atol=2e-4, rtol=0)
        torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), atol=0, rtol=1e-3)
        assert torch.equal(count, torch.full((8,), 16.0 * 64 * 64, device=DEV))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_task", "sample_task"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_channels_are_never_read(channels_last, per_sample, dtype):
    """NaN planted where no sample routes must not reach y or any gradient (eval, backward, and
    training where those channels are not needed for statistics)."""
    case = gpu_case((4, 16, 3, 3), dtype=dtype, channels_last=channels_last, per_sample=per_sample,
                    sharing_ratio=0.25)
    if per_sample:
        case["task"] = torch.tensor([0, 1, 0, 1], device=DEV)
    route = case["masks"][case["task"]]
    unused = ~(route.any(0) if per_sample else route)
    assert unused.any()
    x = case["x"].clone()
    x[:, unused] = float("nan")
    runs = [(False, "batch", True), (True, "routed", True), (True, "batch", False)]
    for training, stats, track in runs:
        xx = x.clone().requires_grad_(True)
        rm, rv = case["running_mean"].clone(), case["running_var"].clone()
        w = case["weight"].clone().requires_grad_(True)
        b = case["bias"].clone().requires_grad_(True)
        y = ops.bn_relu_route(xx, case["masks"], case["task"], w, b, rm if track else None, rv if track else None,
                              training, stats=stats, backend=BACKEND)
        y.backward(case["grad"])
        for name, t in (("y", y), ("grad_x", xx.grad), ("grad_weight", w.grad), ("grad_bias", b.grad),
                        ("running_mean", rm), ("running_var", rv)):
            assert not t.isnan().any(), (name, training, stats)
        assert (y[:, unused] == 0).all() and (xx.grad[:, unused] == 0).all()
        assert (w.grad[unused] == 0).all() and (b.grad[unused] == 0).all()


def test_misaligned_and_non_contiguous_inputs():
    """A storage offset of one element (no 128-bit loads) and a permuted, non-dense x."""
    base = torch.randn(4 * 16 * 8 * 8 + 1, device=DEV)
    x = base[1:].view(4, 16, 8, 8)
    case = gpu_case((4, 16, 8, 8), per_sample=True)
    case["x"] = x
    case["grad"] = torch.randn(4 * 16 * 8 * 8 + 1, device=DEV)[1:].view(4, 16, 8, 8)
    compare(case, True, "batch")
    compare(case, False, "batch")
    case = gpu_case((4, 16, 8, 8))
    case["x"] = case["x"].transpose(2, 3)
    case["grad"] = case["grad"].transpose(2, 3)
    got = run(BACKEND, case)
    want = run("reference", case, dtype=torch.float64)
    pre = pre_activation64(case, True, "batch")
    kink = pre.abs() < KINK[torch.float32]
    assert_matches(got, want, torch.float32, 4 * 8 * 8, kink, kink_slack(case, pre, kink))


def test_deterministic():
    for shape, cl in (((2, 3, 256, 256), False), ((64, 32, 16, 16), True), ((4, 640, 7, 7), False)):
        case = gpu_case(shape, channels_last=cl, per_sample=True)
        first, second = run(BACKEND, case), run(BACKEND, case)
        for key in first:
            assert torch.equal(first[key], second[key]), key


# ----------------------------------------------------------------------------- the ops themselves
def _op_inputs(shape, dtype, channels_last, per_sample, seed=0):
    case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample, seed=seed)
    route = case["masks"][case["task"]]
    c = shape[1]
    g = torch.Generator().manual_seed(seed + 7)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = dict(mean=torch.randn(c, generator=g).to(acc), invstd=(torch.rand(c, generator=g) + 0.5).to(acc),
                 count=torch.full((c,), float(case["x"].numel() // c)).to(acc),
                 sum_dy=torch.randn(c, generator=g).to(acc), sum_dy_xmu=torch.randn(c, generator=g).to(acc))
    case["x"] = _away_from_kink(case["x"], stats["mean"], stats["invstd"], case["weight"], case["bias"])
    return case, route, stats


def _away_from_kink(x, mean, invstd, weight, bias):
    """x moved where x * scale + shift (scale = invstd * w, shift = b - mean * scale) is within
    0.01 of the ReLU kink, so that float32 rounding on two devices takes the same side."""
    view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    scale = invstd.double() * (1.0 if weight is None else weight.double())
    shift = (0.0 if bias is None else bias.double()) - mean.double() * scale
    scale, shift = scale.view(view), shift.view(view)
    out = x
    for _ in range(4):
        pre = out.double() * scale + shift
        near = pre.abs() < 1e-2
        if not near.any():
            break
        target = torch.where(pre < 0, -0.05, 0.05)
        out = torch.where(near, (target - shift) / scale, out.double()).to(x.dtype)
    assert not ((out.double() * scale + shift).abs() < 1e-2).any()
    return out.contiguous(memory_format=_format(x))


def _format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)) and not all(isinstance(v, bool) for v in obj):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _stage_calls(case, route, st):
    x, w, b, dy = case["x"], case["weight"], case["bias"], case["grad"]
    rm, rv = case["running_mean"], case["running_var"]
    calls = []
    for routed, all_ch in ((False, True), (False, False), (True, False)):
        calls.append(("bn_relu_route", (x, route, w, b, rm, rv, True, 1e-5, routed, all_ch)))
        calls.append(("channel_stats", (x, route, routed, all_ch)))
    calls += [
        ("bn_relu_route", (x, route, w, b, rm, rv, False, 1e-5, False, False)),
        ("bn_relu_route", (x, route, None, None, None, None, True, 1e-3, False, False)),
        ("normalize_relu_route", (x, route, st["mean"], st["invstd"], w, b)),
        ("normalize_relu_route", (x, route, st["mean"], st["invstd"], None, None)),
        ("backward_reduce", (dy, x, route, st["mean"], st["invstd"], w, b)),
    ]
    for training, routed in ((True, False), (True, True), (False, False)):
        count = st["count"] if training else st["count"][:0]
        calls.append(("backward_apply", (dy, x, route, st["mean"], st["invstd"], w, b, st["sum_dy"],
                                         st["sum_dy_xmu"], count, training, routed)))
        for mask in ([True, True, True], [True, False, False], [False, True, True], [False, False, False]):
            calls.append(("bn_relu_route_backward", (dy, x, route, w, b, st["mean"], st["invstd"], count,
                                                     training, routed, mask)))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_task", "sample_task"])
def test_every_op_matches_the_cpu_op(dtype, channels_last, per_sample):
    """Each op on the GPU returns what the CPU op returns (shapes, empty tensors, dtypes, values);
    float64 (not reachable through ops.bn_relu_route on CUDA) pins the logic down tightly."""
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else \
        dict(zip(("rtol", "atol"), (max(v, 1e-4) for v in TOL[dtype])))
    for shape in ((4, 6, 5, 7), (3, 16, 4, 4), (10, 8), (5, 3, 9), (2, 8, 2, 3, 2)):
        case, route, st = _op_inputs(shape, dtype, channels_last, per_sample)
        for name, args in _stage_calls(case, route, st):
            want = getattr(TR, name)(*args)
            got = getattr(TR, name)(*_to(args, DEV))
            want = want if isinstance(want, tuple) else (want,)
            got = got if isinstance(got, tuple) else (got,)
            for i, (g, w) in enumerate(zip(got, want)):
                assert g.device.type == DEV and g.dtype == w.dtype and g.shape == w.shape, (name, i)
                if g.dim() == case["x"].dim():
                    assert g.stride() == w.stride(), (name, i)
                scale = max(1.0, math.sqrt(case["x"].numel() / shape[1])) if g.dim() == 1 else 1.0
                torch.testing.assert_close(g.cpu(), w, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                           msg=lambda m: f"{name} output {i}: {m}")


def test_stage_ops_compose_to_the_fused_op():
    for shape, cl in (((5, 6, 4, 3), False), ((5, 16, 4, 3), True), ((2, 3, 300, 300), False)):
        case = gpu_case(shape, per_sample=True, channels_last=cl)
        x, route = case["x"], case["masks"][case["task"]]
        w, b, dy = case["weight"], case["bias"], case["grad"]
        for routed in (False, True):
            y, mean, invstd, var, count = TR.bn_relu_route(x, route, w, b, None, None, True, 1e-5, routed, False)
            torch.testing.assert_close(TR.channel_stats(x, route, routed, False), (mean, var, count))
            torch.testing.assert_close(TR.normalize_relu_route(x, route, mean, invstd, w, b), y)
            gx, gw, gb = TR.bn_relu_route_backward(dy, x, route, w, b, mean, invstd, count, True, routed,
                                                   [True, True, True])
            s_dy, s_dyxmu = TR.backward_reduce(dy, x, route, mean, invstd, w, b)
            torch.testing.assert_close((s_dyxmu * invstd, s_dy), (gw, gb))
            dx = TR.backward_apply(dy, x, route, mean, invstd, w, b, s_dy, s_dyxmu, count, True, routed)
            torch.testing.assert_close(dx, gx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_update_running_stats_op(dtype):
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g)
    count = torch.tensor([0.0, 1.0, 2.0, 7.0, 100.0, 3.0])
    expected = ((torch.randn(6, generator=g)).to(dtype), (torch.rand(6, generator=g) + 0.5).to(dtype))
    got = tuple(t.clone().to(DEV) for t in expected)
    TR.update_running_stats(*expected, mean, var, count, 0.3)  # the CPU op
    TR.update_running_stats(*got, mean.to(DEV), var.to(DEV), count.to(DEV), 0.3)
    torch.testing.assert_close(tuple(t.cpu() for t in got), expected)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 6, 3, 3, device=DEV)
    route = torch.ones(6, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError, match="route"):
        TR.bn_relu_route(x, route[:5], None, None, None, None, True, 1e-5, False, False)
    with pytest.raises(ValueError, match="grad_y"):
        TR.bn_relu_route_backward(x[:2], x, route, None, None, route.float(), route.float(), route.float(), True,
                                  False, [True, False, False])
    with pytest.raises(ValueError, match="mean"):
        TR.normalize_relu_route(x, route, route.float()[:3], route.float(), None, None)
    with pytest.raises(TypeError, match="bool"):
        TR.channel_stats(x, route.float(), False, False)
    if not ON_CPU:
        with pytest.raises(ValueError, match="route is on"):
            TR.channel_stats(x, route.cpu(), False, False)


@pytest.mark.parametrize("index", range(10))
def test_opcheck(index):
    name, args = opcheck_cases(DEV)[index]
    torch.library.opcheck(getattr(TR, name).default, args)


def test_gradcheck_float64():
    """Autograd through the compiled op in float64 (the op directly: ops.bn_relu_route keeps
    float64 off the GPU backends)."""
    for (training, routed), per_sample, cl in itertools.product(((True, False), (True, True), (False, False)),
                                                                (False, True), (False, True)):
        case = make_case((3, 4, 3, 2), dtype=torch.float64, per_sample=per_sample, channels_last=cl, device=DEV)
        route = case["masks"][case["task"]]
        rm, rv = case["running_mean"].double(), case["running_var"].double()

        def f(x, w, b):
            return TR.bn_relu_route(x, route, w, b, rm, rv, training, 1e-5, routed, False)[0]

        x = case["x"].detach().requires_grad_(True)
        w = case["weight"].double().requires_grad_(True)
        b = case["bias"].double().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- modules and compile
def _module_pair(**options):
    from torch import nn

    from taskrouting import TaskRouter
    fused = BNReLURoute2d(8, num_tasks=4, sharing_ratio=0.5, seed=2, backend=BACKEND, **options).to(DEV)
    bn = nn.BatchNorm2d(8, **options).to(DEV)
    if bn.affine:
        with torch.no_grad():
            fused.weight.normal_()
            fused.bias.normal_()
    bn.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "masks"})
    return fused, nn.Sequential(bn, nn.ReLU(), TaskRouter(8, masks=fused.masks).to(DEV))


@pytest.mark.parametrize("options", [dict(), dict(momentum=None), dict(affine=False),
                                     dict(track_running_stats=False), dict(eps=1e-3, momentum=0.3)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_module_matches_batchnorm_relu_router(options):
    fused, ref = _module_pair(**options)
    g = torch.Generator().manual_seed(0)
    for i, training in enumerate([True, True, False, True, False]):
        fused.train(training), ref.train(training)
        x = (torch.randn(4, 8, 5, 6, generator=g) * 2 + i).to(DEV)
        if i % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(4, 8, 5, 6, generator=g).to(DEV)
        task = i % 4 if i != 3 else torch.randint(0, 4, (4,), generator=g).to(DEV)
        out = []
        for m in (fused, ref):
            m.zero_grad()
            for sub in m.modules():
                if hasattr(sub, "active_task"):
                    sub.active_task = task
            xx = x.clone().requires_grad_(True)
            y = m(xx)
            y.backward(grad)
            out.append((y.detach(), xx.grad, [p.grad for p in m.parameters()]))
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-4)
        for a, b in zip(out[0][2], out[1][2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
        for key, value in ref[0].state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-5)


@gpu_only
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    fused, _ = _module_pair()
    for cl, task in ((False, 3), (True, 1)):
        fused.active_task = task
        compiled = torch.compile(copy.deepcopy(fused), fullgraph=True)
        x = torch.randn(4, 8, 6, 6, device=DEV)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        eager = copy.deepcopy(fused)
        expected = eager(eager_x)
        got = compiled(compiled_x)
        torch.testing.assert_close(got, expected)
        expected.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(compiled_x.grad, eager_x.grad)
        torch.testing.assert_close(compiled.running_mean, eager.running_mean)
        torch.testing.assert_close(compiled.running_var, eager.running_var)
        torch.testing.assert_close(compiled.num_batches_tracked, eager.num_batches_tracked)
        # per-sample tasks through the compiled module
        t = torch.tensor([0, 1, 2, 3], device=DEV)
        torch.testing.assert_close(compiled(x, t), eager(x, t))


@gpu_only
@pytest.mark.skipif(not ON_CPU and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Kernels launch on x's device (CUDAGuard), whatever the current device."""
    dev = torch.device("cuda", 1)
    case = make_case((4, 16, 8, 8), per_sample=True, device=str(dev))
    torch.cuda.set_device(0)
    got = run(BACKEND, case)
    want = run("reference", case, dtype=torch.float64)
    assert got["y"].device == dev
    pre = pre_activation64(case, True, "batch")
    kink = pre.abs() < KINK[torch.float32]
    assert_matches(got, want, torch.float32, 4 * 64, kink, kink_slack(case, pre, kink))


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
        case = gpu_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample)
        compare(case, True, stats)
    compare(gpu_case(shape, dtype=dtype, channels_last=channels_last, per_sample=True), False, "batch")


def _free_gb():
    free, _ = torch.cuda.mem_get_info()
    return free / 2 ** 30


@gpu_only
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


@gpu_only
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
