"""BNReLURoute1d/2d/3d against nn.BatchNorm*d → nn.ReLU → TaskRouter, for every BN option."""
import copy
import itertools

import pytest
import torch
from torch import nn

from taskrouting import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d, TaskRouter, ops

BN = {BNReLURoute1d: nn.BatchNorm1d, BNReLURoute2d: nn.BatchNorm2d, BNReLURoute3d: nn.BatchNorm3d}
SHAPES = {BNReLURoute1d: [(6, 5), (4, 5, 7)], BNReLURoute2d: [(4, 5, 3, 6)], BNReLURoute3d: [(3, 5, 2, 3, 4)]}
BACKENDS = [b for b in ("cpu", "reference") if b in ops.available_backends("cpu")]


def pair(cls, stats="batch", backend="cpu", **bn_kwargs):
    """A fused module and the reference stack with the same weights and masks."""
    fused = cls(5, num_tasks=6, sharing_ratio=0.4, seed=2, stats=stats, backend=backend, **bn_kwargs)
    bn = BN[cls](5, **bn_kwargs)
    if bn.affine:
        with torch.no_grad():
            fused.weight.normal_()
            fused.bias.normal_()
    bn.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "masks"})
    router = TaskRouter(5, masks=fused.masks)
    return fused, nn.Sequential(bn, nn.ReLU(), router)


def step(module, x, task, grad):
    module.zero_grad()
    for m in module.modules():
        if hasattr(m, "active_task"):
            m.active_task = task
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    grads = [p.grad for p in module.parameters()]
    return y.detach(), x.grad, grads


OPTIONS = [dict(affine=a, track_running_stats=t, momentum=m, eps=e)
           for a, t, m, e in itertools.product([True, False], [True, False], [0.1, None], [1e-5, 1e-3])]


@pytest.mark.parametrize("cls", list(BN), ids=lambda c: c.__name__)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_batchnorm_relu_router(cls, options, backend):
    fused, ref = pair(cls, backend=backend, **options)
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES[cls]:
        for i, training in enumerate([True, True, False, True, False]):
            fused.train(training), ref.train(training)
            x = torch.randn(shape, generator=g) * 2 + i
            grad = torch.randn(shape, generator=g)
            task = i % 6 if i != 3 else torch.randint(0, 6, (shape[0],), generator=g)
            out_f, out_r = step(fused, x, task, grad), step(ref, x, task, grad)
            torch.testing.assert_close(out_f[0], out_r[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out_f[1], out_r[1], rtol=1e-5, atol=1e-5)
            for a, b in zip(out_f[2], out_r[2]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            reference_state = ref[0].state_dict()
            for key, value in reference_state.items():
                torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_state_dict_is_batchnorm_plus_masks():
    fused = BNReLURoute2d(8, num_tasks=4, seed=0)
    assert set(fused.state_dict()) == set(nn.BatchNorm2d(8).state_dict()) | {"masks"}
    other = BNReLURoute2d(8, num_tasks=4, seed=1)
    other.load_state_dict(fused.state_dict())
    assert torch.equal(other.masks, fused.masks)
    assert isinstance(fused, nn.modules.batchnorm._NormBase)


def test_bfloat16_input_with_float32_parameters():
    fused, ref = pair(BNReLURoute2d)
    x = torch.randn(4, 5, 6, 6).bfloat16()
    for m in (fused, ref):
        m.active_task = None
    out_f = step(fused, x, 1, torch.ones_like(x))
    out_r = step(ref, x, 1, torch.ones_like(x))
    torch.testing.assert_close(out_f[0], out_r[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_f[1].float(), out_r[1].float(), rtol=5e-2, atol=5e-2)


def test_input_rank_is_checked():
    with pytest.raises(ValueError, match="expects a 4-D input x"):
        BNReLURoute2d(5, num_tasks=2)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="stats"):
        BNReLURoute2d(5, num_tasks=2, stats="all")
    with pytest.raises(ValueError, match="backend"):
        BNReLURoute2d(5, num_tasks=2, backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    fused, ref = pair(BNReLURoute2d, backend=backend)
    fused.active_task = 3
    compiled = torch.compile(copy.deepcopy(fused), fullgraph=True)
    x = torch.randn(4, 5, 3, 3)
    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected = fused(eager_x)
    got = compiled(compiled_x)
    torch.testing.assert_close(got, expected)
    expected.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)
    torch.testing.assert_close(compiled.running_mean, fused.running_mean)
    torch.testing.assert_close(compiled.num_batches_tracked, fused.num_batches_tracked)
