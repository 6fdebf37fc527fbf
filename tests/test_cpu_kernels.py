"""What only the C++ CPU backend has: the extension is built, outputs above a size are written with
non-temporal (streaming) stores, and bn_add_relu_route's rows-layout backward writes grad_residual in its
sums pass and computes grad_x from it. Its behaviour as a backend is checked by the conformance suite
(test_bn_relu_route.py, target ``cpu``)."""
import itertools
import os

import pytest
import torch
from op_cases import KINK, assert_matches, kink_slack, make_case, pre_activation64, run

from taskrouting import ops
from taskrouting.ops import extension
from taskrouting.ops import reference as R

needs_kernels = pytest.mark.skipif(not ops.NATIVE_KERNELS.get("cpu"), reason="the CPU kernels are not built")


def test_extension_is_built():
    if os.environ.get("TASKROUTING_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("TASKROUTING_ALLOW_NO_EXTENSION=1")
    assert extension.loaded(), extension.LOAD_ERROR
    assert "cpu" in ops.available_backends("cpu")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_streaming_stores_write_the_same_outputs(monkeypatch, dtype, channels_last, training):
    """Outputs above TASKROUTING_STREAM_MIN_BYTES are written with non-temporal stores (0: all
    of them): bit for bit what normal stores write, with unaligned planes and rows too."""
    for shape, per_sample in (((4, 6, 5, 7), False), ((3, 37), True), ((2, 20, 9, 9), True)):
        case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample)
        monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", str(2 ** 62))
        normal = run("cpu", case, training=training)
        monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", "0")
        streamed = run("cpu", case, training=training)
        for name, value in normal.items():
            assert torch.equal(streamed[name], value), name


@needs_kernels
def test_large_output_streams_by_default(monkeypatch):
    """An 8 MiB output takes the streaming path with the default threshold: same bits, and
    the reference's output (its sums over 2^18 values per channel differ in the last bits)."""
    monkeypatch.delenv("TASKROUTING_STREAM_MIN_BYTES", raising=False)
    case = make_case((8, 64, 64, 64), seed=2)
    streamed = run("cpu", case)
    monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", str(2 ** 62))
    normal = run("cpu", case)
    for name, value in normal.items():
        assert torch.equal(streamed[name], value), name
    torch.testing.assert_close(streamed["y"], run("reference", case)["y"], rtol=1e-5, atol=1e-5)


GRADS = ("grad_x", "grad_residual", "grad_weight", "grad_bias")


def _tail_wanting(case, x, residual, training, stats, wants):
    """bn_add_relu_route on the cpu backend with gradients asked for only the inputs in ``wants`` (x, residual,
    weight, bias): y and those gradients, by name."""
    leaves = [t.detach().clone().requires_grad_(w)
              for t, w in zip((x, residual, case["weight"], case["bias"]), wants)]
    y = ops.bn_add_relu_route(leaves[0], leaves[1], case["masks"], case["task"], leaves[2], leaves[3],
                              case["running_mean"].clone(), case["running_var"].clone(), training, stats=stats,
                              backend="cpu")
    grads = iter(torch.autograd.grad(y, [t for t in leaves if t.requires_grad], case["grad"]))
    return {"y": y.detach(), **{name: next(grads) for name, w in zip(GRADS, wants) if w}}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch_task", "sample_task"])
@pytest.mark.parametrize("training,stats", [(True, "batch"), (True, "routed"), (False, "batch")],
                         ids=["train-batch", "train-routed", "eval"])
@pytest.mark.parametrize("stream", [False, True], ids=["stored", "streamed"])
def test_rows_tail_backward_under_every_output_mask(monkeypatch, dtype, per_sample, training, stats, stream):
    """bn_add_relu_route's rows-layout backward (channels-last, [N, C]) under each subset of the gradients
    (grad_x, grad_residual, grad_weight, grad_bias): the sums pass writes grad_residual and grad_x is computed
    from it, or grad_x recomputes the gate, or grad_residual is a pass of its own. Each subset gives, bit for
    bit, what the full backward gives (g is written in x's dtype and read back exactly), and the float64
    reference's values; NaN in x where no sample goes (and, in eval or with routed statistics, where the sample
    does not go) and in the residual wherever the sample is not routed reaches nothing."""
    monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", "0" if stream else str(2 ** 62))
    for shape in ((4, 16, 3, 3), (3, 19, 4, 5), (6, 21)):  # C a multiple of the vector width, C with a tail, [N, C]
        case = make_case(shape, dtype=dtype, channels_last=True, per_sample=per_sample, sharing_ratio=0.25,
                         seed=sum(shape), residual=True)
        x, r = case["x"], case["residual"]
        route = ops.select_route(case["masks"], case["task"], shape[0], x.device)
        on = R.route_view(route, x).bool().expand_as(x)
        off_x = ~R.route_view(route.reshape(-1, shape[1]).any(0), x).bool().expand_as(x)  # channels no sample uses
        if per_sample and (stats == "routed" or not training):  # samples outside a channel enter nothing there
            off_x = off_x | ~on
        assert off_x.any() and (~on).any()
        x_nan, r_nan = x.clone(), r.clone()
        x_nan[off_x] = float("nan")
        r_nan[~on] = float("nan")

        want = run("reference", case, training=training, stats=stats, dtype=torch.float64)
        kink = slack = None
        if KINK[dtype]:
            pre = pre_activation64(case, training, stats)
            kink = (pre + r.double()).abs() < KINK[dtype]
            slack = kink_slack(case, pre, kink)
        full = _tail_wanting(case, x_nan, r_nan, training, stats, (True,) * 4)
        for wants in itertools.product([False, True], repeat=4):
            if not any(wants):
                continue
            got = _tail_wanting(case, x_nan, r_nan, training, stats, wants)
            for name, value in got.items():
                assert not value.isnan().any(), (shape, wants, name)
                assert torch.equal(value, full[name]), (shape, wants, name)
            assert_matches(got, {name: want[name] for name in got}, dtype, x.numel() / shape[1], kink, slack)
            if wants[1]:
                assert (got["grad_residual"][~on] == 0).all()
                assert got["grad_residual"].stride() == x.stride()
            if wants[0]:
                assert got["grad_x"].stride() == x.stride()
