"""The conformance suite's helpers: make a case, run it on a backend with autograd, compare it with the
reference (``compare``), shrink shapes for the Triton interpreter (``fit``), opcheck cases of an op family."""
from __future__ import annotations

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from taskrouting import ops
from taskrouting.ops import reference as R

# (rtol, atol) of every backend's outputs against the reference run in float64: per dtype, the loosest of the
# tolerances the four former per-backend suites used, which every backend passes.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 8e-2),
}
# grad_x is not compared where the float64 pre-activation lies this close to the ReLU kink: the kernel's
# rounding may put it on the other side (see kink_slack for what that may move in grad_weight / grad_bias).
KINK = {torch.float64: 0.0, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
# The Triton interpreter costs ~1 ms per program instance: its cases are shrunk to this size (N, C, each
# spatial extent), a loop over shapes takes its first INTERPRETED_SHAPES distinct shrunk shapes, and a loop over
# variants of one case takes one of them (``pick``). Tests parametrized over ``shape`` give it a shape list of
# its own (``@pytest.mark.shapes(full, interpreted)``, tests/conftest.py).
INTERPRETED_MAX = (4, 6, 4)
INTERPRETED_SHAPES = 2


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def make_case(shape, dtype=torch.float32, channels_last=False, affine=True, seed=0, num_tasks=7,
              sharing_ratio=0.5, per_sample=False, device="cpu", residual=False):
    """Random inputs for one op call: x, masks, task, weight, bias, running stats, grad; with ``residual``
    also the residual of ``bn_add_relu_route`` (x's layout)."""
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
    case = dict(x=x, masks=masks.to(device), task=move(task) if per_sample else task, weight=move(weight),
                bias=move(bias), running_mean=move(running_mean), running_var=move(running_var), grad=grad)
    if residual:
        case["residual"] = to_layout(torch.randn(shape, generator=g).to(dtype).to(device), channels_last)
    return case


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
    residual = leaf(case.get("residual"))
    if residual is None:
        y = ops.bn_relu_route(x, case["masks"], case["task"], weight, bias, rm, rv, training, momentum, eps,
                              stats, backend)
    else:
        y = ops.bn_add_relu_route(x, residual, case["masks"], case["task"], weight, bias, rm, rv, training,
                                  momentum, eps, stats, backend)
    y.backward(case["grad"] if dtype is None else case["grad"].to(dtype))
    out = {"y": y.detach(), "grad_x": x.grad, "grad_weight": None if weight is None else weight.grad,
           "grad_bias": None if bias is None else bias.grad, "running_mean": rm, "running_var": rv}
    if residual is not None:
        out["grad_residual"] = residual.grad
    return out


def fit(shape, interpreted: bool) -> tuple:
    """``shape`` as the backend runs it: unchanged, or shrunk to INTERPRETED_MAX under the interpreter."""
    if not interpreted or len(shape) < 2:
        return tuple(shape)
    n, c, spatial = INTERPRETED_MAX
    return (min(shape[0], n), min(shape[1], c), *(min(s, spatial) for s in shape[2:]))


def fit_all(shapes, interpreted: bool) -> list:
    """The shapes of a loop as the backend runs them (see ``fit``): all of them, or a few shrunk ones."""
    if not interpreted:
        return list(shapes)
    return list(dict.fromkeys(fit(s, True) for s in shapes))[:INTERPRETED_SHAPES]


def pick(variants, interpreted: bool, key: int) -> list:
    """The variants of a case a backend runs: all of them, or under the interpreter the one ``key`` picks
    (tests give neighbouring parameters different keys, so that each variant still runs somewhere)."""
    variants = list(variants)
    return [variants[key % len(variants)]] if interpreted else variants


def opcheck_cases(device="cpu", family="native"):
    """(op, args) for torch.library.opcheck of every op of a backend family, both layouts."""
    case = make_case((3, 8, 3, 2), per_sample=True, device=device)
    x, route, w, b = case["x"], case["masks"][case["task"]], case["weight"], case["bias"]
    rm, rv, dy = case["running_mean"], case["running_var"], case["grad"]
    mean = torch.randn(8, device=device)
    invstd, count = torch.rand(8, device=device) + 0.5, torch.full((8,), 18.0, device=device)
    xr = x.clone().requires_grad_(True)
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    cases = [
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
    if family != "native":  # the running-stat update is one native op; other families use PyTorch's
        cases = cases[:-1]
    return [(ops.family_op(family, name), args) for name, args in cases]


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


def assert_matches(got, want, dtype, per_channel_count, kink=None, slack=None):
    """Each output within the dtype's tolerance of the float64 reference; the sums over a
    channel (grad_weight, grad_bias) get an absolute tolerance that grows with sqrt(count), plus
    ``slack[key]`` per channel: what the elements at the ReLU kink (``kink``) could change."""
    rtol, atol = TOLERANCE[dtype]
    for key, expected in want.items():
        actual = got[key]
        if expected is None:
            assert actual is None, key
            continue
        assert actual is not None and actual.shape == expected.shape, key
        # an output kept in a lower precision than x (running stats of float64 x in float32) gets its tolerance
        r, a = (max(v, w) for v, w in zip((rtol, atol), TOLERANCE[actual.dtype]))
        actual = actual.to(expected.dtype)
        if key in ("grad_weight", "grad_bias"):
            r, a = max(r, 1e-4), max(a, 1e-4) * max(1.0, math.sqrt(per_channel_count))
        if key in ("grad_x", "grad_residual") and kink is not None:
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


def compare(backend, case, training=True, stats="batch", track=True, momentum=0.1, eps=1e-5, strides=True):
    """Run ``case`` on ``backend`` and on the reference in float64 (same device); every output must match
    within TOLERANCE of x's dtype (grad_x off the ReLU kink, the channel sums with the kink's slack), and y
    and grad_x keep x's strides (``strides``; a non-dense x gets dense outputs). Returns the backend's outputs."""
    dtype = case["x"].dtype
    kw = dict(training=training, stats=stats, track=track, momentum=momentum, eps=eps)
    got = run(backend, case, **kw)
    want = run("reference", case, dtype=torch.float64, **kw)
    kink = slack = None
    if KINK[dtype] and case["x"].numel():
        pre = pre_activation64(case, training, stats, eps, track)
        total = pre if case.get("residual") is None else pre + case["residual"].double()
        kink = total.abs() < KINK[dtype]
        slack = kink_slack(case, pre, kink)
    per_channel = case["x"].numel() / max(case["x"].shape[1], 1)
    assert_matches(got, want, dtype, per_channel, kink, slack)
    assert got["y"].dtype == dtype
    if strides and case["x"].numel():
        assert got["y"].stride() == case["x"].stride(), "y must keep x's memory format"
        assert got["grad_x"].stride() == case["x"].stride(), "grad_x must keep x's memory format"
        if "grad_residual" in got and case["residual"].stride() == case["x"].stride():  # else autograd restrides
            assert got["grad_residual"].stride() == case["x"].stride(), "grad_residual must have x's memory format"
    return got


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


class Dispatches(TorchDispatchMode):
    """The ATen / taskrouting ops a region dispatches, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
