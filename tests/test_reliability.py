"""Reliability at the op and module level (issue 14): double backward is exact, a masked channel is
exactly 0 whatever x holds, huge inputs keep finite statistics, a rejected call changes no state,
and constructors reject bad arguments by name."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend on CPU tensors (see test_triton.py)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import taskrouting  # noqa: E402
from taskrouting import ops  # noqa: E402
from taskrouting.models.blocks import ReferenceBNReLURoute2d  # noqa: E402
from taskrouting.nn import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d, TaskRouter, fuse, set_active_task  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
CPU_BACKENDS = ["reference"] + (["cpu"] if "cpu" in ops.available_backends("cpu") else []) \
    + (["triton"] if HAS_TRITON else [])
MASKS = torch.tensor([[True, False, True], [False, True, True]])
PER_SAMPLE = torch.tensor([0, 1, 1, 0])


# ----------------------------------------------------------------------------- double backward
def _op(backend, task, training, stats, rm, rv):
    def f(x, w, b):
        return ops.bn_relu_route(x, MASKS, task, w, b, rm.clone(), rv.clone(), training=training, stats=stats,
                                 backend=backend)
    return f


def _double_case(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2, dtype=dtype, requires_grad=True)
    w = (torch.rand(3, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=dtype, requires_grad=True)
    rm, rv = torch.randn(3, dtype=dtype), torch.rand(3, dtype=dtype) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("task", [0, PER_SAMPLE], ids=["one_task", "per_sample"])
@pytest.mark.parametrize("stats", ["batch", "routed"])
def test_double_backward_gradgradcheck(backend, training, task, stats):
    x, w, b, rm, rv = _double_case(torch.float64)
    assert torch.autograd.gradgradcheck(_op(backend, task, training, stats, rm, rv), (x, w, b))


def _second_order(backend, training, task, stats, dtype=torch.float32):
    """d/d(x, w, b) of sum(grad_x^2) + sum(grad_w) after a create_graph backward."""
    x, w, b, rm, rv = _double_case(dtype)
    y = _op(backend, task, training, stats, rm, rv)(x, w, b)
    gx, gw = torch.autograd.grad(y, (x, w), torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y),
                                 create_graph=True)
    return torch.autograd.grad(gx.square().sum() + gw.sum(), (x, w, b), allow_unused=True)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("task", [0, PER_SAMPLE], ids=["one_task", "per_sample"])
def test_double_backward_matches_reference(backend, training, task):
    got = _second_order(backend, training, task, "batch")
    expected = _second_order("reference", training, task, "batch")
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert any(e is not None and e.abs().sum() > 0 for e in expected)  # a non-trivial second order


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_masked_channel_is_zero_whatever_x_holds(backend, training, bad):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    x[:, 1] = bad  # channel 1 is masked for task 0
    x.requires_grad_()
    w = torch.rand(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = ops.bn_relu_route(x, MASKS, 0, w, b, rm, rv, training=training, backend=backend)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    assert torch.isfinite(y).all()
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    for g in (gx, gw, gb):
        assert torch.isfinite(g).all()
    assert torch.equal(gx[:, 1], torch.zeros_like(gx[:, 1]))
    assert gw[1] == 0 and gb[1] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_sample_masked_values_are_zero(backend):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    x[0, 1] = float("nan")  # sample 0 (task 0) does not use channel 1; samples 1 and 2 (task 1) do
    y = ops.bn_relu_route(x, MASKS, PER_SAMPLE, training=False, running_mean=torch.zeros(3),
                          running_var=torch.ones(3), backend=backend)
    assert torch.equal(y[0, 1], torch.zeros(2, 2)) and torch.isfinite(y).all()
    y = ops.bn_relu_route(x, MASKS, PER_SAMPLE, stats="routed", backend=backend)
    assert torch.equal(y[0, 1], torch.zeros(2, 2)) and torch.isfinite(y).all()  # routed stats never read it


@pytest.mark.parametrize("module", [TaskRouter(3, masks=MASKS), ReferenceBNReLURoute2d(3, masks=MASKS,
                                                                                     sharing_ratio=0.5)],
                         ids=["TaskRouter", "ReferenceBNReLURoute2d"])
def test_modules_select_masked_channels(module):
    x = torch.randn(4, 3, 2, 2)
    x[:, 1] = float("nan")
    module.eval()
    y = module(x, task=0)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1])) and torch.isfinite(y).all()
    y = module(x, task=PER_SAMPLE)
    assert torch.equal(y[PER_SAMPLE == 0, 1], torch.zeros(2, 2, 2))


def test_task_router_masked_gradient_is_zero():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = TaskRouter(3, masks=MASKS)(x, task=0)
    (gx,) = torch.autograd.grad(y, x, torch.full_like(y, float("nan")))
    assert torch.equal(gx[:, 1], torch.zeros_like(gx[:, 1]))


# ----------------------------------------------------------------------------- rejected calls change nothing
def _routed_layers():
    masks = torch.tensor([[True, False, True], [False, True, True]])
    return [BNReLURoute2d(3, masks=masks), ReferenceBNReLURoute2d(3, masks=masks, sharing_ratio=0.5)]


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("momentum", [0.1, None])
def test_failed_forward_counts_no_batch(momentum):
    layer = BNReLURoute2d(3, num_tasks=2, seed=0, backend="cuda", momentum=momentum)
    before = _snapshot(layer)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        layer(torch.randn(4, 3, 2, 2), task=0)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("layer", _routed_layers(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("x, task, error", [
    (torch.randn(4, 3, 2, 2), 2, IndexError),                      # task out of range
    (torch.randn(4, 3, 2, 2), torch.tensor([0, 1]), ValueError),  # per-sample task of the wrong length
    (torch.randn(4, 5, 2, 2), 0, ValueError),                      # channels do not match
])
def test_rejected_forward_changes_no_state(layer, x, task, error):
    before = _snapshot(layer)
    with pytest.raises(error):
        layer(x, task=task)
    _assert_unchanged(layer, before)


def test_counting_after_the_op_keeps_the_cumulative_average():
    layer = BNReLURoute2d(3, num_tasks=1, masks=torch.ones(1, 3, dtype=torch.bool), momentum=None)
    bn = nn.BatchNorm2d(3, momentum=None)
    for i in range(3):
        x = torch.randn(4, 3, 2, 2) * (i + 1) + i
        layer(x, task=0)
        bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert layer.num_batches_tracked == bn.num_batches_tracked == 3


def _masked_layers():
    return _routed_layers() + [TaskRouter(3, masks=torch.tensor([[True, False, True], [False, True, True]]))]


BAD_MASKS = [
    (torch.full((2, 3), 0.5), "binary"),
    (torch.tensor([[2, 1, 0], [1, 0, 1]]), "binary"),
    (torch.tensor([[-1, 1, 0], [1, 0, 1]]), "binary"),
    (torch.tensor([[False, False, False], [True, True, True]]), "at least one active channel"),
    (torch.ones(3, 3, dtype=torch.bool), "shape"),
    (torch.ones(2, 4, dtype=torch.bool), "channels"),
    (torch.ones(3, dtype=torch.bool), "shape"),
    ("not a tensor", "Tensor"),
]


@pytest.mark.parametrize("layer", _masked_layers(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("masks, message", BAD_MASKS)
def test_load_state_dict_with_bad_masks_changes_nothing(layer, masks, message):
    before = _snapshot(layer)
    state = {k: (v + 1 if v.is_floating_point() else v) for k, v in before.items()}
    state["masks"] = masks
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(state)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("layer", _routed_layers(), ids=lambda m: type(m).__name__)
def test_load_state_dict_with_a_bad_shape_loads_nothing(layer):
    before = _snapshot(layer)
    state = {k: (v + 1 if v.is_floating_point() else v) for k, v in before.items()}
    state["running_var"] = torch.ones(5)
    with pytest.raises(RuntimeError, match="running_var"):
        layer.load_state_dict(state)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("layer", _masked_layers(), ids=lambda m: type(m).__name__)
def test_load_state_dict_takes_binary_masks_as_bool(layer):
    state = _snapshot(layer)
    state["masks"] = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    layer.load_state_dict(state)
    assert layer.masks.dtype == torch.bool
    assert torch.equal(layer.masks, torch.tensor([[True, True, False], [False, False, True]]))


# ----------------------------------------------------------------------------- constructors
FUSED = [BNReLURoute1d, BNReLURoute2d, BNReLURoute3d]


@pytest.mark.parametrize("cls", FUSED)
@pytest.mark.parametrize("num_features, error", [(-1, ValueError), (0, ValueError), (4.0, TypeError),
                                                 ("4", TypeError), (True, TypeError)])
def test_bad_num_features(cls, num_features, error):
    with pytest.raises(error, match="num_features"):
        cls(num_features, num_tasks=2)


def test_bad_num_features_reference_block():
    with pytest.raises(ValueError, match="num_features"):
        ReferenceBNReLURoute2d(-1, masks=torch.ones(1, 1, dtype=torch.bool), sharing_ratio=1.0)


@pytest.mark.parametrize("build", [lambda seed: BNReLURoute2d(4, num_tasks=2, seed=seed),
                                   lambda seed: TaskRouter(4, num_tasks=2, seed=seed),
                                   lambda seed: taskrouting.models.vgg11_bn(num_tasks=2, seed=seed)],
                         ids=["BNReLURoute2d", "TaskRouter", "vgg11_bn"])
@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1])
def test_seed_out_of_range(build, seed):
    with pytest.raises(ValueError, match="seed"):
        build(seed)


def test_seed_at_the_64_bit_bounds_is_accepted():
    for seed in (2 ** 64 - 1, -2 ** 63):
        BNReLURoute2d(4, num_tasks=2, seed=seed)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, "float32"])
def test_bad_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        BNReLURoute2d(4, num_tasks=2, dtype=dtype)


@pytest.mark.parametrize("masks", [torch.tensor([[2, 1, 0], [1, 0, 1]]), torch.tensor([[-1, 1, 0], [1, 0, 1]])])
@pytest.mark.parametrize("cls", [TaskRouter, BNReLURoute2d])
def test_integer_masks_must_be_0_or_1(cls, masks):
    with pytest.raises(ValueError, match="masks must be binary"):
        cls(3, masks=masks)


def test_integer_0_1_masks_are_accepted():
    router = TaskRouter(3, masks=torch.tensor([[1, 0, 1], [0, 1, 1]]))
    assert router.masks.dtype == torch.bool and torch.equal(router.masks, MASKS)


@pytest.mark.parametrize("call", [lambda: set_active_task("model", 1),
                                  lambda: taskrouting.active_task(None, 1).__enter__(),
                                  lambda: fuse(None)],
                         ids=["set_active_task", "active_task", "fuse"])
def test_model_must_be_a_module(call):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        call()


# ----------------------------------------------------------------------------- huge finite inputs
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (5, 3, 7), (3, 3, 5, 3, 2)])
@pytest.mark.parametrize("scale", [3e19, 1e25, 1e30])
def test_huge_inputs_stay_as_finite_as_batchnorm(backend, shape, scale):
    torch.manual_seed(0)
    x = (torch.randn(shape) + 1.0) * scale  # a mean whose square overflows float32
    masks = torch.ones(1, 3, dtype=torch.bool)
    bn = nn.BatchNorm1d(3) if len(shape) == 3 else (nn.BatchNorm2d(3) if len(shape) == 4 else nn.BatchNorm3d(3))
    expected = torch.relu(bn(x))
    rm, rv = torch.zeros(3), torch.ones(3)
    y = ops.bn_relu_route(x, masks, 0, torch.ones(3), torch.zeros(3), rm, rv, backend=backend)
    assert not expected.isnan().any() and not bn.running_var.isnan().any()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (run under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("scale", [3e19, 1e25])
def test_huge_inputs_triton_split_path(monkeypatch, scale):
    """The multi-chunk path (Welford lanes merged with Chan's formula, empty lanes included)."""
    triton_ops = importlib.import_module("taskrouting.ops.triton.ops")
    for name, value in (("fuse_max", 0), ("tile", 8), ("programs", 5), ("block_pp", 2)):
        monkeypatch.setattr(triton_ops.INTERPRETED, name, value)
    test_huge_inputs_stay_as_finite_as_batchnorm("triton", (5, 3, 7), scale)
