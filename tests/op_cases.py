"""Shared helpers for op tests: run a backend of bn_relu_route with autograd, compare results."""
from __future__ import annotations

import pytest
import torch

from taskrouting import ops

TOLERANCE = {  # (rtol, atol) against the reference run in float32 (float64 for float64)
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def make_case(shape, dtype=torch.float32, channels_last=False, affine=True, seed=0, num_tasks=7,
              sharing_ratio=0.5, per_sample=False, device="cpu"):
    """Random inputs for one op call: x, masks, task, weight, bias, running stats, grad."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(dtype)
    masks = ops_masks(num_tasks, c, sharing_ratio, seed)
    task = torch.randint(0, num_tasks, (shape[0],), generator=g) if per_sample else int(seed % num_tasks)
    weight = torch.randn(c, generator=g) if affine else None
    bias = torch.randn(c, generator=g) if affine else None
    running_mean, running_var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    grad = torch.randn(shape, generator=g).to(dtype)
    move = (lambda t: None if t is None else t.to(device))
    x, grad = to_layout(x.to(device), channels_last), to_layout(grad.to(device), channels_last)
    return dict(x=x, masks=masks.to(device), task=move(task) if per_sample else task, weight=move(weight),
                bias=move(bias), running_mean=move(running_mean), running_var=move(running_var), grad=grad)


def ops_masks(num_tasks, channels, sharing_ratio, seed):
    from taskrouting import make_masks
    return make_masks(num_tasks, channels, sharing_ratio, torch.Generator().manual_seed(seed + 1))


def run(backend, case, training=True, stats="batch", momentum=0.1, eps=1e-5, track=True, dtype=None):
    """Forward + backward of one backend; returns y, grads of x/weight/bias and the running stats.
    ``dtype``: cast x, weight, bias, running stats and grad to it first (layout kept)."""
    def leaf(t):
        if t is None:
            return None
        return t.detach().to(dtype or t.dtype, copy=True).requires_grad_(True)

    def buffer(t):
        return t.to(dtype or t.dtype, copy=True) if track else None

    x, weight, bias = leaf(case["x"]), leaf(case["weight"]), leaf(case["bias"])
    rm, rv = buffer(case["running_mean"]), buffer(case["running_var"])
    y = ops.bn_relu_route(x, case["masks"], case["task"], weight, bias, rm, rv, training, momentum, eps,
                          stats, backend)
    y.backward(case["grad"] if dtype is None else case["grad"].to(dtype))
    return {"y": y.detach(), "grad_x": x.grad, "grad_weight": None if weight is None else weight.grad,
            "grad_bias": None if bias is None else bias.grad, "running_mean": rm, "running_var": rv}


def opcheck_cases(device="cpu"):
    """(op name, args) for torch.library.opcheck of every compiled op, both layouts."""
    case = make_case((3, 8, 3, 2), per_sample=True, device=device)
    x, route, w, b = case["x"], case["masks"][case["task"]], case["weight"], case["bias"]
    rm, rv, dy = case["running_mean"], case["running_var"], case["grad"]
    mean = torch.randn(8, device=device)
    invstd, count = torch.rand(8, device=device) + 0.5, torch.full((8,), 18.0, device=device)
    xr = x.clone().requires_grad_(True)
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    return [
        ("bn_relu_route", (xr, route, w, b, rm, rv, True, 1e-5, False, True)),
        ("bn_relu_route", (xcl, route, w, b, rm, rv, True, 1e-5, False, True)),
        ("bn_relu_route", (xr, route, w, b, rm, rv, False, 1e-5, False, False)),
        ("bn_relu_route", (xr, route, None, None, None, None, True, 1e-5, True, False)),
        ("bn_relu_route_backward", (dy, x, route, w, b, mean, invstd, count, True, True, [True, True, False])),
        ("channel_stats", (x, route, True, False)),
        ("normalize_relu_route", (x, route, mean, invstd, w, None)),
        ("backward_reduce", (dy, x, route, mean, invstd, w, b)),
        ("backward_apply", (dy, x, route, mean, invstd, w, b, mean, invstd, count, True, False)),
        ("update_running_stats", (rm.clone(), rv.clone(), mean, invstd, count, 0.1)),
    ]


def assert_matches(result, expected, dtype):
    """Every output of a backend run equals the reference's within the dtype's tolerance."""
    for key, want in expected.items():
        got = result[key]
        rtol, atol = max(TOLERANCE[dtype], TOLERANCE[want.dtype]) if want is not None else (0, 0)
        if want is None:
            assert got is None, key
            continue
        assert got is not None, key
        assert got.shape == want.shape, key
        torch.testing.assert_close(got.to(want.dtype), want, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def check_large_tensor(x, forward, backward, channels_last, chunk=2 ** 28):
    """The 64-bit indexing check of a GPU backend (``forward``/``backward``: its
    ``bn_relu_route``/``bn_relu_route_backward`` ops) on an ``x`` of > 2^31 elements: the
    statistics of every channel (channel 0 is masked and must not be read), and y / grad_x of
    the last 4096 elements in memory."""
    C = x.shape[1]
    route = torch.ones(C, dtype=torch.bool, device=x.device)
    if C > 1:
        route[0] = False
    y, mean, invstd, var, count = forward(x, route, None, None, None, None, True, 1e-5, False, False)
    per_channel = x.numel() // C
    for c in range(C):
        if not route[c]:
            assert mean[c] == 0 and var[c] == 0 and count[c] == 0  # not read
            continue
        parts = x.select(1, c).flatten().split(chunk)
        m = sum(p.double().sum() for p in parts) / per_channel
        v = sum(((p.double() - m) ** 2).sum() for p in parts) / per_channel
        assert abs(mean[c].item() - m.item()) < 1e-3, (c, mean[c], m)
        assert abs(var[c].item() / v.item() - 1) < 1e-3, (c, var[c], v)
        assert count[c].item() == pytest.approx(per_channel, rel=1e-6)

    def memory_tail(t):
        in_memory = t.permute(0, *range(2, t.dim()), 1) if channels_last else t
        return in_memory.reshape(-1)[-4096:].float()

    tail_x = memory_tail(x)
    chan = (torch.arange(x.numel() - 4096, x.numel(), device=x.device) % C) if channels_last else \
        torch.full((4096,), C - 1, device=x.device)
    expect = torch.relu((tail_x - mean[chan]) * invstd[chan]) * route[chan]
    torch.testing.assert_close(memory_tail(y), expect, atol=3e-2, rtol=2e-2)
    del y
    gx, _, _ = backward(torch.ones_like(x), x, route, None, None, mean, invstd, count, False, False,
                        [True, False, False])
    expect = ((tail_x - mean[chan]) > 0).float() * invstd[chan] * route[chan]
    torch.testing.assert_close(memory_tail(gx), expect, atol=3e-2, rtol=2e-2)
