"""Conformance suite of ``bn_add_relu_route`` (a ResNet block's tail, ``relu(batch_norm(x) + residual) * route``):
every backend (the ``backend`` fixture, tests/conftest.py) against the pure-PyTorch reference run in float64, with
the tolerances of op_cases.TOLERANCE; both gradients (x and the residual), running stats, masked channels never
read, residual layouts, output masks, double backward, opcheck, compile, and the module ``BNAddReLURoute2d``
against ``BatchNorm2d`` -> add -> ``ReLU`` -> ``TaskRouter``.
"""
import copy
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_cases import Dispatches, compare, fit, fit_all, make_case, pick, run
from torch import nn

from taskrouting import BNAddReLURoute2d, BNReLURoute2d, TaskRouter, make_masks, ops
from taskrouting.ops.schemas import FAMILIES

SHAPES = [(4, 6, 5, 7), (3, 5), (6, 3, 11), (2, 4, 3, 3, 2), (5, 70, 3, 3), (9, 1, 4, 4), (8, 5, 1, 1),
          (1, 3, 17, 19), (2, 16, 8, 8), (7, 24), (2, 9, 1, 33)]
INTERPRETED_SHAPES = [(3, 5, 4, 3), (4, 6), (2, 3, 2, 3, 3), (5, 4, 1, 1)]
REDUCED = [torch.float16, torch.bfloat16]
MODES = [(True, "batch"), (True, "routed"), (False, "batch")]
MODE_IDS = ["train-batch", "train-routed", "eval"]
LAYOUTS = dict(argnames="channels_last", argvalues=[False, True], ids=["nchw", "cl"])
TASKS = dict(argnames="per_sample", argvalues=[False, True], ids=["batch_task", "sample_task"])


def case_on(target, shape, **kw):
    return make_case(fit(shape, target.interpreted), device=target.device, residual=True, **kw)


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.shapes(SHAPES, INTERPRETED_SHAPES)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize(**TASKS)
@pytest.mark.parametrize("training,stats", MODES, ids=MODE_IDS)
def test_matches_reference(backend, target, shape, channels_last, per_sample, training, stats):
    variants = [(True, True), (False, True)] + ([(True, False)] if training else [])  # (affine, track)
    key = sum(shape) + channels_last + 2 * per_sample + (stats == "routed")
    for affine, track in pick(variants, target.interpreted, key):
        case = case_on(target, shape, channels_last=channels_last, affine=affine, per_sample=per_sample)
        compare(backend, case, training, stats, track)


@pytest.mark.parametrize("dtype", REDUCED + [torch.float32], ids=str)
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("training,stats", MODES, ids=MODE_IDS)
def test_dtypes(backend, target, dtype, channels_last, training, stats):
    # vectorised (C or H*W a multiple of 8) and scalar paths, odd sizes, one sample
    shapes = [(4, 16, 8, 8), (6, 3, 11), (10, 7), (16, 64), (3, 24, 5, 5), (1, 8, 6, 6), (5, 7, 3, 5)]
    for shape in fit_all(shapes, target.interpreted):
        for per_sample in (False, True):
            case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample,
                             device=target.device, residual=True)
            compare(backend, case, training, stats)


@pytest.mark.backends("cpu")
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize("training,stats", MODES, ids=MODE_IDS)
def test_float64(backend, target, channels_last, training, stats):
    for shape in [(4, 6, 5, 7), (6, 3, 11), (10, 7)]:
        for per_sample in (False, True):
            case = case_on(target, shape, dtype=torch.float64, channels_last=channels_last, per_sample=per_sample)
            compare(backend, case, training, stats)


@pytest.mark.parametrize("dtype", REDUCED + [torch.float32], ids=str)
def test_float32_parameters_with_reduced_input(backend, target, dtype):
    for param_dtype in (torch.float32, dtype):
        case = case_on(target, (4, 16, 6, 6), dtype=dtype, per_sample=True)
        for key in ("weight", "bias", "running_mean", "running_var"):
            case[key] = case[key].to(param_dtype)
        compare(backend, case, True, "batch")
        compare(backend, case, False, "batch")


@pytest.mark.parametrize("sharing_ratio", [0.0, 0.25, 1.0])
@pytest.mark.parametrize(**LAYOUTS)
def test_sharing_ratios(backend, target, sharing_ratio, channels_last):
    for per_sample in pick((False, True), target.interpreted, int(sharing_ratio * 4) + channels_last):
        case = case_on(target, (6, 12, 4, 4), sharing_ratio=sharing_ratio, num_tasks=5, seed=3,
                       channels_last=channels_last, per_sample=per_sample)
        compare(backend, case, True, "batch")
        compare(backend, case, False, "batch")


def test_zero_residual_is_bn_relu_route(backend, device):
    """With a zero residual the op is bn_relu_route: the same output, running stats and grad_x."""
    case = make_case((4, 8, 3, 5), per_sample=True, device=device)
    plain = run(backend, case)
    case["residual"] = torch.zeros_like(case["x"])
    added = run(backend, case)
    for key, value in plain.items():
        torch.testing.assert_close(added[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (0, 4)], ids=str)
def test_empty_batch(backend, device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    r = torch.randn(shape, device=device, requires_grad=True)
    masks = make_masks(3, 4, 0.5, torch.Generator().manual_seed(0)).to(device)
    y = ops.bn_add_relu_route(x, r, masks, 1, training=False, running_mean=torch.zeros(4, device=device),
                              running_var=torch.ones(4, device=device), backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape


# ----------------------------------------------------------------------------- masked channels, layouts
@pytest.mark.parametrize(**LAYOUTS)
@pytest.mark.parametrize(**TASKS)
@pytest.mark.parametrize("dtype", [torch.float32] + REDUCED, ids=str)
def test_masked_values_are_never_read(backend, device, channels_last, per_sample, dtype):
    """NaN planted in x where no sample routes, and in the residual wherever a sample is not routed, reaches
    neither y nor any gradient."""
    case = make_case((4, 16, 3, 3), dtype=dtype, channels_last=channels_last, per_sample=per_sample,
                     sharing_ratio=0.25, device=device, residual=True)
    if per_sample:
        case["task"] = torch.tensor([0, 1, 0, 1], device=device)
    route = ops.select_route(case["masks"], case["task"], 4, case["x"].device)
    unused = ~(route.any(0) if per_sample else route)
    assert unused.any()
    x, r = case["x"].clone(), case["residual"].clone()
    x[:, unused] = float("nan")
    off = ~route.view(-1 if per_sample else 1, 16, 1, 1).expand_as(r)
    r[off] = float("nan")
    for training, stats, track in [(False, "batch", True), (True, "routed", True), (True, "batch", False)]:
        xx, rr = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        rm, rv = case["running_mean"].clone(), case["running_var"].clone()
        w, b = case["weight"].clone().requires_grad_(True), case["bias"].clone().requires_grad_(True)
        y = ops.bn_add_relu_route(xx, rr, case["masks"], case["task"], w, b, rm if track else None,
                                  rv if track else None, training, stats=stats, backend=backend)
        y.backward(case["grad"])
        for name, t in (("y", y), ("grad_x", xx.grad), ("grad_residual", rr.grad), ("grad_weight", w.grad),
                        ("grad_bias", b.grad), ("running_mean", rm), ("running_var", rv)):
            assert not t.isnan().any(), (name, training, stats)
        assert (y[off] == 0).all() and (rr.grad[off] == 0).all() and (xx.grad[:, unused] == 0).all()
        assert (w.grad[unused] == 0).all() and (b.grad[unused] == 0).all()


@pytest.mark.parametrize("op", ["bn_relu_route", "bn_add_relu_route"])
@pytest.mark.parametrize("training,stats", [(False, "batch"), (True, "routed")], ids=["eval", "train-routed"])
def test_nan_where_a_sample_is_not_routed_reaches_nothing(backend, device, op, training, stats):
    """Per-sample tasks, in eval or with routed statistics: a sample outside a used channel enters neither its
    output nor its statistics, so NaN in x there reaches no output and no gradient, on every backend and in the
    reference (which selects such values away rather than multiplying them by 0), for both ops."""
    case = make_case((6, 8, 3, 3), per_sample=True, sharing_ratio=0.5, device=device, residual=True)
    route = ops.select_route(case["masks"], case["task"], 6, case["x"].device)
    off = ~route & route.any(0)  # (sample, channel) pairs of used channels that the sample does not go through
    assert off.any()
    x = case["x"].clone()
    x[off] = float("nan")
    results = {}
    for name in ("reference", backend):
        xx = x.clone().requires_grad_(True)
        w, b = case["weight"].clone().requires_grad_(True), case["bias"].clone().requires_grad_(True)
        rm, rv = case["running_mean"].clone(), case["running_var"].clone()
        common = (case["masks"], case["task"], w, b, rm, rv, training, 0.1, 1e-5, stats, name)
        y = ops.bn_relu_route(xx, *common) if op == "bn_relu_route" else \
            ops.bn_add_relu_route(xx, case["residual"], *common)
        grads = torch.autograd.grad(y, (xx, w, b), case["grad"])
        results[name] = (y, *grads, rm, rv)
        for t in results[name]:
            assert not t.isnan().any(), name
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-4)


def test_residual_in_any_layout(backend, target):
    """A residual in the other memory format than x, a misaligned one (storage offset 1) and a non-dense view:
    the same results, and grad_residual in x's layout."""
    shape, device = fit((4, 16, 6, 6), target.interpreted), target.device
    numel = math.prod(shape)
    for channels_last in (False, True):
        case = make_case(shape, channels_last=channels_last, per_sample=True, device=device, residual=True)
        base = case["residual"]
        other = base.contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last)
        misaligned = torch.empty(numel + 1, device=device)[1:].view(shape).copy_(base)
        wide = torch.empty(shape[0], shape[1], shape[2], 2 * shape[3], device=device)
        strided = wide[..., ::2].copy_(base)
        for residual in (other, misaligned, strided):
            case["residual"] = residual
            compare(backend, case, True, "batch")
            compare(backend, case, False, "batch")


def test_misaligned_and_permuted_x(backend, target):
    shape, device = fit((4, 16, 8, 8), target.interpreted), target.device
    numel = math.prod(shape)
    case = make_case(shape, per_sample=True, device=device, residual=True)
    case["x"] = torch.randn(numel + 1, device=device)[1:].view(shape)
    case["grad"] = torch.randn(numel + 1, device=device)[1:].view(shape)
    compare(backend, case, True, "batch")
    case = make_case(shape, device=device, residual=True)
    case["x"] = case["x"].transpose(2, 3)
    case["residual"] = case["residual"].transpose(2, 3)
    case["grad"] = case["grad"].transpose(2, 3)
    compare(backend, case, True, "batch", strides=False)


def test_several_training_steps_keep_running_stats_equal(backend, device):
    masks = make_masks(4, 8, 0.5, torch.Generator().manual_seed(0)).to(device)
    state = {b: (torch.zeros(8, device=device), torch.ones(8, device=device)) for b in ("reference", backend)}
    for step in range(4):
        x = torch.randn(6, 8, 5, 5, device=device) * (step + 1) + step
        r = torch.randn_like(x)
        for name, (rm, rv) in state.items():
            ops.bn_add_relu_route(x, r, masks, step % 4, None, None, rm, rv, True, 0.1, 1e-5, "batch", name)
    torch.testing.assert_close(state[backend], state["reference"], rtol=1e-5, atol=1e-5)


def test_deterministic(backend, target):
    for shape, cl in (((2, 3, 64, 64), False), ((16, 32, 8, 8), True)):
        case = case_on(target, shape, channels_last=cl, per_sample=True)
        first, second = run(backend, case), run(backend, case)
        for key in first:
            assert torch.equal(first[key], second[key]), key


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("wants", ["x", "residual", "params", "residual+params", "all"])
def test_gradients_of_any_subset_of_inputs(backend, device, wants, channels_last):
    """Any subset of the inputs asks for gradients; residual+params is a tail after a frozen convolution, where
    grad_residual comes from the pass that sums the weight gradients."""
    case = make_case((3, 8, 4, 2), seed=4, device=device, residual=True, channels_last=channels_last)
    results = {}
    for name in ("reference", backend):
        x = case["x"].clone().requires_grad_(wants in ("x", "all"))
        r = case["residual"].clone().requires_grad_("residual" in wants or wants == "all")
        w = case["weight"].clone().requires_grad_("params" in wants or wants == "all")
        b = case["bias"].clone().requires_grad_("params" in wants or wants == "all")
        y = ops.bn_add_relu_route(x, r, case["masks"], case["task"], w, b, training=True, backend=name)
        leaves = [t for t in (x, r, w, b) if t.requires_grad]
        results[name] = torch.autograd.grad(y, leaves, case["grad"])
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_output_mask(backend, family, device, training):
    """bn_add_relu_route_backward computes exactly what its output mask asks for (empty otherwise)."""
    case = make_case((3, 4, 2, 3), per_sample=True, device=device, residual=True)
    x, r, route = case["x"], case["residual"], case["masks"][case["task"]]
    w, b, g = case["weight"], case["bias"], case["grad"]
    forward = ops.family_op(family, "bn_add_relu_route")
    backward = ops.family_op(family, "bn_add_relu_route_backward")
    y, mean, invstd, _, count = forward(x, r, route, w, b, None, None, True, 1e-5, False, False)
    count = count if training else count[:0]
    full = backward(g, y, x, route, w, b, mean, invstd, count, training, False, [True] * 4)
    torch.testing.assert_close(full[1], torch.where(y > 0, g, 0))
    for mask in itertools.product([False, True], repeat=4):
        out = backward(g, y, x, route, w, b, mean, invstd, count, training, False, list(mask))
        for wanted, o, f in zip(mask, out, full):
            if wanted:
                torch.testing.assert_close(o, f)
            else:
                assert o.numel() == 0
    out = backward(g, y, x, route, w.half(), b.half(), mean, invstd, count, training, False, [False, False, True, True])
    assert out[2].dtype == torch.float16 and out[3].dtype == torch.float16


@pytest.mark.backends("cpu", "cuda")
@pytest.mark.parametrize("training,stats,per_sample,channels_last",
                         list(itertools.product([True, False], ["batch", "routed"], [False, True], [False, True])))
def test_gradcheck_float64(backend, family, device, training, stats, per_sample, channels_last):
    case = make_case((3, 4, 3, 2), dtype=torch.float64, per_sample=per_sample, channels_last=channels_last,
                     device=device, residual=True)
    route = case["masks"][case["task"]]
    rm, rv = case["running_mean"].double(), case["running_var"].double()
    forward = ops.family_op(family, "bn_add_relu_route")

    def f(x, r, w, b):
        return forward(x, r, route, w, b, rm.clone(), rv.clone(), training, 1e-5, stats == "routed", False)[0]

    x = case["x"].detach().requires_grad_(True)
    r = case["residual"].detach().requires_grad_(True)
    w = case["weight"].double().requires_grad_(True)
    b = case["bias"].double().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-5)


def test_double_backward_is_exact(backend, device):
    """create_graph=True runs the differentiable backward: second-order gradients equal the reference's."""
    case = make_case((4, 5, 3, 3), seed=2, device=device, residual=True)
    results = {}
    for name in ("reference", backend):
        x = case["x"].clone().requires_grad_(True)
        r = case["residual"].clone().requires_grad_(True)
        w = case["weight"].clone().requires_grad_(True)
        y = ops.bn_add_relu_route(x, r, case["masks"], case["task"], w, None, training=True, backend=name)
        gx, gr, gw = torch.autograd.grad((y * case["grad"]).sum(), (x, r, w), create_graph=True)
        penalty = gx.square().sum() + (gr * case["grad"]).sum() + gw.square().sum()
        grads = torch.autograd.grad(penalty, (x, r, w), allow_unused=True)
        # None: no path (the gate y > 0 has zero derivative; the reference still links r through it)
        results[name] = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, r, w))]
    for got, want in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert results[backend][0].abs().sum() > 0  # a non-trivial second order


# ----------------------------------------------------------------------------- errors, opcheck, compile
def test_bad_arguments_raise_clear_errors(backend, family, device):
    x = torch.randn(4, 6, 3, 3, device=device)
    masks = torch.ones(2, 6, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="residual"):
        ops.bn_add_relu_route(x, x[:, :5], masks, 0, backend=backend)
    with pytest.raises(TypeError, match="residual"):
        ops.bn_add_relu_route(x, x.double(), masks, 0, backend=backend)
    with pytest.raises(TypeError, match="residual"):
        ops.bn_add_relu_route(x, 1.0, masks, 0, backend=backend)
    route = masks[0]
    op = ops.family_op(family, "bn_add_relu_route")
    with pytest.raises((ValueError, RuntimeError), match="residual"):
        op(x, x[:3], route, None, None, None, None, True, 1e-5, False, False)
    backward = ops.family_op(family, "bn_add_relu_route_backward")
    stats = torch.ones(6, device=device)
    with pytest.raises((ValueError, RuntimeError), match="y"):
        backward(x, x[:2], x, route, None, None, stats, stats, stats, True, False, [True, True, False, False])


def _opcheck_cases(device, family):
    case = make_case((3, 8, 3, 2), per_sample=True, device=device, residual=True)
    x, r, route, w, b = case["x"], case["residual"], case["masks"][case["task"]], case["weight"], case["bias"]
    rm, rv, dy = case["running_mean"], case["running_var"], case["grad"]
    xr, rr = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    forward = ops.family_op(family, "bn_add_relu_route")
    y, mean, invstd, _, count = forward(x, r, route, w, b, None, None, True, 1e-5, False, False)
    return [
        (forward, (xr, rr, route, w, b, rm, rv, True, 1e-5, False, True)),
        (forward, (xcl, rr, route, w, b, rm, rv, True, 1e-5, False, True)),
        (forward, (xr, rr, route, w, b, rm, rv, False, 1e-5, False, False)),
        (forward, (xr, r, route, None, None, None, None, True, 1e-5, True, False)),
        (ops.family_op(family, "bn_add_relu_route_backward"),
         (dy, y, x, route, w, b, mean, invstd, count, True, False, [True, True, True, False])),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(backend, family, device, index):
    op, args = _opcheck_cases(device, family)[index]
    torch.library.opcheck(op, args)


def _module_pair(backend, device, channels, task_stats=False, **options):
    """BNAddReLURoute2d and the unfused BatchNorm2d -> add -> ReLU -> TaskRouter with the same state."""
    fused = BNAddReLURoute2d(channels, num_tasks=4, sharing_ratio=0.5, seed=2, backend=backend,
                             task_stats=task_stats, **options).to(device)
    if fused.affine:
        with torch.no_grad():
            fused.weight.normal_()
            fused.bias.normal_()
    bn = nn.BatchNorm2d(channels, **options).to(device)
    bn.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith(("masks", "task_"))})
    return fused, bn, TaskRouter(channels, masks=fused.masks).to(device)


@pytest.mark.parametrize("options", [dict(), dict(momentum=None), dict(affine=False),
                                     dict(track_running_stats=False)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_module_matches_batchnorm_add_relu_router(backend, target, options):
    n, c, h, w = fit((4, 8, 5, 6), target.interpreted)
    fused, bn, router = _module_pair(backend, target.device, c, **options)
    g = torch.Generator().manual_seed(0)
    for i, training in enumerate([True, True, False, True, False]):
        fused.train(training), bn.train(training)
        x = (torch.randn(n, c, h, w, generator=g) * 2 + i).to(target.device)
        res = torch.randn(n, c, h, w, generator=g).to(target.device)
        if i % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(n, c, h, w, generator=g).to(target.device)
        task = i % 4 if i != 3 else torch.randint(0, 4, (n,), generator=g).to(target.device)
        outs = []
        for unfused in (False, True):
            fused.zero_grad(), bn.zero_grad()
            xx, rr = x.clone().requires_grad_(True), res.clone().requires_grad_(True)
            y = router(torch.relu(bn(xx) + rr), task) if unfused else fused(xx, rr, task)
            y.backward(grad)
            params = [p.grad for p in (bn if unfused else fused).parameters()]
            outs.append((y.detach(), xx.grad, rr.grad, params))
        for got, want in zip(outs[0][:3], outs[1][:3]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for got, want in zip(outs[0][3], outs[1][3]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-5)


def test_module_task_stats_matches_bn_relu_route_rows(backend, device):
    """With task_stats, BNAddReLURoute2d keeps the per-task rows BNReLURoute2d keeps (the residual does not enter
    the statistics), one task per batch and per sample."""
    add = BNAddReLURoute2d(6, num_tasks=3, seed=1, backend=backend, task_stats=True).to(device)
    plain = BNReLURoute2d(6, num_tasks=3, seed=1, backend=backend, task_stats=True).to(device)
    for task in (0, 2, torch.tensor([0, 1, 1, 2, 2, 0], device=device)):
        x = torch.randn(6, 6, 3, 3, device=device)
        add(x, torch.randn_like(x), task)
        plain(x, task)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(add.state_dict()[key], value)
    add.eval()
    x, zero = torch.randn(4, 6, 3, 3, device=device), torch.zeros(4, 6, 3, 3, device=device)
    task = torch.tensor([2, 0, 1, 0], device=device)
    torch.testing.assert_close(add(x, zero, task), plain.eval()(x, task))


def test_module_rejects_a_bad_residual_and_changes_nothing(backend, device):
    layer = BNAddReLURoute2d(4, num_tasks=2, seed=0, backend=backend).to(device)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(3, 4, 2, 2, device=device)
    for bad, error in ((x[:, :3], ValueError), (x.half(), TypeError), (None, TypeError)):
        with pytest.raises(error, match="residual"):
            layer(x, bad, 0)
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    fused, _, _ = _module_pair(backend, device, 8)
    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    for cl, task in ((False, 3), (True, 1)):
        fused.active_task = task
        eager = copy.deepcopy(fused)
        compiled = torch.compile(copy.deepcopy(fused), fullgraph=True, backend=compile_backend)
        x = torch.randn(4, 8, 3, 3, device=device)
        r = torch.randn(4, 8, 3, 3, device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        leaves = [(x.clone().requires_grad_(True), r.clone().requires_grad_(True)) for _ in range(2)]
        expected, got = eager(*leaves[0]), compiled(*leaves[1])
        torch.testing.assert_close(got, expected)
        expected.sum().backward()
        got.sum().backward()
        for a, b in zip(leaves[1], leaves[0]):
            torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(compiled.running_mean, eager.running_mean)
        torch.testing.assert_close(compiled.running_var, eager.running_var)


@pytest.mark.backends("cpu")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 5), c=st.integers(1, 9), spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       channels_last=st.booleans(), per_sample=st.booleans(), training=st.booleans(),
       stats=st.sampled_from(["batch", "routed"]), sigma=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 99))
def test_random_shapes(backend, device, n, c, spatial, channels_last, per_sample, training, stats, sigma, seed):
    shape = (n, c, *spatial)
    if training and math.prod(shape) // c == 1:
        return
    case = make_case(shape, dtype=torch.float64, channels_last=channels_last, per_sample=per_sample, seed=seed,
                     num_tasks=min(c, 4), sharing_ratio=sigma, device=device, residual=True)
    compare(backend, case, training, stats)


def test_one_dispatch_forward_and_backward_and_no_zero_fills(backend, target):
    """A training step of the layer: forward = the fused op, the running-stat update and the batch count (plus
    views: the mask row, and the saved output y's detached alias); backward = the fused backward alone, with no
    zero tensors for the statistics outputs."""
    layer = BNAddReLURoute2d(8, num_tasks=3, seed=0, backend=backend).to(target.device)
    x = torch.randn(4, 8, 5, 5, device=target.device, requires_grad=True)
    r = torch.randn(4, 8, 5, 5, device=target.device, requires_grad=True)
    with Dispatches() as forward:
        y = layer(x, r, task=1)
    with Dispatches() as backward:
        y.backward(torch.ones_like(y))
    prefix = FAMILIES[ops.BACKENDS[backend].family]
    assert forward.ops[f"{prefix}bn_add_relu_route"] == 1 and forward.ops["update_running_stats"] == 1
    kernels = {name for name in forward.ops if name not in ("select", "detach")}
    assert kernels == {f"{prefix}bn_add_relu_route", "update_running_stats", "add_"}, forward.ops
    assert backward.ops[f"{prefix}bn_add_relu_route_backward"] == 1
    fills = {name: n for name, n in backward.ops.items() if name in ("zeros", "zero_", "fill_", "zeros_like")}
    assert not fills, backward.ops
