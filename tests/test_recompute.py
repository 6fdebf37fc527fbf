"""memory_efficient / ops.recompute: fused outputs rebuilt in backward give the same gradients, and
the saved activations shrink as promised (against the unfused reference model)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskrouting import BNReLURoute2d
from taskrouting.models import RecomputableMaxPool2d, resnet50, vgg11_bn
from taskrouting.ops.recompute import recompute_outputs, saved_tensors_meter


def _block(backend, device, channels_last=False):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BNReLURoute2d(6, num_tasks=3, seed=0, backend=backend),
                          RecomputableMaxPool2d(2, ceil_mode=True), nn.Conv2d(6, 4, 3, padding=1),
                          BNReLURoute2d(4, num_tasks=3, seed=1, backend=backend, stats="routed"), nn.Conv2d(4, 2, 1))
    block = block.to(device)
    return block.to(memory_format=torch.channels_last) if channels_last else block


def _step(block, x, recompute):
    block.zero_grad()
    with saved_tensors_meter() as meter:
        with recompute_outputs() if recompute else contextlib.nullcontext():
            y = block[1:](block[0](x))
    y.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    stats = [b.clone() for m in block if isinstance(m, BNReLURoute2d) for b in (m.running_mean, m.running_var)]
    return y.detach(), grads, stats, meter


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_rebuilt_outputs_give_the_same_gradients_on_every_backend(backend, device, channels_last, training):
    x = torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(1)).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kept, rebuilt = _block(backend, device, channels_last), _block(backend, device, channels_last)
    for block in (kept, rebuilt):
        block.train(training)
        for m in block:
            if isinstance(m, BNReLURoute2d):
                m.active_task = 2
    want = _step(kept, x, recompute=False)
    got = _step(rebuilt, x, recompute=True)
    for a, b in zip(want[:3], got[:3]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert got[3].recomputed_bytes > 0 and got[3].saved_bytes < want[3].saved_bytes


def test_an_input_changed_in_place_before_backward_is_an_error_not_a_wrong_gradient():
    block = _block("cpu", "cpu")
    for m in block:
        if isinstance(m, BNReLURoute2d):
            m.active_task = 0
    with recompute_outputs():
        y = block(torch.randn(2, 3, 5, 5))
    with torch.no_grad():
        block[1].weight.mul_(2)  # the routed layer's weight, as an optimizer step would
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        y.sum().backward()


def test_without_grad_nothing_is_noted_and_the_context_leaves_no_hooks():
    block = _block("cpu", "cpu")
    with torch.no_grad(), recompute_outputs():
        block[1](block[0](torch.randn(2, 3, 5, 5)), task=0)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    out = F.relu(x * 2)
    assert out.grad_fn is not None  # hooks from the context would have been left on the stack otherwise
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * (x > 0))


# VGG-11 at the measurement (x0.5 wide, 16x3x64x64); ResNet-50 smaller (it is slower on the CPU).
SIZES = {vgg11_bn: (0.5, (16, 3, 64, 64)), resnet50: (0.25, (8, 3, 32, 32))}


def _saved_and_grads(build, **kwargs):
    torch.manual_seed(0)
    width, shape = SIZES[build]
    model = build(4, sharing_ratio=0.5, seed=0, width_mult=width, pool_size=1, **kwargs).train()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with saved_tensors_meter() as meter:
        loss = model(x, task=1).square().mean()
    loss.backward()
    return meter.saved_bytes, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, model


@pytest.mark.parametrize("build", [vgg11_bn, resnet50], ids=["vgg11_bn", "resnet50"])
def test_memory_efficient_models_save_less_with_identical_gradients(build):
    reference, _, _ = _saved_and_grads(build, fused=False)
    fused, fused_grads, fused_model = _saved_and_grads(build)
    saved, grads, model = _saved_and_grads(build, memory_efficient=True)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], fused_grads[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.state_dict(), fused_model.state_dict(), rtol=0, atol=0)
    assert saved < fused < reference
    if build is vgg11_bn:  # measured: 27.7 of 68.5 MiB = 0.40 (fused alone: 50.0 MiB, 0.73)
        assert saved <= 0.45 * reference
    else:  # measured with the fused tail (bn_add_relu_route): 2.87 of 5.04 MiB = 0.57 (fused alone: 0.70)
        assert saved <= 0.6 * reference


def test_memory_efficient_is_a_checked_bool_and_kept_out_of_the_state_dict():
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        vgg11_bn(2, width_mult=0.125, memory_efficient="yes")
    a, b = vgg11_bn(2, width_mult=0.125, seed=0), vgg11_bn(2, width_mult=0.125, seed=0, memory_efficient=True)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("build", [vgg11_bn, resnet50], ids=["vgg11_bn", "resnet50"])
def test_memory_efficient_task_stats_model_compiles_fullgraph_with_the_eager_gradients_and_stats(build):
    # float64 and 4 samples of 64x64: in float32 a ResNet-50's last BatchNorms (2 samples of 1x1 at 32x32)
    # amplify the compiled graph's other rounding into gradients that differ by half their size.
    torch.manual_seed(0)
    model = build(3, width_mult=0.125, seed=0, memory_efficient=True).double()
    twin = build(3, width_mult=0.125, seed=0, memory_efficient=True).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    model(x, task=1).square().sum().backward()
    compiled = torch.compile(twin, fullgraph=True, dynamic=False)
    compiled(x, task=1).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        scale = max(1.0, p.grad.abs().max().item())
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9 * scale, msg=name)
    # The per-task statistics (on by default) are updated by the compiled graph as in eager.
    torch.testing.assert_close(twin.state_dict(), model.state_dict(), rtol=1e-9, atol=1e-10)
