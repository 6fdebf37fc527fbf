"""The fused op's C++ CPU backend against the pure-PyTorch reference."""
import itertools
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_cases import assert_matches, make_case, opcheck_cases, run

from taskrouting import make_masks, ops
from taskrouting.ops import extension as _extension

BACKEND = "cpu"
SHAPES = [(4, 6, 5, 7), (3, 5), (6, 3, 11), (2, 4, 3, 3, 2), (5, 70, 3, 3), (9, 1, 4, 4), (8, 5, 1, 1)]


def test_extension_is_built():
    if os.environ.get("TASKROUTING_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("TASKROUTING_ALLOW_NO_EXTENSION=1")
    assert _extension.loaded(), _extension.LOAD_ERROR
    assert "cpu" in ops.available_backends("cpu")


def _compare(case, upcast_dtype, **kw):
    reduced = upcast_dtype in (torch.float16, torch.bfloat16)
    expected = run("reference", case, dtype=torch.float32 if reduced else None, **kw)
    got = run(BACKEND, case, **kw)
    assert_matches(got, expected, upcast_dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_task", "sample_task"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stats", ["batch", "routed"])
def test_matches_reference(shape, channels_last, per_sample, training, stats):
    for affine, track in ((True, True), (False, True), (True, False)):
        if not training and not track:
            continue
        case = make_case(shape, channels_last=channels_last, affine=affine, per_sample=per_sample)
        _compare(case, torch.float32, training=training, stats=stats, track=track)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training,stats", [(True, "batch"), (True, "routed"), (False, "batch")])
def test_dtypes(dtype, channels_last, training, stats):
    for shape in [(4, 6, 5, 7), (6, 3, 11), (10, 7)]:
        for per_sample in (False, True):
            case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample)
            _compare(case, dtype, training=training, stats=stats)


@pytest.mark.parametrize("sharing_ratio", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("stats", ["batch", "routed"])
def test_sharing_ratios(sharing_ratio, stats):
    case = make_case((6, 12, 4, 4), sharing_ratio=sharing_ratio, num_tasks=5, seed=3)
    _compare(case, torch.float32, stats=stats)
    _compare(case, torch.float32, training=False)


def test_user_masks_and_momentum_eps():
    case = make_case((5, 4, 3, 3))
    case["masks"] = torch.tensor([[True, False, False, True], [False, True, True, True]])
    case["task"] = 1
    for momentum, eps in ((0.0, 1e-3), (1.0, 1e-5), (0.3, 0.5)):
        _compare(case, torch.float32, momentum=momentum, eps=eps)


def test_several_training_steps_keep_running_stats_equal():
    shape = (6, 8, 5, 5)
    masks = make_masks(4, 8, 0.5, torch.Generator().manual_seed(0))
    state = {b: (torch.zeros(8), torch.ones(8)) for b in ("reference", BACKEND)}
    weight = torch.randn(8)
    for step in range(5):
        x = torch.randn(shape) * (step + 1) + step
        for backend, (rm, rv) in state.items():
            ops.bn_relu_route(x, masks, step % 4, weight, None, rm, rv, True, 0.1, 1e-5, "routed", backend)
    torch.testing.assert_close(state[BACKEND][0], state["reference"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[BACKEND][1], state["reference"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training,stats,per_sample,channels_last",
                         list(itertools.product([True, False], ["batch", "routed"], [False, True], [False, True])))
def test_gradcheck_float64(training, stats, per_sample, channels_last):
    case = make_case((3, 4, 3, 2), dtype=torch.float64, per_sample=per_sample, channels_last=channels_last)
    masks, task = case["masks"], case["task"]
    rm, rv = case["running_mean"].double(), case["running_var"].double()

    def f(x, w, b):
        return ops.bn_relu_route(x, masks, task, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, stats, BACKEND)

    x = case["x"].detach().requires_grad_(True)
    w = case["weight"].double().requires_grad_(True)
    b = case["bias"].double().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)


def test_empty_batch_and_single_sample():
    masks = make_masks(3, 4, 0.5, torch.Generator().manual_seed(0))
    for shape in ((0, 4, 3, 3), (0, 4)):
        x = torch.randn(shape, requires_grad=True)
        rm, rv = torch.zeros(4), torch.ones(4)
        y = ops.bn_relu_route(x, masks, 1, None, None, rm, rv, True, 0.1, 1e-5, "batch", BACKEND)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
        assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_relu_route(x, masks, 0, training=True, backend=BACKEND)
    y = ops.bn_relu_route(x, masks, 0, None, None, torch.zeros(4), torch.ones(4), False, backend=BACKEND)
    expected = torch.relu(x / math.sqrt(1 + 1e-5)) * masks[0].view(1, 4, 1, 1)
    torch.testing.assert_close(y, expected)


def test_zero_variance_channels():
    x = torch.full((4, 3, 5, 5), 2.5)
    masks = torch.ones(1, 3, dtype=torch.bool)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = ops.bn_relu_route(x.requires_grad_(True), masks, 0, None, torch.ones(3), rm, rv, backend=BACKEND)
    torch.testing.assert_close(y, torch.ones_like(y))
    torch.testing.assert_close(rv, torch.full((3,), 0.9))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_masked_channels_are_never_read(channels_last, per_sample):
    """NaN planted where no sample routes must not reach the output or any gradient."""
    case = make_case((4, 8, 3, 3), channels_last=channels_last, per_sample=per_sample, sharing_ratio=0.25)
    if per_sample:
        case["task"] = torch.tensor([0, 1, 0, 1])
    route = case["masks"][case["task"]]
    unused = ~(route.any(0) if per_sample else route)
    assert unused.any()
    x = case["x"].clone()
    x[:, unused] = float("nan")
    for training in (False, True):
        xx = x.clone().requires_grad_(True)
        w, b = case["weight"].clone().requires_grad_(True), case["bias"].clone().requires_grad_(True)
        y = ops.bn_relu_route(xx, case["masks"], case["task"], w, b,
                              case["running_mean"].clone(), case["running_var"].clone(), training,
                              stats="routed" if training else "batch", backend=BACKEND)
        y.backward(case["grad"])
        for t in (y, xx.grad, w.grad, b.grad):
            assert not t.isnan().any()
        assert (y[:, unused] == 0).all() and (xx.grad[:, unused] == 0).all()
        assert (w.grad[unused] == 0).all() and (b.grad[unused] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_streaming_stores_write_the_same_outputs(monkeypatch, dtype, channels_last, training):
    """Outputs above TASKROUTING_STREAM_MIN_BYTES are written with non-temporal stores (0: all
    of them): bit for bit what normal stores write, with unaligned planes and rows too."""
    for shape, per_sample in (((4, 6, 5, 7), False), ((3, 37), True), ((2, 20, 9, 9), True)):
        case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample)
        monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", str(2 ** 62))
        normal = run(BACKEND, case, training=training)
        monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", "0")
        streamed = run(BACKEND, case, training=training)
        for name, value in normal.items():
            assert torch.equal(streamed[name], value), name


def test_large_output_streams_by_default(monkeypatch):
    """An 8 MiB output takes the streaming path with the default threshold: same bits, and
    the reference's output (its sums over 2^18 values per channel differ in the last bits)."""
    monkeypatch.delenv("TASKROUTING_STREAM_MIN_BYTES", raising=False)
    case = make_case((8, 64, 64, 64), seed=2)
    streamed = run(BACKEND, case)
    monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", str(2 ** 62))
    normal = run(BACKEND, case)
    for name, value in normal.items():
        assert torch.equal(streamed[name], value), name
    torch.testing.assert_close(streamed["y"], run("reference", case)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("has_weight,has_bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("wants", ["x", "params", "weight", "bias", "all"])
def test_gradients_of_any_subset_of_inputs(has_weight, has_bias, wants):
    """The autograd wiring (C++ for this backend) maps gradients to the right inputs whichever
    optional parameters are given and whichever inputs require grad."""
    case = make_case((3, 5, 4, 2), seed=4)
    results = {}
    for backend in ("reference", BACKEND):
        x = case["x"].clone().requires_grad_(wants in ("x", "all"))
        w = case["weight"].clone().requires_grad_(wants in ("params", "weight", "all")) if has_weight else None
        b = case["bias"].clone().requires_grad_(wants in ("params", "bias", "all")) if has_bias else None
        y = ops.bn_relu_route(x, case["masks"], case["task"], w, b, training=True, backend=backend)
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        assert y.requires_grad == bool(leaves)
        results[backend] = torch.autograd.grad(y, leaves, case["grad"]) if leaves else ()
    assert len(results[BACKEND]) == len(results["reference"])
    for got, want in zip(results[BACKEND], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stage_ops_compose_to_the_fused_op():
    case = make_case((5, 6, 4, 3), per_sample=True)
    x, route = case["x"], case["masks"][case["task"]]
    w, b, dy = case["weight"], case["bias"], case["grad"]
    for routed in (False, True):
        y, mean, invstd, var, count = torch.ops.taskrouting.bn_relu_route(x, route, w, b, None, None, True, 1e-5,
                                                                          routed, False)
        m2, v2, c2 = torch.ops.taskrouting.channel_stats(x, route, routed, False)
        torch.testing.assert_close((m2, v2, c2), (mean, var, count))
        torch.testing.assert_close(torch.ops.taskrouting.normalize_relu_route(x, route, mean, invstd, w, b), y)
        gx, gw, gb = torch.ops.taskrouting.bn_relu_route_backward(dy, x, route, w, b, mean, invstd, count, True,
                                                                   routed, [True, True, True])
        s_dy, s_dyxmu = torch.ops.taskrouting.backward_reduce(dy, x, route, mean, invstd, w, b)
        torch.testing.assert_close((s_dyxmu * invstd, s_dy), (gw, gb))
        dx = torch.ops.taskrouting.backward_apply(dy, x, route, mean, invstd, w, b, s_dy, s_dyxmu, count, True, routed)
        torch.testing.assert_close(dx, gx)


def test_combine_stats_merges_split_batches():
    x = torch.randn(8, 5, 4, 4) * 3 + 1
    route = torch.ones(5, dtype=torch.bool)
    parts = [torch.ops.taskrouting.channel_stats(p, route, False, True) for p in x.split([3, 5])]
    merged = ops.combine_stats(*(torch.stack(t) for t in zip(*parts)))
    whole = torch.ops.taskrouting.channel_stats(x, route, False, True)
    torch.testing.assert_close(merged, whole)


def test_compiled_running_stat_update_matches_pytorch():
    from taskrouting.ops.reference import update_running_stats
    mean, var = torch.randn(6), torch.rand(6)
    count = torch.tensor([0.0, 1.0, 2.0, 7.0, 100.0, 3.0])
    expected = (torch.randn(6), torch.rand(6) + 0.5)
    got = tuple(t.clone() for t in expected)
    update_running_stats(*expected, mean, var, count, 0.3)
    torch.ops.taskrouting.update_running_stats(*got, mean, var, count, 0.3)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"count must have shape \[6\]"):
        torch.ops.taskrouting.update_running_stats(*got, mean, var, count[:3], 0.3)


@pytest.mark.parametrize("name,args", opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.taskrouting, name).default, args)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 5), c=st.integers(1, 9), spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       channels_last=st.booleans(), per_sample=st.booleans(), training=st.booleans(),
       stats=st.sampled_from(["batch", "routed"]), sigma=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 99))
def test_random_shapes(n, c, spatial, channels_last, per_sample, training, stats, sigma, seed):
    shape = (n, c, *spatial)
    if training and math.prod(shape) // c == 1:
        return
    # float64: tiny routed groups make float32 statistics ill-conditioned; the code path is the same
    case = make_case(shape, dtype=torch.float64, channels_last=channels_last, per_sample=per_sample, seed=seed,
                     num_tasks=min(c, 4), sharing_ratio=sigma)
    _compare(case, torch.float64, training=training, stats=stats)
